"""Checkpoint tensors: reading safetensors files, and each weight format's stored form.

One codec per weight kind, in the style of ModelOpt's ``qtensor`` package: ``encode`` turns a
(smoothed) float weight into the tensors ModelOpt's unified HF export stores for it, ``decode``
turns those back into the float weight a runtime computes with (codes times stored scales).

* FP8: ``weight`` (E4M3) times the per-tensor ``weight_scale``.
* NVFP4: two E2M1 codes per byte (low nibble first, bit 3 = sign) times the FP8-E4M3 block scale
  (one per 16 values) times the FP32 ``weight_scale_2``.
* INT4 (W4A8, INT4_AWQ): two signed codes per byte packed along the output dimension (row 2r in
  the low nibble, 2r+1 in the high one) times the per-group-of-128 FP32 ``weight_scale``. W4A8
  then re-expresses the values on the per-tensor FP8 grid whose scale is ``weight_scale_2``.
* NVFP4 weights without activation quantization (W4A16_NVFP4): the NVFP4 codec.
* MXFP8: ``weight`` (E4M3) times ``2^(e - 127)`` for the block's E8M0 ``weight_scale`` byte ``e``
  (one per 32 values along the input dimension).
* INT8 (INT8_SQ): ``weight`` (int8) times the per-output-channel FP32 ``weight_scale``.

``encode`` stores the scales exactly as ModelOpt 0.47's exporter computes them (``amax`` divided by
the largest code; a zero amax gives scale 1) and the codes nearest ``W / scale`` in float32: the
grid a runtime computes on. That is the exporter's arithmetic byte for byte, except that its FP8
path divides in the model dtype (bfloat16) before casting, rounding twice; autoq rounds once.
Fake quantization (``Format.quantize_weight``) multiplies by the reciprocal scale instead, so
``decode(encode(W))`` equals it except where ``W / scale`` and ``W * (1 / scale)`` fall on two sides
of a rounding boundary (tests/test_codec.py measures how rarely).
MXFP8 stores the E8M0 exponents and E4M3 codes fake quantization computes (bit for bit); INT8_SQ
stores the per-channel multiplier ``1 / scale`` (its codes equal fake quantization's, values within
one float32 ulp).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from autoq import fakequant
from autoq.errors import AutoqError, first_line
from autoq.formats import Format

# ---------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    shard: str  # file name inside the checkpoint directory


def shard_names(checkpoint: Path) -> list[str]:
    """The safetensors files of a checkpoint: those its index names, else every ``*.safetensors``."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise AutoqError(f"checkpoint {checkpoint} is not a directory")
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise AutoqError(f"{index} is not a safetensors index (no weight_map)") from None
    else:
        shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not shards:
        raise AutoqError(f"{checkpoint}: no safetensors files")
    missing = [s for s in shards if not (checkpoint / s).is_file()]
    if missing:
        raise AutoqError(f"{checkpoint}: shard {missing[0]} named in the index is missing")
    return shards


def read_headers(checkpoint: Path) -> dict[str, TensorInfo]:
    """Name -> dtype/shape/shard of every tensor in a (possibly sharded) checkpoint; reads no data."""
    infos = {}
    for shard in shard_names(checkpoint):
        with _opened(Path(checkpoint) / shard) as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                infos[name] = TensorInfo(view.get_dtype(), tuple(view.get_shape()), shard)
    return infos


def read_tensor(checkpoint: Path, info: TensorInfo, name: str) -> torch.Tensor:
    with _opened(Path(checkpoint) / info.shard) as handle:
        return handle.get_tensor(name)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator:
    """A safetensors file opened for reading; a damaged one (bad header, offsets past its end) is one error."""
    from safetensors import SafetensorError

    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        raise AutoqError(f"{path} is not a valid safetensors file ({first_line(err)})") from None


def read_layer_tensors(checkpoint: Path, name: str, headers: Mapping[str, TensorInfo] | None = None) -> dict[str, torch.Tensor]:
    """All tensors ``<name>.<suffix>`` of one layer, keyed by suffix, from whichever shard holds them."""
    headers = headers or read_headers(checkpoint)
    return {
        key.rpartition(".")[2]: read_tensor(checkpoint, info, key) for key, info in headers.items() if key.rpartition(".")[0] == name
    }


