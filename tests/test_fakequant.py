"""Pure-torch fake quantization against ModelOpt's own (CPU) and an independent reference."""

from __future__ import annotations

import modelopt.torch.quantization as mtq
import pytest
import torch

from autoq import fakequant
from autoq.formats import FORMATS


def _modelopt_linear(fmt_name: str, seed: int = 0):
    """A bf16 linear with uneven channels, quantized and calibrated by ModelOpt as ``fmt_name``."""
    torch.manual_seed(seed)
    fmt = FORMATS[fmt_name]
    net = torch.nn.Sequential(torch.nn.Linear(256, 384, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        net[0].weight.mul_((torch.rand(1, 256) * 4).to(torch.bfloat16))
    batches = [(torch.randn(4, 32, 256) * torch.rand(256) * 3).to(torch.bfloat16) for _ in range(4)]
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    quant_cfg += [{"quantizer_name": f"*{q}", "cfg": c} for q, c in fmt.modelopt_quantizer_cfgs().items() if c is not None]
    algorithm = {"method": "awq_lite", "alpha_step": 0.1} if fmt.awq else "max"
    mtq.quantize(net, {"quant_cfg": quant_cfg, "algorithm": algorithm}, lambda m: [m(x) for x in batches])
    return net[0], batches[0]


@pytest.mark.parametrize("fmt_name", ["FP8", "W4A8", "INT4_AWQ"])
def test_bit_exact_with_modelopt_on_cpu(fmt_name: str) -> None:
    fmt = FORMATS[fmt_name]
    layer, x = _modelopt_linear(fmt_name)
    with torch.no_grad():
        # ModelOpt folds AWQ's 1/pre_quant_scale into the weight; we quantize that same weight.
        assert torch.equal(fmt.quantize_weight(layer.weight), layer.weight_quantizer(layer.weight))
        pre_quant_scale = layer.input_quantizer.pre_quant_scale
        scaled = x * pre_quant_scale if pre_quant_scale is not None else x
        ours_x = scaled
        if fmt.activation is not None:
            ours_x = fmt.quantize_input(scaled, layer.input_quantizer.amax.float().reshape(1))
        assert torch.equal(ours_x, layer.input_quantizer(x))
        assert torch.equal(torch.nn.functional.linear(ours_x, fmt.quantize_weight(layer.weight)), layer(x))
    if fmt.awq:  # AWQ really ran: a non-trivial per-channel scale
        assert pre_quant_scale is not None and pre_quant_scale.float().std() > 0


def _e2m1_reference(magnitude: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to the even code, computed independently in float64."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    distance = (magnitude.double().unsqueeze(-1) - grid).abs()
    best = distance.min(-1, keepdim=True).values
    candidates = (distance == best).int() * (torch.arange(8) + 1)  # 1-based code indices of the nearest
    lowest = torch.where(candidates > 0, candidates, 99).min(-1).values - 1
    highest = candidates.max(-1).values - 1
    code = torch.where((lowest % 2 == 0) | (lowest == highest), lowest, highest)
    return grid[code]


def _with_neighbours(values: torch.Tensor, ulps: int = 3) -> torch.Tensor:
    """``values`` and their ``ulps`` nearest float32 neighbours on each side."""
    out, up, down = [values], values, values
    for _ in range(ulps):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(-float("inf")))
        out += [up, down]
    return torch.cat(out)


def test_e2m1_rounding_matches_reference_including_ties() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert fakequant.round_to_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    edges = _with_neighbours(torch.cat([grid, ties]))
    values = torch.cat([edges, torch.rand(10_000) * 7, torch.tensor([6.0, 100.0, 1e-40])]).abs()
    reference = _e2m1_reference(values.clamp(max=6.0))
    assert torch.equal(fakequant.round_to_e2m1(values).double(), reference)
    assert torch.equal(fakequant.round_to_e2m1(-values).double(), -reference)  # symmetric


def test_e4m3_rounding_equals_torch_float8_conversion() -> None:
    """The FP8 rounding done in float32 equals the float8_e4m3fn cast bit for bit: every code, every
    midpoint between codes (ties to even), their float32 neighbours, subnormals and signed zeros."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].unique()
    midpoints = (codes[1:] + codes[:-1]) / 2
    torch.manual_seed(0)
    randoms = torch.cat([torch.rand(100_000) * 896 - 448, torch.randn(100_000) * 1e-3, torch.tensor([0.0, -0.0, 1e-45, -1e-45])])
    values = torch.cat([_with_neighbours(torch.cat([codes, midpoints])), randoms]).clamp(-448, 448)
    ours = fakequant._round_to_e4m3(values)
    assert torch.equal(ours.view(torch.int32), values.to(torch.float8_e4m3fn).float().view(torch.int32))


@pytest.mark.parametrize("fmt_name", ["W4A8", "INT4_AWQ"])
def test_weight_candidates_equal_one_call_each(fmt_name: str) -> None:
    torch.manual_seed(0)
    fmt = FORMATS[fmt_name]
    weight = (torch.randn(64, 256) * torch.rand(256)).to(torch.bfloat16)
    pre_quant_scales = torch.rand(5, 256) * 3 + 0.1
    batched = fmt.quantize_weight_candidates(weight, pre_quant_scales)
    assert batched.shape == (5, 64, 256)
    for candidate, scale in zip(batched, pre_quant_scales):
        assert torch.equal(candidate, fmt.quantize_weight(weight, scale))


def test_awq_grid_batched_picks_the_same_scale() -> None:
    from autoq import awq

    torch.manual_seed(0)
    weight = (torch.randn(96, 384) * torch.rand(384) * 0.1).to(torch.bfloat16)
    x = (torch.randn(256, 384) * torch.rand(384) * 4).to(torch.bfloat16)
    act_scale = x.float().abs().mean(0)
    one_by_one, alpha = awq.search_pre_quant_scale(FORMATS["W4A8"], weight, act_scale, x, batch_elements=0)
    batched, batched_alpha = awq.search_pre_quant_scale(FORMATS["W4A8"], weight, act_scale, x, batch_elements=1 << 26)
    assert torch.equal(one_by_one, batched) and alpha == batched_alpha
    assert one_by_one.std() > 0  # a real choice was made, not the alpha-0 identity


def test_nvfp4_blocks_use_fp8_scales_and_e2m1_values() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.float32)
    amax = x.abs().amax()
    q = fakequant.nvfp4(x, amax)
    scales = fakequant.nvfp4_block_scales(x, amax)
    global_scale = amax / (6 * 448)
    # Block scales are FP8-E4M3 numbers times the global scale ...
    fp8_codes = scales / global_scale
    assert torch.allclose(fp8_codes, fp8_codes.to(torch.float8_e4m3fn).float(), rtol=1e-6)
    # ... and every value is an E2M1 grid point times its block scale.
    ratio = (q.reshape(8, 4, 16).abs() / scales)
    assert torch.allclose(ratio, fakequant.round_to_e2m1(ratio), atol=1e-5)
    assert (q - x).abs().max() <= scales.max() * 1.0 + 1e-6  # error at most one grid step
    assert (q - x).abs().mean() > 0


def test_nvfp4_weight_equals_modelopt_export_packing() -> None:
    """ModelOpt's NVFP4 export (CPU) dequantizes to exactly our fake-quantized weight."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(0)
    weight = (torch.randn(96, 256) * torch.rand(256) * 0.05).to(torch.bfloat16)
    packed, block_scale, global_scale = NVFP4QTensor.quantize(weight, 16)
    dequantized = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    ours = FORMATS["NVFP4"].quantize_weight(weight)
    assert torch.equal(dequantized.to(torch.bfloat16), ours)


def test_int_block_full_range_and_zero_blocks() -> None:
    w = torch.tensor([[-1.0, -0.5, 0.0, 1.0] * 32, [0.0] * 128])
    q = fakequant.int_block(w, fakequant.int_block_amax(w, 128), 4, 128)
    assert torch.equal(q[1], torch.zeros(128))  # an all-zero block stays zero, no NaN
    assert set(torch.round(q[0] * 7).tolist()) <= set(range(-8, 8))


def test_fused_quantizers_bind_constants_into_their_own_code_objects() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64).to(torch.bfloat16)
    amax = x.abs().amax().float()
    nvfp4 = fakequant._with_constants(fakequant.nvfp4.__wrapped__, (None, None, 16))
    int4 = fakequant._with_constants(fakequant.int_block.__wrapped__, (None, None, 4, 32))
    # torch.compile caps recompilations per code object: each specialisation needs its own.
    assert nvfp4.__code__ is not int4.__code__
    assert torch.equal(nvfp4(x, amax), fakequant.nvfp4.__wrapped__(x, amax, 16))
    block_amax = fakequant.int_block_amax(x, 32)
    assert torch.equal(int4(x, block_amax), fakequant.int_block.__wrapped__(x, block_amax, 4, 32))
