"""The format registry: every number format autoq can assign to a linear layer.

Each format knows
* how to fake-quantize a weight and an activation (pure torch, ``autoq.fakequant``),
* which ModelOpt preset configures it and which calibration algorithm it needs,
* exactly which tensors ModelOpt's unified HF export writes for it, and from that its honest
  storage cost in bits (weights, block scales and per-tensor scales all counted).

Bit costs are computed from the tensors the checkpoint really stores (ModelOpt 0.47), which
``tests/test_apply_export.py`` checks against an exported checkpoint.  Two consequences:
ModelOpt stores INT4 group scales as float32, so W4A8 and INT4_AWQ cost 4 + 32/128 = 4.25
bits per weight (plus a 16-bit AWQ pre-scale per input channel where it is not folded into
the preceding norm), not the 4 bits that ``mtq.auto_quantize`` counts.
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
    weight: Literal["fp8", "nvfp4", "int4"] | None
    activation: Literal["fp8", "nvfp4"] | None
    weight_block: int | None  # elements per weight scale block along in_features
    awq: bool  # activation-aware per-channel pre-scaling of weights (AWQ-lite)
    calibration: Literal["max", "awq_lite"] | None
    modelopt_preset: str | None  # name of the mtq preset whose quantizer entries we use
    hf_quant_algo: str | None  # value in hf_quant_config.json quantized_layers
    stored: tuple[StoredTensor, ...] = field(default=())

    @property
    def quantized(self) -> bool:
        return self.weight is not None

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Bits the exported checkpoint spends on a linear of this shape (optional tensors too)."""
        return sum(t.bits(out_features, in_features) for t in self.stored)

    def effective_bits(self, out_features: int, in_features: int) -> float:
        return self.storage_bits(out_features, in_features) / (out_features * in_features)

    def supports(self, out_features: int, in_features: int) -> bool:
        """Whether a linear of this shape can be stored in this format."""
        if self.weight in ("nvfp4", "int4") and in_features % self.weight_block:
            return False
        if self.weight == "int4" and out_features % 2:  # two INT4 codes per byte along out
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
        stage): the exporter sets it to the maximum over layers a runtime fuses.
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
        return w

    def quantize_input(
        self, x: torch.Tensor, channel_amax: torch.Tensor, pre_quant_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fake-quantized activation, given the calibrated per-input-channel amax of ``x``."""
        amax = channel_amax.float()
        if pre_quant_scale is not None:
            x = x * pre_quant_scale.to(x.dtype)
            amax = (channel_amax.to(x.dtype) * pre_quant_scale.float()).to(x.dtype).float()
        if self.activation == "fp8":
            return fakequant.fp8_e4m3(x, amax.amax())
        if self.activation == "nvfp4":
            return fakequant.nvfp4(x, amax.amax(), 16)
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
            entry = next(
                e for e in getattr(mtq, self.modelopt_preset)["quant_cfg"] if e["quantizer_name"] == f"*{quantizer}"
            )
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
            stored=(
                StoredTensor("weight", "U8", lambda o, i: (o, i // 2)),
                StoredTensor("weight_scale", "F8_E4M3", lambda o, i: (o, i // 16)),
                _WEIGHT_SCALE_2,
                _INPUT_SCALE,
            ),
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
    )
}  # fmt: skip


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
