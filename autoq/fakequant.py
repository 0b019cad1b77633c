"""Pure-torch fake quantization, numerically matched to NVIDIA ModelOpt 0.47.

ModelOpt's own fake-quant kernels are CUDA/Triton only for NVFP4, and running them means
wrapping every layer in quantizer modules.  The sensitivity engine needs raw functions it can
call on any device, so these mirror ModelOpt's arithmetic step for step:

* FP8 E4M3 per-tensor: ``modelopt.torch.quantization.tensor_quant._fp8_eager``.
* NVFP4 (E2M1 values, FP8-E4M3 scale per 16 values, FP32 global scale): the Triton kernel
  ``modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper.fp4_fake_quant_block``.
* INT4 with static per-block amax, INT8 per channel and per tensor: ``tensor_quant._tensor_quant``
  (symmetric, full range [-8, 7] / [-128, 127], round half to even).
* MXFP8 (E4M3 values, one E8M0 power-of-two scale per 32 values, chosen as
  ``2^ceil(log2(amax / 448))``): ``qtensor.MXFP8QTensor``, what the exporter stores. ModelOpt's own
  MXFP8 fake quantization is a CUDA extension computing the same scale from the float's bits.

``tests/test_fakequant.py`` checks agreement with ModelOpt on CPU (FP8, INT4, W4A8, INT8
SmoothQuant, MXFP8 against the exporter's quantizer) and ``benchmarks/gpu_checks.py`` on CUDA
(NVFP4, MXFP8 against the CUDA kernels).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch


def fused_on_cuda(fn: Callable) -> Callable:
    """Run ``fn`` through ``torch.compile`` for CUDA tensors: each quantizer becomes one fused
    kernel instead of a dozen memory-bound passes. CPU tensors (and ``AUTOQ_COMPILE=0``) run
    eagerly; if compilation fails, eager it is, with one warning.

    Tensor shapes are dynamic (one compilation serves every layer); the non-tensor arguments
    (block sizes, bit widths) are compiled in as constants, so a 16-element block reduction is
    one fixed-size, register-resident reduction rather than a loop of unknown length.
    """
    compiled: dict[tuple, Callable | None] = {}  # None: compilation failed, run eagerly

    @functools.wraps(fn)
    def wrapper(*args):
        if not args[0].is_cuda or os.environ.get("AUTOQ_COMPILE", "1") == "0":
            return fn(*args)
        constants = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
        if constants not in compiled:
            compiled[constants] = torch.compile(_with_constants(fn, constants), dynamic=True)
        if compiled[constants] is None:
            return fn(*args)
        try:
            # Detached: torch.compile keeps a Parameter's shape static and would recompile per layer.
            return compiled[constants](*(a.detach() for a in args if isinstance(a, torch.Tensor)))
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same math
            warnings.warn(f"autoq: torch.compile of {fn.__name__} failed ({type(err).__name__}); running eagerly")
            compiled[constants] = None
            return fn(*args)

    return wrapper


def _with_constants(fn: Callable, constants: tuple) -> Callable:
    """``fn`` taking only its tensor arguments; the others (``None`` slots: tensors) are fixed."""
    tensor_slots = [i for i, c in enumerate(constants) if c is None]

    def specialised(*tensors: torch.Tensor):
        args = list(constants)
        for slot, tensor in zip(tensor_slots, tensors):
            args[slot] = tensor
        return fn(*args)

    # A code object of its own: torch.compile caches compilations (and caps recompilations) per
    # code object, and every specialisation would otherwise share this closure's.
    specialised.__code__ = specialised.__code__.replace()
    return specialised


# Bump when any function here changes its numbers: cached sensitivity scores key on it.
NUMERICS_VERSION = 2
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
_AMAX_EPSILON = 1.0 / (1 << 24)
_FLOAT32_EXPONENT = 0x7F800000  # exponent bits of a float32
_MANTISSA_BITS = 23


# Rounding to a low-precision grid is done in float32 by scaling with powers of two: the value
# is multiplied by 1/step (exact), rounded half to even (``torch.round``) and multiplied by step
# (exact). The step is a power of two found from the value's own float32 exponent bits, so
# neither a chain of comparisons nor a conversion through an 8-bit dtype is needed (both slow on
# CPUs) and there is no division (Triton's float32 division is approximate).
def _round_to_grid(x: torch.Tensor, mantissa_bits: int, min_exponent: int, max_exponent: int) -> torch.Tensor:
    """Round float32 ``x`` half to even to ``mantissa_bits`` bits below its leading bit, with the
    leading bit's exponent clamped to [``min_exponent``, ``max_exponent``] (the step is at least
    ``2 ** (min_exponent - mantissa_bits)``: the subnormal step; at most the largest step)."""
    low = (min_exponent + 127) << _MANTISSA_BITS
    high = (max_exponent + 127) << _MANTISSA_BITS
    # exponent bits of |x| (zero, subnormal: 0; inf, NaN: all ones), clamped: those of 2^e
    step = (x.view(torch.int32) & _FLOAT32_EXPONENT).clamp_(low, high).sub_(mantissa_bits << _MANTISSA_BITS)  # 2^(e - m)
    inverse = (254 << _MANTISSA_BITS) - step  # 2^(m - e): (127 - k) << 23 from 2^k's (127 + k) << 23; no int32 overflow
    return (x * inverse.view(torch.float32)).round_().mul_(step.view(torch.float32))


def _round_to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Round float32 values within [-448, 448] to FP8 E4M3, half to even, kept as float32: three
    mantissa bits, subnormal step 2^-9 below 2^-6. Equals ``x.to(torch.float8_e4m3fn).float()``."""
    return _round_to_grid(scaled, 3, -6, 8)


