"""Per-format encode/decode (autoq.codec) against the registry's fake quantization."""

from __future__ import annotations

import pytest
import torch

from autoq.codec import codec_for
from autoq.formats import FORMATS

QUANTIZED = [name for name, fmt in FORMATS.items() if fmt.quantized]


def _weight(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A 384 x 512 weight with uneven channels, a zero group and a zero block, like trained layers have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(384, 512, generator=generator) * torch.rand(1, 512, generator=generator) * 3
    weight[7, :128] = 0.0  # an all-zero INT4 group / NVFP4 blocks
    weight[9, 16:32] = 1e-7  # a block whose NVFP4 scale underflows
    return weight.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor, signed_zero: bool) -> bool:
    """Bit-for-bit equality; without ``signed_zero``, -0.0 and 0.0 count as equal (INT4 has no -0)."""
    as_int = torch.int16 if a.element_size() == 2 else torch.int32
    if not signed_zero:
        a, b = a + 0.0, b + 0.0  # -0.0 + 0.0 == +0.0
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_name", QUANTIZED)
def test_stored_tensors_have_the_registry_layout(fmt_name: str, dtype: torch.dtype) -> None:
    fmt = FORMATS[fmt_name]
    stored = codec_for(fmt).encode(_weight(dtype))
    dtypes = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8", torch.float32: "F32", torch.int8: "I8"}
    expected = {t.suffix: (t.dtype, t.shape(384, 512)) for t in fmt.stored if t.suffix not in ("input_scale", "pre_quant_scale")}
    assert {k: (dtypes[v.dtype], tuple(v.shape)) for k, v in stored.items()} == expected


def _smoothing(fmt_name: str) -> torch.Tensor | None:
    """A pre-scale for the AWQ and SmoothQuant formats (they quantize W / p)."""
    return torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.5 if FORMATS[fmt_name].pre_scaled else None


# Integer formats divide by a float32 scale: exact in bfloat16, within one float32 ulp in float32 (below).
INTEGER_WEIGHTS = ("INT4_AWQ", "INT8_SQ")
EXACT = [(f, torch.bfloat16) for f in QUANTIZED] + [(f, torch.float32) for f in QUANTIZED if f not in INTEGER_WEIGHTS]


@pytest.mark.parametrize(("fmt_name", "dtype"), EXACT)
@pytest.mark.parametrize("fused_amax", [False, True])
def test_decode_of_encode_is_the_fake_quantized_weight_bit_for_bit(fmt_name: str, dtype: torch.dtype, fused_amax: bool) -> None:
    fmt, weight, pre_quant_scale = FORMATS[fmt_name], _weight(dtype), _smoothing(fmt_name)
    smoothed = fmt.smooth(weight, pre_quant_scale)
    tensor_amax = smoothed.abs().amax().float() * 1.7 if fused_amax else None  # a fused group's larger amax
    codec = codec_for(fmt)
    decoded = codec.decode(codec.encode(smoothed, tensor_amax), dtype)
    integer = fmt.weight in ("int4", "int8")
    assert _same_bits(decoded, fmt.quantize_weight(weight, pre_quant_scale, tensor_amax=tensor_amax), signed_zero=not integer)


@pytest.mark.parametrize(("fmt_name", "max_code"), [("INT4_AWQ", 7), ("INT8_SQ", 127)])
def test_integer_weights_in_float32_have_the_same_codes_within_one_ulp(fmt_name: str, max_code: int) -> None:
    """Integer fake quantization divides each code by a float32 scale; a checkpoint stores one float32
    multiplier per group (per channel for INT8), which cannot reproduce every quotient's rounding (3% of
    these weights in INT4, 20% in INT8 land one float32 ulp away; bfloat16, the models' dtype, rounds
    that away: exact above)."""
    fmt, weight, pre_quant_scale = FORMATS[fmt_name], _weight(torch.float32), _smoothing(fmt_name)
    codec = codec_for(fmt)
    stored = codec.encode(fmt.smooth(weight, pre_quant_scale))
    decoded, fake = codec.decode(stored), fmt.quantize_weight(weight, pre_quant_scale)
    assert ((decoded - fake).abs() <= torch.finfo(torch.float32).eps * fake.abs()).all()
    assert 0 < (decoded != fake).float().mean() < 0.3
    group = 128 if fmt.weight == "int4" else weight.shape[1]
    group_scale = stored["weight_scale"].reshape(weight.shape[0], -1).repeat_interleave(group, dim=1)
    codes = torch.round(fake / group_scale)
    assert torch.equal(codes, torch.round(decoded / group_scale)) and codes.abs().max() == max_code