def logical_shape(fmt: Format, weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out_features, in_features) of a layer from the shape of its stored (maybe packed) weight."""
    rule = next(t for t in fmt.stored if t.suffix == "weight").shape
    unit = rule(2, 2)  # how a 2x2 weight is stored reveals the packing
    return weight_shape[0] * 2 // unit[0], weight_shape[1] * 2 // unit[1]


# --------------------------------------------------------------------------------------- codecs

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _tensor_amax(weight: torch.Tensor, tensor_amax: torch.Tensor | None) -> torch.Tensor:
    return (weight.abs().amax() if tensor_amax is None else tensor_amax).float()


def stored_scale(amax: torch.Tensor, largest_code: float) -> torch.Tensor:
    """``amax / largest_code`` in float32, as ModelOpt's exporter stores scales; a zero amax (an
    all-zero tensor or group) gives 1, as ModelOpt's ``export_amax`` makes it."""
    amax = amax.float()
    return torch.where(amax == 0, torch.full_like(amax, largest_code), amax) / largest_code


def input_scale(fmt: Format, amax: torch.Tensor) -> torch.Tensor:
    """The stored ``input_scale`` of a layer whose calibrated input amax is ``amax`` (FP8: amax / 448,
    NVFP4: amax / (6 * 448))."""
    return stored_scale(amax.reshape(()), ACTIVATION_LARGEST_CODE[fmt.activation])


# Largest code of each activation grid: input_scale = amax / it.
ACTIVATION_LARGEST_CODE = {"fp8": fakequant.FP8_E4M3_MAX, "nvfp4": fakequant.FP4_E2M1_MAX * fakequant.FP8_E4M3_MAX, "int8": 127.0}


class WeightCodec(ABC):
    """The stored form of one weight format in a unified HF checkpoint."""

    @abstractmethod
    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors (by suffix: ``weight``, ``weight_scale``, ...) of ``weight``.

        ``weight`` is the weight as quantized: for AWQ formats already smoothed (``Format.smooth``).
        ``tensor_amax`` overrides the per-tensor amax, as for layers a runtime fuses.
        """

    @abstractmethod
    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight a runtime computes from the stored tensors, in ``dtype`` (the model's)."""