def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the E2M1 grid {0, ±.5, ±1, ±1.5, ±2, ±3, ±4, ±6}, saturating at ±6.

    The step is .5 below 2, 1 in [2, 4) and 2 above (one mantissa bit, exponents 0 to 2);
    rounding half to even on it gives exactly ModelOpt's ``fp4_round_magnitude`` decision
    boundaries (ties to the even code).
    """
    return _round_to_grid(x, 1, 0, 2).clamp_(-FP4_E2M1_MAX, FP4_E2M1_MAX)


def fp8_e4m3_codes(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 scale ``448 / amax`` and the E4M3 codes of ``x`` (what a checkpoint stores)."""
    amax = amax.to(device=x.device, dtype=torch.float32)
    safe_amax = torch.where(amax <= _AMAX_EPSILON, torch.ones_like(amax), amax)
    scale = FP8_E4M3_MAX / safe_amax
    codes = _round_to_e4m3((x.to(torch.float32) * scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX))
    return scale, codes.to(torch.float8_e4m3fn)  # exact: the values are on the E4M3 grid


@fused_on_cuda
def fp8_e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Fake-quantize to FP8 E4M3 with scale ``amax / 448`` (``amax`` broadcasts against ``x``)."""
    amax = amax.to(device=x.device, dtype=torch.float32)
    scale = FP8_E4M3_MAX / torch.where(amax <= _AMAX_EPSILON, torch.ones_like(amax), amax)
    scaled = (x.to(torch.float32) * scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return _round_to_e4m3(scaled).mul_(1.0 / scale).to(x.dtype)


def _nvfp4_scales(x: torch.Tensor, global_amax: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4's block scales rounded to E4M3 (float32, ``x.shape[:-1] + (blocks, 1)``) and its FP32 global scale."""
    # The maximum of |x| is one of its values: taken in x's own dtype, then widened exactly.
    block_amax = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size).abs().amax(dim=-1, keepdim=True).float()
    global_scale = global_amax.to(device=x.device, dtype=torch.float32) / (FP4_E2M1_MAX * FP8_E4M3_MAX)
    global_scale = torch.where(global_scale > 0, global_scale, torch.full_like(global_scale, 1e-12))
    in_fp8_range = (block_amax / (FP4_E2M1_MAX * global_scale)).clamp_(max=FP8_E4M3_MAX)
    return _round_to_e4m3(in_fp8_range), global_scale


