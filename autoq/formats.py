"""The format registry: every number format autoq can assign to a linear layer.

Each format knows
* how to fake-quantize a weight and an activation (pure torch, ``autoq.fakequant``),
* which ModelOpt preset configures it and which calibration algorithm it needs,
* exactly which tensors ModelOpt's unified HF export writes for it, and from that its honest
  storage cost in bits (weights, block scales and per-tensor scales all counted).

Bit costs are computed from the tensors the checkpoint really stores (ModelOpt 0.47), which
``tests/test_cli.py`` and ``tests/test_new_formats.py`` check against exported checkpoints.
Consequences: ModelOpt stores INT4 group scales as float32, so W4A8 and INT4_AWQ cost
4 + 32/128 = 4.25 bits per weight (plus a 16-bit AWQ pre-scale per input channel where it is
not folded into the preceding norm), not the 4 bits that ``mtq.auto_quantize`` counts; MXFP8
costs 8 + 8/32 = 8.25 (one E8M0 byte per 32 values); INT8_SQ 8 bits plus a float32 scale per
output channel and its 16-bit SmoothQuant pre-scale per input channel (never folded away).

The KV cache is not a layer format: ``KV_CACHE_FORMATS`` lists what ``--kv-cache`` can ask for.
Its cost is memory per cached element at run time, reported beside the weight bits and never
added to them (the checkpoint only gains two float32 scales per attention layer).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from autoq import fakequant
from autoq.errors import AutoqError

# Bits per element of each safetensors dtype a checkpoint may hold.
DTYPE_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F8_E4M3": 8, "U8": 8, "I8": 8}
# Activation quantization scales every input by its own dynamic block scales (nothing stored).
DYNAMIC_ACTIVATIONS = ("mxfp8",)

ShapeRule = Callable[[int, int], tuple[int, ...]]


@dataclass(frozen=True)
class StoredTensor:
    """One tensor the exporter writes for a quantized linear layer ``<layer>.<suffix>``."""

    suffix: str
    dtype: str  # safetensors dtype name
    shape: ShapeRule  # (out_features, in_features) -> tensor shape
    optional: bool = False  # the exporter may fold it away (AWQ pre-scale into a norm)

    def bits(self, out_features: int, in_features: int) -> int:
        return math.prod(self.shape(out_features, in_features)) * DTYPE_BITS[self.dtype]


def _scalar(_out: int, _in: int) -> tuple[int, ...]:
    return ()


@dataclass(frozen=True)
class Format:
    """A number format for one linear layer: weights, activations, storage and calibration."""

    name: str
    description: str
    weight: Literal["fp8", "nvfp4", "int4", "mxfp8", "int8"] | None
    activation: Literal["fp8", "nvfp4", "mxfp8", "int8"] | None
    weight_block: int | None  # elements per weight scale block along in_features (None: per tensor or per channel)
    awq: bool  # activation-aware per-channel pre-scaling of weights (AWQ-lite)
    calibration: Literal["max", "awq_lite", "smoothquant"] | None
    modelopt_preset: str | None  # name of the mtq preset whose quantizer entries we use
    hf_quant_algo: str | None  # value in hf_quant_config.json quantized_layers
    stored: tuple[StoredTensor, ...] = field(default=())

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    @property
    def pre_scaled(self) -> bool:
        """Whether calibration picks a per-input-channel pre-scale ``p`` (AWQ, SmoothQuant): the
        weight is stored as ``W / p`` and the activation multiplied by ``p``."""
        return self.awq or self.calibration == "smoothquant"

    @property
    def static_activation(self) -> bool:
        """Whether the activation is quantized with a calibrated static scale (``input_scale``)."""
        return self.activation is not None and self.activation not in DYNAMIC_ACTIVATIONS

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits the exported checkpoint spends on a linear of this shape (optional tensors too)."""
        return sum(t.bits(out_features, in_features) for t in self.stored)

    def effective_bits(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    def supports(self, out_features: int, in_features: int) -> bool:
        """Whether a linear of this shape can be stored in this format."""
        if self.weight_block and in_features % self.weight_block:
            return False
        if self.weight == "int4" and out_features % 2:  # two INT4 codes per byte along out
            return False
        if self.activation == "mxfp8" and in_features % fakequant.MXFP8_BLOCK:
            return False
        return not (self.activation == "nvfp4" and in_features % 16)

    @staticmethod
    def smooth(weight: torch.Tensor, pre_quant_scale: torch.Tensor | None) -> torch.Tensor:
        """``W / p`` per input channel, in float32 then back to the weight dtype (as ModelOpt folds it)."""
        if pre_quant_scale is None:
            return weight
        return (weight.float() * (1.0 / pre_quant_scale.float())).to(weight.dtype)

    def quantize_weight(
        self, weight: torch.Tensor, pre_quant_scale: torch.Tensor | None = None, tensor_amax: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fake-quantized weight as ModelOpt computes it after max (and AWQ) calibration.

        ``pre_quant_scale`` is AWQ's per-input-channel activation multiplier ``p`` (ModelOpt's
        ``input_quantizer.pre_quant_scale``): the weight is smoothed to ``W / p`` before it is
        quantized, and the activation is multiplied by ``p`` (see ``quantize_input``).
        ``tensor_amax`` overrides the per-tensor amax (FP8 scale, NVFP4 global scale, W4A8's FP8
        stage): the exporter sets it to the maximum over layers a runtime fuses. SmoothQuant's
        ``pre_quant_scale`` smooths the weight the same way.
        """
        w = self.smooth(weight, pre_quant_scale)
        return self._quantize_smoothed(w, w.abs().amax().float() if tensor_amax is None else tensor_amax.float())

    def quantize_weight_candidates(self, weight: torch.Tensor, pre_quant_scales: torch.Tensor) -> torch.Tensor:
        """``quantize_weight(weight, p)`` for every row ``p`` of ``pre_quant_scales`` (``[k, in]``),
        computed as one batch: ``[k, out, in]``, each slice equal to its own call (AWQ's grid)."""
        if self.weight != "int4":
            raise ValueError(f"{self.name}: AWQ candidates are INT4 weights")
        w = self.smooth(weight, pre_quant_scales[:, None, :])
        return self._quantize_smoothed(w, w.abs().amax(dim=(-2, -1), keepdim=True).float())

    def _quantize_smoothed(self, w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        if self.weight == "fp8":
            return fakequant.fp8_e4m3(w, amax)
        if self.weight == "nvfp4":
            return fakequant.nvfp4(w, amax, self.weight_block)
        if self.weight == "int4":
            q = fakequant.int_block(w, fakequant.int_block_amax(w, self.weight_block), 4, self.weight_block)
            if self.activation == "fp8":  # W4A8: INT4 values re-expressed on a per-tensor FP8 grid
                q = fakequant.fp8_e4m3(q, amax)
            return q
        if self.weight == "mxfp8":
            return fakequant.mxfp8(w, self.weight_block)
        if self.weight == "int8":  # per output channel: one block of the whole row
            return fakequant.int_block(w, fakequant.int_block_amax(w, w.shape[-1]), 8, w.shape[-1])
        return w

    def quantize_input(
        self, x: torch.Tensor, channel_amax: torch.Tensor | None, pre_quant_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fake-quantized activation, given the calibrated per-input-channel amax of ``x`` (None and
        unused where the activation's scales are dynamic, MXFP8)."""
        if self.activation in DYNAMIC_ACTIVATIONS:
            return fakequant.mxfp8(x, fakequant.MXFP8_BLOCK)
        if self.activation is None and pre_quant_scale is None:
            return x
        amax = channel_amax.float()
        if pre_quant_scale is not None:
            x = x * pre_quant_scale.to(x.dtype)
            amax = (channel_amax.to(x.dtype) * pre_quant_scale.float()).to(x.dtype).float()
        if self.activation == "fp8":
            return fakequant.fp8_e4m3(x, amax.amax())
        if self.activation == "nvfp4":
            return fakequant.nvfp4(x, amax.amax(), 16)
        if self.activation == "int8":
            return fakequant.int_tensor(x, amax.amax(), 8)
        return x

    def modelopt_quantizer_cfgs(self) -> dict[str, dict | list | None]:
        """ModelOpt quantizer attribute configs for ``weight_quantizer`` and ``input_quantizer``.

        Taken from ModelOpt's own preset (so the two stay in sync), ``None`` where disabled.
        """
        import modelopt.torch.quantization as mtq

        if self.modelopt_preset is None:
            return {"weight_quantizer": None, "input_quantizer": None}
        cfgs: dict[str, dict | list | None] = {}
        for quantizer in ("weight_quantizer", "input_quantizer"):
            entries = getattr(mtq, self.modelopt_preset)["quant_cfg"]
            entry = next((e for e in entries if e["quantizer_name"] == f"*{quantizer}"), {"enable": False})  # W4A16: no input entry
            cfgs[quantizer] = entry.get("cfg") if entry.get("enable", True) else None
        return cfgs

    def fingerprint(self) -> str:
        """Changes whenever the numerics or storage of the format change (score cache key)."""
        spec = [
            self.name, self.weight, self.activation, self.weight_block, self.awq,
            [(t.suffix, t.dtype, t.shape(4096, 4096)) for t in self.stored], fakequant.NUMERICS_VERSION,
        ]  # fmt: skip
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _weight(dtype: str) -> StoredTensor:
    return StoredTensor("weight", dtype, lambda o, i: (o, i))


_INPUT_SCALE = StoredTensor("input_scale", "F32", _scalar)
_WEIGHT_SCALE_2 = StoredTensor("weight_scale_2", "F32", _scalar)
_NVFP4_WEIGHT = (
    StoredTensor("weight", "U8", lambda o, i: (o, i // 2)),
    StoredTensor("weight_scale", "F8_E4M3", lambda o, i: (o, i // 16)),
    _WEIGHT_SCALE_2,
)
_INT4_PACKED = StoredTensor("weight", "U8", lambda o, i: (o // 2, i))
_INT4_GROUP_SCALES = StoredTensor("weight_scale", "F32", lambda o, i: (o, i // 128))
_AWQ_PRESCALE = StoredTensor("pre_quant_scale", "BF16", lambda o, i: (i,), optional=True)

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="BF16",
            description="unquantized 16-bit weights and activations",
            weight=None, activation=None, weight_block=None, awq=False, calibration=None,
            modelopt_preset=None, hf_quant_algo=None,
            stored=(_weight("BF16"),),
        ),
        Format(
            name="FP8",
            description="FP8 E4M3 weights and activations, per-tensor static scales",
            weight="fp8", activation="fp8", weight_block=None, awq=False, calibration="max",
            modelopt_preset="FP8_DEFAULT_CFG", hf_quant_algo="FP8",
            stored=(_weight("F8_E4M3"), StoredTensor("weight_scale", "F32", _scalar), _INPUT_SCALE),
        ),
        Format(
            name="NVFP4",
            description="E2M1 weights and activations, FP8-E4M3 scale per 16 values, FP32 global scale",
            weight="nvfp4", activation="nvfp4", weight_block=16, awq=False, calibration="max",
            modelopt_preset="NVFP4_DEFAULT_CFG", hf_quant_algo="NVFP4",
            stored=(*_NVFP4_WEIGHT, _INPUT_SCALE),
        ),
        Format(
            name="W4A8",
            description="INT4 weights (group 128, AWQ) with FP8 E4M3 activations",
            weight="int4", activation="fp8", weight_block=128, awq=True, calibration="awq_lite",
            modelopt_preset="W4A8_AWQ_BETA_CFG", hf_quant_algo="W4A8_AWQ",
            stored=(_INT4_PACKED, _INT4_GROUP_SCALES, _WEIGHT_SCALE_2, _INPUT_SCALE, _AWQ_PRESCALE),
        ),
        Format(
            name="INT4_AWQ",
            description="INT4 weights (group 128, AWQ), 16-bit activations (W4A16)",
            weight="int4", activation=None, weight_block=128, awq=True, calibration="awq_lite",
            modelopt_preset="INT4_AWQ_CFG", hf_quant_algo="W4A16_AWQ",
            stored=(_INT4_PACKED, _INT4_GROUP_SCALES, _AWQ_PRESCALE),
        ),
        Format(
            name="W4A16_NVFP4",
            description="NVFP4 weights (E2M1, FP8-E4M3 scale per 16, FP32 global scale) with 16-bit activations",
            weight="nvfp4", activation=None, weight_block=16, awq=False, calibration="max",
            modelopt_preset="W4A16_NVFP4_CFG", hf_quant_algo="W4A16_NVFP4",
            stored=_NVFP4_WEIGHT,
        ),
        Format(
            name="MXFP8",
            description="FP8 E4M3 weights and activations, E8M0 power-of-two scale per 32 values (both dynamic)",
            weight="mxfp8", activation="mxfp8", weight_block=32, awq=False, calibration="max",
            modelopt_preset="MXFP8_DEFAULT_CFG", hf_quant_algo="MXFP8",
            stored=(_weight("F8_E4M3"), StoredTensor("weight_scale", "U8", lambda o, i: (o, i // 32))),
        ),
        Format(
            name="INT8_SQ",
            description="INT8 weights (per channel) and activations (per tensor, static), SmoothQuant pre-scaled",
            weight="int8", activation="int8", weight_block=None, awq=False, calibration="smoothquant",
            modelopt_preset="INT8_SMOOTHQUANT_CFG", hf_quant_algo="W8A8_SQ_PER_CHANNEL",
            stored=(
                _weight("I8"), StoredTensor("weight_scale", "F32", lambda o, i: (o,)), _INPUT_SCALE,
                StoredTensor("pre_quant_scale", "BF16", lambda o, i: (i,)),
            ),
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class KVCacheFormat:
    """A KV-cache quantization ModelOpt calibrates (one static scale per K and per V of each attention
    layer, stored as ``<attention>.k_proj.k_scale`` / ``v_proj.v_scale`` = amax / 448)."""

    name: str
    element: Literal["fp8", "nvfp4"]
    bits_per_element: float  # cache memory at run time (NVFP4: 4-bit values + an FP8 scale per 16)
    modelopt_preset: str  # mtq preset whose "*[kv]_bmm_quantizer" entry configures it
    hf_quant_algo: str  # hf_quant_config.json kv_cache_quant_algo

    def modelopt_quant_cfg(self) -> list[dict]:
        import modelopt.torch.quantization as mtq

        return list(getattr(mtq, self.modelopt_preset)["quant_cfg"])

    def quantize(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """Fake-quantized keys or values (last dimension: the head dimension), as ModelOpt's k/v quantizers."""
        if self.element == "fp8":
            return fakequant.fp8_e4m3(x, amax)
        return fakequant.nvfp4(x, amax, 16)


KV_CACHE_FORMATS: dict[str, KVCacheFormat] = {
    "FP8": KVCacheFormat("FP8", "fp8", 8.0, "FP8_KV_CFG", "FP8"),
    "NVFP4": KVCacheFormat("NVFP4", "nvfp4", 4.5, "NVFP4_KV_CFG", "NVFP4"),
}
KV_CACHE_SCALE_TO_AMAX = fakequant.FP8_E4M3_MAX  # ModelOpt exports k/v scales as amax / 448 for both


def get_kv_cache_format(name: str | None) -> KVCacheFormat | None:
    """``--kv-cache`` value (none, fp8, nvfp4; any case) -> its format, None for none."""
    if name is None or name.lower() == "none":
        return None
    try:
        return KV_CACHE_FORMATS[name.upper()]
    except KeyError:
        raise AutoqError(f"unknown KV-cache format '{name}'; choose none, {', '.join(k.lower() for k in KV_CACHE_FORMATS)}") from None


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise AutoqError(f"unknown format '{name}'; known formats: {', '.join(FORMATS)}") from None


def average_bits(formats: dict[str, str], shapes: dict[str, tuple[int, int]]) -> float:
    """Stored bits per weight of layers ``shapes`` (name -> (out, in)) in ``formats`` (missing: BF16)."""
    total = sum(FORMATS[formats.get(name, "BF16")].storage_bits(out, inp) for name, (out, inp) in shapes.items())
    return total / sum(out * inp for out, inp in shapes.values())


def format_for_hf_quant_algo(quant_algo: str) -> Format:
    """The registry format that ModelOpt's export labels ``quant_algo`` (e.g. ``W4A8_AWQ``)."""
    for fmt in FORMATS.values():
        if fmt.hf_quant_algo == quant_algo:
            return fmt
    raise AutoqError(f"checkpoint uses quant_algo '{quant_algo}', which autoq has no format for")
