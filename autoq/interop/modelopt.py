"""ModelOpt interop: run ``mtq.auto_quantize`` as a baseline and read its decisions as a plan.

ModelOpt's search state maps each searched group (``<first module>.quant_recipe``) to a
``QuantRecipe`` named after a ModelOpt preset (``FP8_DEFAULT_CFG``, ``NONE`` ...). Its bits
budget is nominal (W4A8 counts 4 bits; NVFP4 4.5; unsearched layers 16), so to compare plans at
equal *honest* bits, ``formats_at_honest_bits`` re-solves ModelOpt's own search for the nominal
budget whose plan costs the most honest bits not above a target.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoq.apply import modelopt_quietly
from autoq.errors import AutoqError
from autoq.formats import FORMATS, average_bits
from autoq.plan import LayerPlan, Plan, creation_info

_PRESET_TO_FORMAT = {f.modelopt_preset: f.name for f in FORMATS.values() if f.modelopt_preset} | {"NONE": "BF16"}
CUSTOM_FORMATS = "autoq_custom_formats"  # search-state key: ModelOpt's CUSTOM_<i> recipe names -> autoq formats


def format_of_recipe(recipe: Any, custom: dict[str, str] | None = None) -> str:
    """Registry format name of a ModelOpt ``QuantRecipe`` (by its preset name, or by ``custom``: the
    ``CUSTOM_<i>`` names ``run_auto_quantize`` gave the formats it passed as configs)."""
    name = str(recipe).split("(", 1)[0]
    if custom and name in custom:
        return custom[name]
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
            formats[module] = format_of_recipe(recipe, state.get(CUSTOM_FORMATS))
    return formats


def storable_candidates(state: dict[str, Any], shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """ModelOpt's search state with every recipe removed from a group that some layer of the group
    cannot store (ModelOpt offers W4A8 to layers whose input size is not a multiple of 128, which no
    checkpoint can hold); and what was removed: format -> layers."""
    stats, dropped = {}, {}
    for hparam, candidates in state["candidate_stats"].items():
        keep = []
        for index, recipe in enumerate(candidates["formats"]):
            fmt = FORMATS[format_of_recipe(recipe, state.get(CUSTOM_FORMATS))]
            unfit = [m for m in candidates["module_names"] if m in shapes and not fmt.supports(*shapes[m])]
            if unfit:
                dropped.setdefault(fmt.name, []).extend(unfit)
            else:
                keep.append(index)
        stats[hparam] = {**candidates, **{k: [candidates[k][i] for i in keep] for k in ("formats", "scores", "costs")}}
        stats[hparam].setdefault("uncompressed_cost", max(candidates["costs"]))  # ModelOpt's budget denominator, unchanged
    return {**state, "candidate_stats": stats}, dropped


def formats_at_honest_bits(
    state: dict[str, Any], shapes: dict[str, tuple[int, int]], target_bits: float, steps: int = 30
) -> tuple[dict[str, str], float, dict[str, list[str]]]:
    """ModelOpt's plan (over the layers in ``shapes``, each in a format it can store) with the most
    honest bits <= ``target_bits``, the nominal budget that gives it, and the recipes ModelOpt
    offered that some layers cannot store (format -> layers; see ``storable_candidates``)."""
    state, dropped = storable_candidates(state, shapes)
    low, high = 0.0, 16.0
    best: tuple[dict[str, str], float] | None = None
    for _ in range(steps):
        middle = (low + high) / 2
        try:
            formats = formats_from_auto_quantize(state, middle)
        except (ValueError, AssertionError):  # below ModelOpt's own minimum
            low = middle
            continue
        if average_bits(formats, shapes) <= target_bits:
            best, low = ({name: formats.get(name, "BF16") for name in shapes}, middle), middle
        else:
            high = middle
    if best is None:
        raise AutoqError(f"ModelOpt's search has no plan at or below {target_bits:g} honest bits")
    return best[0], best[1], dropped


def run_auto_quantize(
    model: nn.Module, layer_names: list[str], formats: list[str], batches: list[torch.Tensor], nominal_bits: float
) -> tuple[dict[str, Any], float]:
    """``mtq.auto_quantize`` (gradient method) over exactly ``layer_names``; returns (state, seconds).

    Same calibration batches for calibration and scoring, as autoq uses. Quantizes ``model``
    in place: pass a copy.
    """
    from autoq.apply import modelopt_quantization, torch_nvfp4_preset

    mtq = modelopt_quantization()

    device = next(model.parameters()).device
    presets: list[str | dict] = []
    custom: dict[str, str] = {}
    for fmt in (FORMATS[f] for f in formats if FORMATS[f].quantized):
        if "nvfp4" in (fmt.weight, fmt.activation) and device.type != "cuda":
            # ModelOpt's NVFP4 kernels are CUDA-only: on other devices its quantizers run autoq's
            # bit-matched implementation, and ModelOpt names the config CUSTOM_<position>.
            custom[f"CUSTOM_{len(presets)}"] = fmt.name
            presets.append(torch_nvfp4_preset(fmt.modelopt_preset))
        else:
            presets.append(fmt.modelopt_preset)
    searched = set(layer_names)
    disabled = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in searched]
    data = [ids.to(device) for ids in batches]
    start = time.perf_counter()
    with modelopt_quietly():
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
    state[CUSTOM_FORMATS] = custom
    return state, time.perf_counter() - start


def to_modelopt(formats: dict[str, str]) -> dict[str, Any]:
    """A config for ``mtq.quantize(model, config, forward_loop)`` realising the plan.

    ModelOpt takes one calibration algorithm per call: ``awq_lite`` if every quantized layer is
    an AWQ format, else ``max`` (for mixed AWQ / non-AWQ plans the AWQ smoothing is then lost,
    as with ModelOpt's own ``get_auto_quantize_config``; ``autoq apply`` calibrates each format
    with its own algorithm).
    """
    from autoq.apply import modelopt_config

    config = modelopt_config(formats)
    quantized = [FORMATS[f] for f in formats.values() if FORMATS[f].quantized]
    if quantized and all(f.calibration == "awq_lite" for f in quantized):
        config["algorithm"] = {"method": "awq_lite", "alpha_step": 0.1}
    return config


def config_from_json(text: str) -> dict[str, Any]:
    """Load a ``to_modelopt`` config saved as JSON, ready for ``mtq.quantize``.

    JSON object keys are strings, but ModelOpt's ``block_sizes`` wants its axis keys as integers
    (``{-1: 16}``); this turns numeric keys back into ints.
    """

    def ints(value):
        if isinstance(value, dict):
            return {(int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k): ints(v) for k, v in value.items()}
        if isinstance(value, list):
            return [ints(v) for v in value]
        return value

    return ints(json.loads(text))


def plan_formats_from_checkpoint(checkpoint: Path) -> dict[str, str]:
    """Layer -> format of a unified ModelOpt checkpoint, every linear layer included (BF16 if unquantized).

    Reads hf_quant_config.json (or config.json's quantization_config): MIXED_PRECISION
    ``quantized_layers``, or a uniform ``quant_algo`` with ``exclude_modules``. The linear layers
    themselves come from a weightless copy of the model built from config.json.
    """
    from transformers import AutoModelForCausalLM

    from autoq.checkpoint import checkpoint_formats, unquantized_config

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise AutoqError(f"checkpoint {checkpoint} is not a directory")
    if not (checkpoint / "config.json").is_file():
        raise AutoqError(f"checkpoint {checkpoint} has no config.json")
    quantized = checkpoint_formats(checkpoint)
    config = unquantized_config(checkpoint)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = [name for name, module in skeleton.named_modules() if isinstance(module, nn.Linear)]
    unknown = set(quantized) - set(linears)
    if unknown:
        raise AutoqError(f"{checkpoint}: quantized layers not in the model: {', '.join(sorted(unknown)[:3])}")
    return {name: quantized.get(name, "BF16") for name in linears}


def plan_from_checkpoint(checkpoint: Path) -> Plan:
    """``autoq plan import``: the plan a ModelOpt checkpoint realises, with each layer's stored size."""
    from autoq.codec import logical_shape, read_headers

    formats = plan_formats_from_checkpoint(checkpoint)
    headers = read_headers(checkpoint)
    layers = {}
    for name, fmt in formats.items():
        shape = headers.get(f"{name}.weight")
        if shape is None:  # e.g. a tied lm_head stored only as the embedding
            continue
        out_f, in_f = logical_shape(FORMATS[fmt], shape.shape)
        layers[name] = LayerPlan(format=fmt, params=out_f * in_f, bits=FORMATS[fmt].storage_bits(out_f, in_f))
    return Plan(layers=layers, model={"id": str(checkpoint)}, created={**creation_info(), "imported_from": str(checkpoint)})