def nvfp4_stored_scales(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8-E4M3 block scales (``x.shape[:-1] + (blocks,)``) and the FP32 global scale of NVFP4."""
    block_scales, global_scale = _nvfp4_scales(x, global_amax, block_size)
    return block_scales.squeeze(-1).to(torch.float8_e4m3fn), global_scale


def nvfp4_block_scales(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Per-block decode scales (FP8-rounded ``block_amax / 6``, times the global scale).

    Returns a float32 tensor shaped ``x.shape[:-1] + (x.shape[-1] // block_size, 1)``.
    """
    block_scales, global_scale = _nvfp4_scales(x, global_amax, block_size)
    scales = block_scales.mul_(global_scale)
    return torch.where(scales >= 1e-5, scales, torch.ones_like(scales))


@fused_on_cuda
def nvfp4(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """Fake-quantize to NVFP4 along the last dimension (dynamic per-block scales)."""
    if x.shape[-1] % block_size:
        raise ValueError(f"NVFP4 needs the last dimension ({x.shape[-1]}) divisible by {block_size}")
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    scales = nvfp4_block_scales(x, global_amax, block_size)
    return round_to_e2m1(blocks / scales).mul_(scales).reshape(x.shape).to(x.dtype)


@fused_on_cuda
def int_block_amax(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Static per-block amax of a weight (or a stack of weights), blocks of ``block_size`` along
    the input (last) dim; float32, shaped ``w.shape[:-1] + (blocks, 1)``."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size).abs().amax(-1, keepdim=True).float()


def _ieee_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """IEEE float32 division. Fused on CUDA it runs in float64 and is rounded to float32, which
    equals IEEE float32 division exactly (53 >= 2 * 24 + 2 bits); Triton's own float32 division
    is approximate, and a code flipped at a rounding tie would break bit-equality with ModelOpt."""
    if numerator.is_cuda:
        return (numerator.double() / denominator.double()).float()
    return numerator / denominator


def _int_codes(values: torch.Tensor, amax: torch.Tensor, num_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales ``max_code / amax`` (float32; 1 where amax is zero) and the integer codes (as
    float32) of symmetric full-range quantization of ``values`` (float32) with ``amax`` broadcasting."""
    max_bound = 2.0 ** (num_bits - 1) - 1.0
    zero = amax <= _AMAX_EPSILON
    scale = _ieee_divide(torch.full_like(amax, max_bound), amax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    codes = torch.clamp(torch.round(values * scale), -max_bound - 1.0, max_bound)
    return torch.where(zero, torch.ones_like(scale), scale), codes


def int_block_codes(w: torch.Tensor, block_amax: torch.Tensor, num_bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-block scales ``max_code / amax`` (float32, ``w.shape[:-1] + (blocks, 1)``) and the
    integer codes (as float32, ``w.shape[:-1] + (blocks, block_size)``) of symmetric full-range block
    quantization. ``w``: a weight (or a stack of weights), blocks along the last dim."""
    if w.shape[-1] % block_size:
        raise ValueError(f"INT{num_bits} needs in_features ({w.shape[-1]}) divisible by {block_size}")
    blocks = w.to(torch.float32).reshape(*w.shape[:-1], w.shape[-1] // block_size, block_size)
    return _int_codes(blocks, block_amax.float(), num_bits)


@fused_on_cuda
def int_block(w: torch.Tensor, block_amax: torch.Tensor, num_bits: int, block_size: int) -> torch.Tensor:
    """Symmetric integer fake quantization with one amax per block (full range, e.g. [-8, 7]).

    ``block_amax`` as ``int_block_amax`` returns it. A block of the whole row (``block_size = in_features``) is per-channel quantization (INT8).
    """
    scale, codes = int_block_codes(w, block_amax, num_bits, block_size)
    return _ieee_divide(codes, scale).reshape(w.shape).to(w.dtype)


@fused_on_cuda
def int_tensor(x: torch.Tensor, amax: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Symmetric integer fake quantization with one static amax for the whole tensor (INT8 activations)."""
    scale, codes = _int_codes(x.to(torch.float32), amax.to(device=x.device, dtype=torch.float32), num_bits)
    return _ieee_divide(codes, scale).to(x.dtype)


MXFP8_BLOCK = 32
E8M0_BIAS = 127


def mxfp8_exponents(x: torch.Tensor, block_size: int = MXFP8_BLOCK) -> torch.Tensor:
    """The E8M0 scales of MXFP8 along the last dimension: biased exponents (uint8) of
    ``2^ceil(log2(block_amax / 448))``, clamped to [-127, 127]; an all-zero block stores 0.

    ``ceil(log2(.))`` is taken from the float's exponent and mantissa (``frexp``), exact where
    ModelOpt's exporter takes ``torch.log2`` (the two agree on every bfloat16 block amax).
    """
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    descale = blocks.abs().amax(dim=-1).to(torch.float32) / FP8_E4M3_MAX
    mantissa, exponent = torch.frexp(descale)  # descale = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = torch.where(mantissa == 0.5, exponent - 1, exponent).to(torch.float32)
    ceil_log2 = torch.where(descale > 0, ceil_log2, torch.full_like(ceil_log2, -E8M0_BIAS))
    return (ceil_log2.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)


def mxfp8_codes(x: torch.Tensor, exponents: torch.Tensor, block_size: int = MXFP8_BLOCK) -> torch.Tensor:
    """The E4M3 codes of ``x`` under the E8M0 block scales ``exponents`` (``MXFP8QTensor.quantize_with_scale``)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    scaled = blocks * torch.exp2(E8M0_BIAS - exponents.to(torch.float32)).unsqueeze(-1)
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).reshape(x.shape)


def mxfp8_decode(codes: torch.Tensor, exponents: torch.Tensor, block_size: int = MXFP8_BLOCK) -> torch.Tensor:
    """float32 values of E4M3 ``codes`` times their blocks' E8M0 scales."""
    blocks = codes.to(torch.float32).reshape(*codes.shape[:-1], codes.shape[-1] // block_size, block_size)
    return (blocks * torch.exp2(exponents.to(torch.float32) - E8M0_BIAS).unsqueeze(-1)).reshape(codes.shape)


@fused_on_cuda
def mxfp8(x: torch.Tensor, block_size: int = MXFP8_BLOCK) -> torch.Tensor:
    """Fake-quantize to MXFP8 along the last dimension (dynamic E8M0 scale per block)."""
    if x.shape[-1] % block_size:
        raise ValueError(f"MXFP8 needs the last dimension ({x.shape[-1]}) divisible by {block_size}")
    exponents = mxfp8_exponents(x, block_size)
    return mxfp8_decode(mxfp8_codes(x, exponents, block_size), exponents, block_size).to(x.dtype)
