"""ModelOpt interop: run ``mtq.auto_quantize`` as a baseline and read its decisions as a plan.

ModelOpt's search state maps each searched group (``<first module>.quant_recipe``) to a
``QuantRecipe`` named after a ModelOpt preset (``FP8_DEFAULT_CFG``, ``NONE`` ...). Its bits
budget is nominal (W4A8 counts 4 bits; NVFP4 4.5; unsearched layers 16), so to compare plans at
equal *honest* bits, ``formats_at_honest_bits`` re-solves ModelOpt's own search for the nominal
budget whose plan costs the most honest bits not above a target.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from autoq.errors import AutoqError
from autoq.formats import FORMATS

_PRESET_TO_FORMAT = {f.modelopt_preset: f.name for f in FORMATS.values() if f.modelopt_preset} | {"NONE": "BF16"}


def format_of_recipe(recipe: Any) -> str:
    """Registry format name of a ModelOpt ``QuantRecipe`` (by its preset name)."""
    name = str(recipe).split("(", 1)[0]
    if name not in _PRESET_TO_FORMAT:
        raise AutoqError(f"ModelOpt recipe {name} has no autoq format (known: {', '.join(_PRESET_TO_FORMAT)})")
    return _PRESET_TO_FORMAT[name]


def formats_from_auto_quantize(state: dict[str, Any], nominal_bits: float | None = None) -> dict[str, str]:
    """Layer name -> format from an ``auto_quantize`` search state (re-solved for ``nominal_bits``)."""
    recipes = state["best"]["recipe"]
    if nominal_bits is not None:
        from modelopt.torch.quantization.algorithms import _resolve_best_recipe

        recipes = _resolve_best_recipe(state, {"effective_bits": nominal_bits})
    formats = {}
    for hparam, recipe in recipes.items():
        stats = state["candidate_stats"][hparam]
        for module in stats["module_names"]:
            formats[module] = format_of_recipe(recipe)
    return formats


def honest_bits(formats: dict[str, str], shapes: dict[str, tuple[int, int]]) -> float:
    """Average stored bits per weight of ``formats`` over the layers in ``shapes`` (missing: BF16)."""
    total = sum(FORMATS[formats.get(name, "BF16")].storage_bits(*shape) for name, shape in shapes.items())
    return total / sum(o * i for o, i in shapes.values())


def formats_at_honest_bits(
    state: dict[str, Any], shapes: dict[str, tuple[int, int]], target_bits: float, steps: int = 30
) -> tuple[dict[str, str], float]:
    """ModelOpt's plan (over the layers in ``shapes``) with the most honest bits <= ``target_bits``,
    and the nominal budget that gives it."""
    low, high = 0.0, 16.0
    best: tuple[dict[str, str], float] | None = None
    for _ in range(steps):
        middle = (low + high) / 2
        try:
            formats = formats_from_auto_quantize(state, middle)
        except (ValueError, AssertionError):  # below ModelOpt's own minimum
            low = middle
            continue
        if honest_bits(formats, shapes) <= target_bits:
            best, low = ({name: formats.get(name, "BF16") for name in shapes}, middle), middle
        else:
            high = middle
    if best is None:
        raise AutoqError(f"ModelOpt's search has no plan at or below {target_bits:g} honest bits")
    return best


def run_auto_quantize(
    model: nn.Module, layer_names: list[str], formats: list[str], batches: list[torch.Tensor], nominal_bits: float
) -> tuple[dict[str, Any], float]:
    """``mtq.auto_quantize`` (gradient method) over exactly ``layer_names``; returns (state, seconds).

    Same calibration batches for calibration and scoring, as autoq uses. Quantizes ``model``
    in place: pass a copy.
    """
    import modelopt.torch.quantization as mtq

    presets = [FORMATS[f].modelopt_preset for f in formats if FORMATS[f].quantized]
    searched = set(layer_names)
    disabled = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in searched]
    device = next(model.parameters()).device
    data = [ids.to(device) for ids in batches]
    start = time.perf_counter()
    _, state = mtq.auto_quantize(
        model,
        constraints={"effective_bits": nominal_bits},
        quantization_formats=presets,
        data_loader=data,
        forward_step=lambda m, ids: m(input_ids=ids, labels=ids),
        loss_func=lambda output, _ids: output.loss,
        num_calib_steps=len(data),
        num_score_steps=len(data),
        disabled_layers=disabled or None,
        verbose=False,
    )
    return state, time.perf_counter() - start