class FP8Codec(WeightCodec):
    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # ModelOpt: torch.tensor(amax.item() / 448), the quotient taken in double and rounded once to float32.
        amax = _tensor_amax(weight, tensor_amax).double()
        scale = stored_scale(amax, fakequant.FP8_E4M3_MAX).float()
        codes = (weight.float() / scale).clamp(-fakequant.FP8_E4M3_MAX, fakequant.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        return {"weight": codes, "weight_scale": scale}

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (stored["weight"].float() * stored["weight_scale"].float()).to(dtype)


class NVFP4Codec(WeightCodec):
    def __init__(self, block: int = 16):
        self.block = block

    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out_features, in_features = weight.shape
        global_scale = stored_scale(_tensor_amax(weight, tensor_amax), fakequant.FP4_E2M1_MAX * fakequant.FP8_E4M3_MAX)
        blocks = weight.float().reshape(out_features, in_features // self.block, self.block)
        # ModelOpt's NVFP4QTensor: block amax / (6 * global scale), zero -> 1, clamped to E4M3's [2^-9, 448].
        block_scale = blocks.abs().amax(-1) / (fakequant.FP4_E2M1_MAX * global_scale)
        block_scale = torch.where(block_scale == 0, torch.ones_like(block_scale), block_scale)
        block_scale = block_scale.clamp(min=2.0**-9, max=fakequant.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        scaled = blocks / (block_scale.float() * global_scale).unsqueeze(-1)
        magnitude = fakequant.round_to_e2m1(scaled.abs()).reshape(out_features, in_features)
        codes = torch.searchsorted(E2M1_VALUES[:8].to(weight.device), magnitude).to(torch.uint8)
        codes |= (weight.float() < 0).to(torch.uint8) << 3
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = stored["weight"]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
        values = E2M1_VALUES.to(packed.device)[codes.long()]
        # Same association as fake quantization: value * (block scale * global scale).
        scales = stored["weight_scale"].float() * stored["weight_scale_2"].float()
        return (values * scales.repeat_interleave(self.block, dim=1)).to(dtype)


class INT4Codec(WeightCodec):
    """INT4 per group of ``block`` input channels; ``fp8_stage``: W4A8's per-tensor FP8 re-expression."""

    def __init__(self, block: int = 128, fp8_stage: bool = False):
        self.block, self.fp8_stage = block, fp8_stage

    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out_features, in_features = weight.shape
        if in_features % self.block:
            raise ValueError(f"INT4 needs in_features ({in_features}) divisible by {self.block}")
        scale = stored_scale(fakequant.int_block_amax(weight, self.block), 7.0)  # (out, groups, 1)
        blocks = weight.float().reshape(out_features, in_features // self.block, self.block)
        codes = (blocks / scale).round().clamp(-8, 7).reshape(weight.shape)
        codes = (codes.to(torch.int16) & 0x0F).to(torch.uint8)
        stored = {"weight": codes[0::2] | (codes[1::2] << 4), "weight_scale": scale.squeeze(-1)}
        if self.fp8_stage:
            stored["weight_scale_2"] = stored_scale(_tensor_amax(weight, tensor_amax), fakequant.FP8_E4M3_MAX)
        return stored

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed = stored["weight"]
        low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
        codes = torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, packed.shape[1])
        codes = torch.where(codes > 7, codes - 16, codes)
        values = (codes.float() * stored["weight_scale"].float().repeat_interleave(self.block, dim=1)).to(dtype)
        if self.fp8_stage:  # re-expressed on the FP8 grid whose multiplier is weight_scale_2, as the FP8 GEMM sees it
            multiplier = stored["weight_scale_2"].float()
            codes8 = (values.float() * (1.0 / multiplier)).clamp(-fakequant.FP8_E4M3_MAX, fakequant.FP8_E4M3_MAX)
            values = (codes8.to(torch.float8_e4m3fn).float() * multiplier).to(dtype)
        return values


class MXFP8Codec(WeightCodec):
    def __init__(self, block: int = fakequant.MXFP8_BLOCK):
        self.block = block

    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        exponents = fakequant.mxfp8_exponents(weight, self.block)  # no per-tensor scale: tensor_amax plays no part
        return {"weight": fakequant.mxfp8_codes(weight, exponents, self.block), "weight_scale": exponents}

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fakequant.mxfp8_decode(stored["weight"], stored["weight_scale"], self.block).to(dtype)


class INT8Codec(WeightCodec):
    """INT8 with one scale per output channel (ModelOpt's ``axis=0`` weight quantizer)."""

    def encode(self, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        in_features = weight.shape[-1]
        scale, codes = fakequant.int_block_codes(weight, fakequant.int_block_amax(weight, in_features), 8, in_features)
        return {"weight": codes.reshape(weight.shape).to(torch.int8), "weight_scale": (1.0 / scale.double()).float().reshape(-1)}

    def decode(self, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (stored["weight"].float() * stored["weight_scale"].float().unsqueeze(-1)).to(dtype)


def codec_for(fmt: Format) -> WeightCodec:
    if fmt.weight == "fp8":
        return FP8Codec()
    if fmt.weight == "nvfp4":
        return NVFP4Codec(fmt.weight_block)
    if fmt.weight == "int4":
        return INT4Codec(fmt.weight_block, fp8_stage=fmt.activation == "fp8")
    if fmt.weight == "mxfp8":
        return MXFP8Codec(fmt.weight_block)
    if fmt.weight == "int8":
        return INT8Codec()
    raise AutoqError(f"format {fmt.name} stores no quantized weight")


def dequantize_weight(fmt: Format, stored: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of one layer from its stored tensors, in ``dtype`` (BF16 layers: the weight itself)."""
    return codec_for(fmt).decode(stored, dtype) if fmt.quantized else stored["weight"].to(dtype)
