"""Plan -> llm-compressor recipe (YAML): a QuantizationModifier with one config group per format.

Each group's ``weights`` / ``input_activations`` are compressed-tensors ``QuantizationArgs``
matching the registry format (and the compressed-tensors presets FP8 / NVFP4 / NVFP4A16 / MXFP8 /
W4A16); targets are exact module names. Plans with AWQ formats get an ``AWQModifier`` first, plans
with INT8_SQ a ``SmoothQuantModifier`` at ModelOpt's strength (alpha 1; llm-compressor infers both
modifiers' smoothing mappings from the architecture). INT8_SQ is W8A8 with a static per-tensor
activation scale, as ModelOpt exports it (compressed-tensors' W8A8 preset is per token, dynamic).
Layers planned BF16 are ignored, and so is ``lm_head`` when the plan does not name it (the tools'
own default); a planned head is quantized.
"""

from __future__ import annotations

from typing import Any

import yaml

from autoq.errors import AutoqError
from autoq.smoothquant import ALPHA as SMOOTHQUANT_ALPHA

_FP8_TENSOR = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
_INT4_GROUP128 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "dynamic": False}
_FP4_GROUP16 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}
_MX8_GROUP32 = {"num_bits": 8, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True, "scale_dtype": "uint8"}
_INT8 = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False}
SCHEMES: dict[str, dict[str, Any]] = {
    "FP8": {"weights": _FP8_TENSOR, "input_activations": _FP8_TENSOR},
    "NVFP4": {"weights": {**_FP4_GROUP16, "dynamic": False}, "input_activations": {**_FP4_GROUP16, "dynamic": "local"}},
    "W4A8": {"weights": _INT4_GROUP128, "input_activations": _FP8_TENSOR},
    "INT4_AWQ": {"weights": _INT4_GROUP128},
    "W4A16_NVFP4": {"weights": {**_FP4_GROUP16, "dynamic": False}},
    "MXFP8": {"weights": {**_MX8_GROUP32, "dynamic": False}, "input_activations": {**_MX8_GROUP32, "dynamic": True}},
    "INT8_SQ": {"weights": {**_INT8, "strategy": "channel"}, "input_activations": {**_INT8, "strategy": "tensor"}},
}
AWQ_FORMATS = {"W4A8", "INT4_AWQ"}
SMOOTHQUANT_FORMATS = {"INT8_SQ"}


def to_llmcompressor(formats: dict[str, str]) -> str:
    unsupported = {n: f for n, f in formats.items() if f != "BF16" and f not in SCHEMES}
    if unsupported:
        raise AutoqError(f"llm-compressor recipes cannot express {_listing(unsupported)}")
    groups = {}
    for fmt in SCHEMES:
        targets = sorted(n for n, f in formats.items() if f == fmt)
        if targets:
            groups[fmt.lower()] = {"targets": targets, **SCHEMES[fmt]}
    modifiers: dict[str, Any] = {}
    if any(f in AWQ_FORMATS for f in formats.values()):
        modifiers["AWQModifier"] = {"duo_scaling": True}
    if any(f in SMOOTHQUANT_FORMATS for f in formats.values()):
        modifiers["SmoothQuantModifier"] = {"smoothing_strength": SMOOTHQUANT_ALPHA}
    modifiers["QuantizationModifier"] = {
        "ignore": unquantized_layers(formats),
        "config_groups": groups,
    }
    return yaml.safe_dump({"default_stage": {"default_modifiers": modifiers}}, sort_keys=False)


def unquantized_layers(formats: dict[str, str]) -> list[str]:
    """Layers a converted config must leave alone: those planned BF16, plus an unplanned ``lm_head``."""
    return sorted({n for n, f in formats.items() if f == "BF16"} | ({"lm_head"} - set(formats)))


def _listing(layers: dict[str, str]) -> str:
    shown = ", ".join(f"{n} ({f})" for n, f in list(layers.items())[:5])
    return shown + (f" and {len(layers) - 5} more layers" if len(layers) > 5 else "")
