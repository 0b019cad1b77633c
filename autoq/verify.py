"""Checkpoint verification: does an exported checkpoint carry what its formats require?

Structure comes from safetensors headers (dtypes and shapes) and the quantization config; the
only tensor data read are the small scale tensors (checked finite and positive) and, for the
dequantization report, one layer at a time. Shards are read one by one, so a checkpoint larger
than memory verifies.

The artifact contract (after ModelOpt's experimental quantization package): config.json, the
quantization metadata (hf_quant_config.json; config.json's quantization_config), safetensors
shards (with model.safetensors.index.json when sharded) and tokenizer files. A checkpoint autoq
exported also carries ``autoq_manifest.json`` (``autoq.manifest``): every file's and tensor's
sha256, so any byte changed after export is found and named. A quantized KV cache
adds ``kv_cache_quant_algo`` and, for every attention layer (``<attn>.k_proj`` / ``v_proj``), the
float32 scalars ``<attn>.k_proj.k_scale`` and ``<attn>.v_proj.v_scale`` (amax / 448).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from autoq.checkpoint import read_quant_config
from autoq.codec import TensorInfo, dequantize_weight, logical_shape, read_headers, read_layer_tensors, read_tensor
from autoq.errors import AutoqError
from autoq.formats import DTYPE_BITS, FORMATS, KV_CACHE_FORMATS
from autoq.manifest import manifest_problems

_SCALES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale")
_E8M0_NAN = 255  # an E8M0 scale byte (MXFP8) is a biased power-of-two exponent; 255 encodes NaN
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")
FROM_CONFIG = "from_config"  # verify_checkpoint's kv_cache: expect whatever the checkpoint declares


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    layer_bits: dict[str, int] = field(default_factory=dict)  # stored bits per checked layer
    layer_params: dict[str, int] = field(default_factory=dict)
    hashed: bool = False  # the files were checked against the export's manifest (autoq.manifest)
    kv_cache: str | None = None  # kv_cache_quant_algo
    kv_layers: int = 0  # attention layers with k/v scales

    @property
    def effective_bits(self) -> float:
        return sum(self.layer_bits.values()) / max(1, sum(self.layer_params.values()))

    @property
    def kv_bits_per_element(self) -> float:
        """Bits per cached key/value element at run time (16: not quantized); never part of ``effective_bits``."""
        return KV_CACHE_FORMATS[self.kv_cache].bits_per_element if self.kv_cache in KV_CACHE_FORMATS else 16.0


def expected_quant_algo(formats: dict[str, str]) -> str | None:
    """What ModelOpt's export writes as the top-level quant_algo for these layer formats."""
    algos = {FORMATS[f].hf_quant_algo for f in formats.values()} - {None}
    return None if not algos else "MIXED_PRECISION" if len(algos) > 1 else algos.pop()


def verify_checkpoint(checkpoint: Path, formats: dict[str, str], check_files: bool = True, kv_cache: str | None = FROM_CONFIG) -> VerifyReport:
    """Check every layer in ``formats`` (name -> format) against the checkpoint's tensors and config,
    and its KV-cache scales; ``kv_cache``: the KV-cache format it must declare (None: none)."""
    checkpoint = Path(checkpoint)
    headers = read_headers(checkpoint)
    quant = read_quant_config(checkpoint)
    report = VerifyReport()
    if check_files:
        report.problems += _missing_files(checkpoint, bool(quant))
        changed = manifest_problems(checkpoint)
        report.hashed = changed is not None
        report.problems += changed or []
    expected_algo = expected_quant_algo(formats)
    if quant.get("quant_algo") != expected_algo:
        report.problems.append(f"hf_quant_config quant_algo is {quant.get('quant_algo')!r}, expected {expected_algo!r}")
    listed = quant.get("quantized_layers")
    formats = _per_linear(formats, headers)
    for name, fmt_name in formats.items():
        fmt = FORMATS[fmt_name]
        weight = headers.get(f"{name}.weight")
        if weight is None:
            report.problems.append(f"{name}: no weight tensor")
            continue
        out_f, in_f = logical_shape(fmt, weight.shape)
        bits = 0
        for stored in fmt.stored:
            key = f"{name}.{stored.suffix}"
            info = headers.get(key)
            if info is None:
                if not stored.optional:
                    report.problems.append(f"{name} ({fmt_name}): missing {stored.suffix}")
                continue
            want_shape = stored.shape(out_f, in_f)
            if info.dtype != stored.dtype or info.shape != want_shape:
                report.problems.append(
                    f"{name} ({fmt_name}): {stored.suffix} is {info.dtype}{list(info.shape)}, expected {stored.dtype}{list(want_shape)}"
                )
            elif stored.suffix in _SCALES and info.dtype == "U8":
                if (read_tensor(checkpoint, info, key) == _E8M0_NAN).any():
                    report.problems.append(f"{name} ({fmt_name}): {stored.suffix} has NaN (0xFF) E8M0 scales")
            elif stored.suffix in _SCALES:
                values = read_tensor(checkpoint, info, key).float()
                if not torch.isfinite(values).all() or not (values > 0).all():
                    report.problems.append(f"{name} ({fmt_name}): {stored.suffix} has non-finite or non-positive values")
            bits += DTYPE_BITS.get(info.dtype, 0) * math.prod(info.shape)
        if not fmt.quantized:
            extra = [s for s in ("weight_scale", "input_scale") if f"{name}.{s}" in headers]
            if extra:
                report.problems.append(f"{name} (BF16): unexpected quantization tensors {extra}")
        if listed is not None:
            entry = listed.get(_listed_as(name, listed), {}).get("quant_algo")
            if entry != fmt.hf_quant_algo:
                report.problems.append(f"{name}: hf_quant_config lists {entry!r}, expected {fmt.hf_quant_algo!r}")
        elif fmt.quantized and expected_algo == "MIXED_PRECISION":
            report.problems.append(f"{name}: not listed in hf_quant_config quantized_layers")
        report.layer_bits[name] = bits
        report.layer_params[name] = out_f * in_f
    report.problems += _kv_cache_problems(checkpoint, quant, headers, kv_cache, report)
    report.problems += _lm_head_problems(formats, quant, headers)
    return report


