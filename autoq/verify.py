"""Checkpoint verification: does an exported checkpoint carry what its formats require?

Reads only safetensors headers (dtypes and shapes), shard by shard, and the quantization config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from autoq.errors import AutoqError
from autoq.formats import DTYPE_BITS, FORMATS, Format


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    shard: str


def read_headers(checkpoint: Path) -> dict[str, TensorInfo]:
    """Name -> dtype/shape of every tensor in a (possibly sharded) safetensors checkpoint."""
    checkpoint = Path(checkpoint)
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not shards:
        raise AutoqError(f"{checkpoint}: no safetensors files")
    infos = {}
    for shard in shards:
        with safe_open(str(checkpoint / shard), framework="pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                infos[name] = TensorInfo(view.get_dtype(), tuple(view.get_shape()), shard)
    return infos


def read_quant_config(checkpoint: Path) -> dict:
    """The ``quantization`` section of hf_quant_config.json (empty for an unquantized checkpoint)."""
    path = Path(checkpoint) / "hf_quant_config.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("quantization", {})


def logical_shape(fmt: Format, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out_features, in_features) of a layer from the shape of its stored (maybe packed) weight."""
    rule = next(t for t in fmt.stored if t.suffix == "weight").shape
    unit = rule(2, 2)  # how a 2x2 weight is stored reveals the packing
    return weight_shape[0] * 2 // unit[0], weight_shape[1] * 2 // unit[1]


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    layer_bits: dict[str, int] = field(default_factory=dict)  # stored bits per checked layer
    layer_params: dict[str, int] = field(default_factory=dict)

    @property
    def effective_bits(self) -> float:
        return sum(self.layer_bits.values()) / max(1, sum(self.layer_params.values()))


def expected_quant_algo(formats: dict[str, str]) -> str | None:
    """What ModelOpt's export writes as the top-level quant_algo for these layer formats."""
    algos = {FORMATS[f].hf_quant_algo for f in formats.values()} - {None}
    return None if not algos else "MIXED_PRECISION" if len(algos) > 1 else algos.pop()


def verify_checkpoint(checkpoint: Path, formats: dict[str, str]) -> VerifyReport:
    """Check every layer in ``formats`` (name -> format) against the checkpoint's tensors and config."""
    headers = read_headers(checkpoint)
    quant = read_quant_config(checkpoint)
    report = VerifyReport()
    expected_algo = expected_quant_algo(formats)
    if quant.get("quant_algo") != expected_algo:
        report.problems.append(f"hf_quant_config quant_algo is {quant.get('quant_algo')!r}, expected {expected_algo!r}")
    listed = quant.get("quantized_layers")
    for name, fmt_name in formats.items():
        fmt = FORMATS[fmt_name]
        weight = headers.get(f"{name}.weight")
        if weight is None:
            report.problems.append(f"{name}: no weight tensor")
            continue
        out_f, in_f = logical_shape(fmt, weight.shape)
        bits = 0
        for stored in fmt.stored:
            info = headers.get(f"{name}.{stored.suffix}")
            if info is None:
                if not stored.optional:
                    report.problems.append(f"{name} ({fmt_name}): missing {stored.suffix}")
                continue
            want_shape = stored.shape(out_f, in_f)
            if info.dtype != stored.dtype or info.shape != want_shape:
                report.problems.append(
                    f"{name} ({fmt_name}): {stored.suffix} is {info.dtype}{list(info.shape)}, expected {stored.dtype}{list(want_shape)}"
                )
            bits += DTYPE_BITS.get(info.dtype, 0) * math.prod(info.shape)
        if not fmt.quantized:
            extra = [s for s in ("weight_scale", "input_scale") if f"{name}.{s}" in headers]
            if extra:
                report.problems.append(f"{name} (BF16): unexpected quantization tensors {extra}")
        if listed is not None:
            entry = listed.get(name, {}).get("quant_algo")
            if entry != fmt.hf_quant_algo:
                report.problems.append(f"{name}: hf_quant_config lists {entry!r}, expected {fmt.hf_quant_algo!r}")
        elif fmt.quantized and expected_algo == "MIXED_PRECISION":
            report.problems.append(f"{name}: not listed in hf_quant_config quantized_layers")
        report.layer_bits[name] = bits
        report.layer_params[name] = out_f * in_f
    return report

