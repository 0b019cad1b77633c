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


def _modelopt_export(fmt_name: str, weight: torch.Tensor, tensor_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What ModelOpt 0.47's exporter stores for ``weight`` (``_export_quantized_weight``'s functions,
    given the amax its calibration reaches: max |W|, per group for INT4)."""
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8, to_quantized_weight
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    amax = (weight.abs().amax() if tensor_amax is None else tensor_amax).float()
    kind = FORMATS[fmt_name].weight
    if kind == "fp8":
        scale = torch.tensor(amax.item() / 448.0)
        return {"weight": to_quantized_weight(weight, scale, "fp8"), "weight_scale": scale}
    if FORMATS[fmt_name].weight == "nvfp4":
        global_scale = amax / (6 * 448)
        block_scale = NVFP4QTensor.get_weights_scaling_factor(weight, 16, global_scale)[0]
        packed = NVFP4QTensor.quantize(weight, 16, block_scale, global_scale)[0]._quantized_data
        return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}
    group_amax = weight.float().reshape(weight.shape[0], -1, 128).abs().amax(-1)
    scale = torch.where(group_amax == 0, torch.full_like(group_amax, 7.0), group_amax) / 7.0  # export_amax: 0 -> 7
    stored = {"weight": pack_int4_in_uint8(weight, scale, 128), "weight_scale": scale}
    if fmt_name == "W4A8":
        stored["weight_scale_2"] = amax / 448.0
    return stored


# Formats whose weights ModelOpt 0.47's exporter functions write (above); MXFP8 and INT8_SQ are
# checked against ModelOpt in tests/test_new_formats.py.
EXPORTED_BY_HELPER = [f for f in QUANTIZED if FORMATS[f].weight in ("fp8", "nvfp4", "int4")]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_name", EXPORTED_BY_HELPER)
@pytest.mark.parametrize("fused_amax", [False, True])
def test_encode_stores_what_modelopts_exporter_stores(fmt_name: str, dtype: torch.dtype, fused_amax: bool) -> None:
    """Every stored tensor byte for byte, except ModelOpt's FP8 codes of a bfloat16 weight: its
    exporter divides in bfloat16, rounding twice (one E4M3 step apart on 3.3% of these weights)."""
    weight = _weight(dtype)
    tensor_amax = weight.abs().amax().float() * 1.7 if fused_amax else None  # a fused group's larger amax
    ours, theirs = codec_for(FORMATS[fmt_name]).encode(weight, tensor_amax), _modelopt_export(fmt_name, weight, tensor_amax)
    assert set(ours) == set(theirs)
    for suffix in ours:
        if fmt_name == "FP8" and suffix == "weight" and dtype == torch.bfloat16:
            differ = ours["weight"].float() != theirs["weight"].float()
            assert differ.float().mean() < 0.05
            # The whole difference is the bfloat16 rounding of the quotient (ModelOpt's second rounding).
            single = (weight.float() / ours["weight_scale"]).to(torch.float8_e4m3fn)
            double = (weight.float() / ours["weight_scale"]).to(torch.bfloat16).to(torch.float8_e4m3fn)
            assert _same_bytes(ours["weight"], single) and _same_bytes(theirs["weight"], double)
            continue
        assert _same_bytes(ours[suffix], theirs[suffix]), suffix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_name", QUANTIZED)
@pytest.mark.parametrize("fused_amax", [False, True])
def test_decode_of_encode_is_the_fake_quantized_weight_but_for_exact_ties(fmt_name: str, dtype: torch.dtype, fused_amax: bool) -> None:
    """The runtime's weight (codes times ModelOpt's stored scales) against fake quantization (codes
    divided by the reciprocal scale it multiplies with): NVFP4 equal bit for bit; FP8 and INT4 differ
    only where ``W / scale`` is a rounding tie that the two roundings break apart (bfloat16 weights
    hit exact ties often: ~1% of FP8 codes here), by one quantization step, or by one float32 ulp of
    the scale (float32 only: bfloat16 rounds it away)."""
    fmt, weight, pre_quant_scale = FORMATS[fmt_name], _weight(dtype), _smoothing(fmt_name)
    smoothed = fmt.smooth(weight, pre_quant_scale)
    tensor_amax = smoothed.abs().amax().float() * 1.7 if fused_amax else None
    codec = codec_for(fmt)
    decoded = codec.decode(codec.encode(smoothed, tensor_amax), dtype).float()
    fake = fmt.quantize_weight(weight, pre_quant_scale, tensor_amax=tensor_amax).float()
    if fmt.weight in ("nvfp4", "mxfp8"):  # the stored scales are the multipliers fake quantization applies
        assert torch.equal(decoded, fake)
        return
    if fmt.weight == "int8":  # a stored multiplier against a divisor: the same codes, within one float32 ulp
        assert ((decoded - fake).abs() <= torch.finfo(torch.float32).eps * fake.abs()).all()
        return
    differ = decoded != fake
    ulp = (decoded - fake).abs() <= torch.finfo(torch.float32).eps * fake.abs()
    steps = differ & ~ulp
    assert steps.float().mean() < 0.02 and (dtype == torch.float32 or not (differ & ulp).any())
    # Where codes differ, by one step of the grid: an E4M3 step (an eighth of the value's binade) for
    # FP8 and W4A8's FP8 stage, one INT4 code for INT4.
    gap = (decoded - fake).abs()[steps]
    fp8_step = torch.maximum(decoded.abs(), fake.abs())[steps] / 8
    int4_step = codec.encode(smoothed, tensor_amax)["weight_scale"].repeat_interleave(128, dim=1)[steps] if fmt.weight == "int4" else 0
    allowed = {"fp8": fp8_step, "int4": int4_step + (fp8_step if fmt.activation == "fp8" else 0)}[fmt.weight]
    assert (gap <= allowed * 1.0001).all()


@pytest.mark.parametrize(("fmt_name", "max_code"), [("INT8_SQ", 127)])
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