def _per_linear(formats: dict[str, str], headers: dict[str, TensorInfo]) -> dict[str, str]:
    """Each layer of ``formats``, a module that holds several linears standing for each of them
    (ModelOpt lists fused MoE experts once, as ``...experts``, and stores one linear per expert)."""
    expanded = {}
    for name, fmt in formats.items():
        inside = sorted({k.removesuffix(".weight") for k in headers if k.startswith(f"{name}.") and k.endswith(".weight")})
        expanded.update({name: fmt} if f"{name}.weight" in headers or not inside else dict.fromkeys(inside, fmt))
    return expanded


def _listed_as(name: str, listed: dict) -> str:
    """The hf_quant_config entry covering linear ``name``: its own, else its nearest listed ancestor."""
    parts = name.split(".")
    return next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in listed), name)


def _missing_files(checkpoint: Path, quantized: bool) -> list[str]:
    problems = []
    if not (checkpoint / "config.json").is_file():
        problems.append("missing config.json")
    elif quantized and "quantization_config" not in json.loads((checkpoint / "config.json").read_text()):
        problems.append("config.json has no quantization_config")
    if not any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        problems.append(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return problems


def _kv_cache_problems(checkpoint: Path, quant: dict, headers: dict[str, TensorInfo], expected: str | None, report: VerifyReport) -> list[str]:
    """A quantized KV cache needs a finite, positive float32 k_scale and v_scale for every attention
    layer; an unquantized one must have none."""
    kv_algo = quant.get("kv_cache_quant_algo")
    report.kv_cache = kv_algo
    problems = [] if expected == FROM_CONFIG or kv_algo == expected else [f"kv_cache_quant_algo is {kv_algo!r}, expected {expected!r}"]
    scales = [n for n in headers if n.endswith((".k_scale", ".v_scale"))]
    if kv_algo is None:
        return problems + (["KV-cache scales present but kv_cache_quant_algo is null"] if scales else [])
    if kv_algo not in KV_CACHE_FORMATS:
        return problems + [f"kv_cache_quant_algo {kv_algo!r} is not one autoq knows ({', '.join(KV_CACHE_FORMATS)})"]
    attention = sorted({n.removesuffix(".k_proj.weight") for n in headers if n.endswith(".k_proj.weight")})
    if not attention:
        return problems + [f"kv_cache_quant_algo is {kv_algo} but there are no attention layers (k_proj) to hold k_scale/v_scale"]
    for layer in attention:
        for key in (f"{layer}.k_proj.k_scale", f"{layer}.v_proj.v_scale"):
            info = headers.get(key)
            if info is None:
                problems.append(f"{layer}: kv_cache_quant_algo is {kv_algo} but k_scale/v_scale tensors are missing ({key})")
            elif info.dtype != "F32" or info.shape not in ((), (1,)):
                problems.append(f"{key} is {info.dtype}{list(info.shape)}, expected a float32 scalar")
            else:
                value = read_tensor(checkpoint, info, key).float()
                if not torch.isfinite(value).all() or not (value > 0).all():
                    problems.append(f"{key} is not finite and positive")
    report.kv_layers = len(attention)
    return problems


def _lm_head_problems(formats: dict[str, str], quant: dict, headers: dict[str, TensorInfo]) -> list[str]:
    """The LM head is either checked as a planned layer or must be stored unquantized."""
    if "lm_head" in formats or "lm_head.weight" not in headers:
        return []
    problems = []
    if headers["lm_head.weight"].dtype not in ("BF16", "F16", "F32"):
        problems.append(f"lm_head is not planned but stored as {headers['lm_head.weight'].dtype}")
    if "lm_head" in (quant.get("quantized_layers") or {}):
        problems.append("lm_head is not planned but hf_quant_config lists it as quantized")
    return problems


def reference_errors(checkpoint: Path, formats: dict[str, str], reference: Path) -> dict[str, float]:
    """Per-layer relative error ||W_dequantized - W_bf16|| / ||W_bf16||, one layer in memory at a time.

    AWQ and SmoothQuant layers store ``W / p`` (p per input channel); where ``p`` is not in the
    checkpoint (AWQ's, folded into the preceding norm) it is fitted per channel by least squares
    before comparing.
    """
    headers = read_headers(checkpoint)
    ref_headers = read_headers(reference)
    errors = {}
    for name, fmt_name in formats.items():
        key = f"{name}.weight"
        if key not in ref_headers:
            raise AutoqError(f"reference model {reference} has no tensor {key}")
        ref = read_tensor(reference, ref_headers[key], key).float()
        fmt = FORMATS[fmt_name]
        tensors = read_layer_tensors(checkpoint, name, headers)
        weight = dequantize_weight(fmt, tensors)
        if fmt.pre_scaled:
            scale = tensors.get("pre_quant_scale")
            if scale is not None:
                weight = weight * scale.float()
            else:
                weight = weight * ((weight * ref).sum(0) / (weight * weight).sum(0).clamp_min(1e-30))
        errors[name] = ((weight - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return errors
