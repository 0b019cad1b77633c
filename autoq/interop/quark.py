"""Plan -> AMD Quark layer-wise quantization config (JSON, the ``QConfig.to_dict()`` layout).

Per-layer entries go to ``layer_quant_config`` (exact module names); BF16 layers, and lm_head unless
the plan quantizes it, to ``exclude``. Specs follow Quark's own templates: FP8 = ``FP8Scheme``, NVFP4 =
``FP4Block16ScaleE4M3Scheme`` (FP4 per group of 16 with an FP8-E4M3-quantized scale), INT4_AWQ =
``Int4WeightOnlyScheme(group_size=128)``; W4A8 is INT4 per group of 128 with static per-tensor
FP8 activations (Quark's ``int4_fp8`` template is per-channel with dynamic activations, a
different format); W4A16_NVFP4 is NVFP4's weight spec alone; MXFP8 is ``MXFP4Scheme`` with
FP8-E4M3 elements (E8M0 scale per 32, dynamic activations); INT8_SQ is INT8 per output channel
with static per-tensor INT8 activations. Calibration rules are not expressed: AWQ and SmoothQuant
need model-specific ``scaling_layers`` (add an ``algo_config`` for them), and Quark picks MXFP8's
E8M0 scales its own way (``scale_calculation_mode`` "even", the OCP rule, where ModelOpt takes
``2^ceil(log2(amax / 448))``).
"""

from __future__ import annotations

from typing import Any

from autoq.errors import AutoqError
from autoq.interop.llmcompressor import _listing, unquantized_layers

QUARK_VERSION = "0.13"


def _spec(dtype: str, qscheme: str, observer: str, *, is_dynamic: bool = False, group_size: int | None = None,
          ch_axis: int | None = None, symmetric: bool | None = True, scale_type: str = "float",
          scale_format: str | None = None, is_scale_quant: bool = False) -> dict[str, Any]:  # fmt: skip
    return {
        "dtype": dtype, "is_dynamic": is_dynamic, "qscheme": qscheme, "ch_axis": ch_axis, "group_size": group_size,
        "block_size": None, "symmetric": symmetric, "round_method": "half_even", "scale_type": scale_type,
        "zero_point_type": "int32", "scale_format": scale_format, "scale_calculation_mode": None,
        "mx_element_dtype": None, "observer_cls": observer, "is_scale_quant": is_scale_quant,
        "enable_buffer_reuse": False, "max_input_numel": 4194304,
    }  # fmt: skip


_FP8 = _spec("fp8_e4m3", "per_tensor", "PerTensorMinMaxObserver")
_INT4_G128 = _spec("int4", "per_group", "PerGroupMinMaxObserver", group_size=128, ch_axis=-1)
_INT8_CHANNEL = _spec("int8", "per_channel", "PerChannelMinMaxObserver", ch_axis=0)
_INT8_TENSOR = _spec("int8", "per_tensor", "PerTensorMinMaxObserver")


def _mxfp8(dynamic: bool) -> dict[str, Any]:
    spec = _spec("fp8_e4m3", "per_group", "PerBlockMXObserver", is_dynamic=dynamic, group_size=32, ch_axis=-1,
                 symmetric=None, scale_format="e8m0")  # fmt: skip
    return {**spec, "scale_calculation_mode": "even"}


def _nvfp4(dynamic: bool) -> list[dict[str, Any]]:
    first = _spec("fp4", "per_group", "PerBlockMXObserver", is_dynamic=dynamic, group_size=16, ch_axis=-1,
                  symmetric=None, scale_type="float32", scale_format="float32")  # fmt: skip
    second = _spec("fp8_e4m3", "per_tensor", "PerTensorMinMaxObserver", scale_type="float32", is_scale_quant=True)
    return [first, second]


def _layer(weight, inputs) -> dict[str, Any]:
    return {"input_tensors": inputs, "output_tensors": None, "weight": weight, "bias": None, "target_device": None}


LAYER_CONFIGS: dict[str, dict[str, Any]] = {
    "FP8": _layer(_FP8, _FP8),
    "NVFP4": _layer(_nvfp4(False), _nvfp4(True)),
    "W4A8": _layer(_INT4_G128, _FP8),
    "INT4_AWQ": _layer(_INT4_G128, None),
    "W4A16_NVFP4": _layer(_nvfp4(False), None),
    "MXFP8": _layer(_mxfp8(False), _mxfp8(True)),
    "INT8_SQ": _layer(_INT8_CHANNEL, _INT8_TENSOR),
}


def to_quark(formats: dict[str, str]) -> dict[str, Any]:
    unsupported = {n: f for n, f in formats.items() if f != "BF16" and f not in LAYER_CONFIGS}
    if unsupported:
        raise AutoqError(f"Quark configs cannot express {_listing(unsupported)}")
    return {
        "global_quant_config": _layer(None, None),
        "exclude": unquantized_layers(formats),
        "algo_config": None,
        "softmax_quant_spec": None,
        "quant_method": "quark",
        "layer_type_quant_config": {},
        "layer_quant_config": {n: LAYER_CONFIGS[f] for n, f in formats.items() if f != "BF16"},
        "kv_cache_quant_config": {},
        "kv_cache_post_rope": False,
        "quant_mode": "eager_mode",
        "version": QUARK_VERSION,
    }
