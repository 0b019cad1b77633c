"""Apply a plan with NVIDIA ModelOpt, calibrate, and export a unified HF checkpoint.

The plan becomes ModelOpt ``quant_cfg`` entries, one per quantizer of every planned layer.
Calibration follows each format's needs: AWQ-lite for W4A8 / INT4_AWQ layers, ``max`` for the
rest, each pass with the other group's quantizers switched off. Export goes through ``modelopt.torch.export.export_hf_checkpoint`` into a
temporary directory that is verified (``autoq.verify``) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from autoq import fakequant
from autoq.calibstate import CalibrationState
from autoq.decoder import shared_input_readers
from autoq.errors import AutoqError, atomic_output_dir
from autoq.formats import FORMATS
from autoq.manifest import write_manifest
from autoq.model import TIED_HEAD_REASON, lm_head_is_tied
from autoq.plan import Plan
from autoq.search_space import all_layers
from autoq.verify import VerifyReport, verify_checkpoint


@contextlib.contextmanager
def modelopt_quietly() -> Iterator[None]:
    """ModelOpt prints progress chatter ("Inserted N quantizers", awq_lite steps) on stdout and warns
    about untested transformers versions; keep stdout for results and drop that noise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _quantizer_name(layer: str, quantizer: str) -> str:
    """ModelOpt's name for a quantizer of ``layer``. A fused-experts projection (``...experts.gate_up_proj``)
    has one input quantizer and one weight quantizer per expert (``_QuantFusedExperts``)."""
    parent, _, attr = layer.rpartition(".")
    if attr in ("gate_up_proj", "up_proj", "down_proj") and parent.endswith(".experts"):
        return f"{layer}_input_quantizer" if quantizer == "input_quantizer" else f"{layer}_weight_quantizers.*"
    return f"{layer}.{quantizer}"


def modelopt_config(formats: dict[str, str]) -> dict:
    """The ModelOpt quantize config realising ``formats`` (layer name -> format name)."""
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, fmt_name in formats.items():
        for quantizer, cfg in FORMATS[fmt_name].modelopt_quantizer_cfgs().items():
            if cfg is not None:
                quant_cfg.append({"quantizer_name": _quantizer_name(name, quantizer), "cfg": cfg})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def check_plan_fits_model(model: nn.Module, formats: dict[str, str], sample_ids: torch.Tensor) -> None:
    """Every planned layer exists, is linear (or a fused-experts projection), fits its format, and fused layers agree."""
    modules = dict(model.named_modules())
    layers = {layer.name: layer for layer in all_layers(model)}
    missing = [name for name in formats if name not in layers and name not in modules]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AutoqError(f"plan names {len(missing)} layer(s) the model does not have: {shown}")
    for name, fmt_name in formats.items():
        if name not in layers:
            raise AutoqError(f"plan layer {name} is a {type(modules[name]).__name__}, not a linear layer")
        if modules.get(name) is model.get_output_embeddings() and FORMATS[fmt_name].quantized and lm_head_is_tied(model):
            raise AutoqError(f"plan quantizes {name}, which cannot be: {TIED_HEAD_REASON}")
        if not layers[name].supports(fmt_name):
            raise AutoqError(f"{name} ({layers[name].out_features}x{layers[name].in_features}) cannot be stored as {fmt_name}")
    readers = shared_input_readers(model, [name for name in formats if name in modules], sample_ids)
    fused: dict[str, list[str]] = {}
    for name, first in readers.items():
        fused.setdefault(first, []).append(name)
    for names in fused.values():
        if len({formats[n] for n in names}) > 1:
            detail = ", ".join(f"{n}={formats[n]}" for n in names)
            raise AutoqError(f"layers that read the same input are fused at runtime and must share a format: {detail}")


TORCH_NVFP4_BACKEND = "autoq_torch_nvfp4"


def _torch_nvfp4(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    return fakequant.nvfp4(inputs, quantizer.amax.float(), quantizer.block_sizes[-1])


def _register_torch_nvfp4() -> None:
    from modelopt.torch.quantization.nn import is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(TORCH_NVFP4_BACKEND):
        register_quant_backend(TORCH_NVFP4_BACKEND, _torch_nvfp4)


def _is_nvfp4(cfg: dict) -> bool:
    blocks = cfg.get("block_sizes") or {}
    return tuple(cfg.get("num_bits") or ()) == (2, 1) and blocks.get("type") == "dynamic"


def torch_nvfp4_preset(preset: str) -> dict:
    """ModelOpt preset ``preset`` with every NVFP4 quantizer on autoq's CPU implementation.

    For ModelOpt passes that quantize as they go (``auto_quantize`` scoring), where
    ``use_torch_nvfp4_off_cuda`` would come too late. ModelOpt names such a config ``CUSTOM_<i>``
    (``i``: its position in ``quantization_formats``).
    """
    import copy

    import modelopt.torch.quantization as mtq

    _register_torch_nvfp4()
    config = copy.deepcopy(getattr(mtq, preset))
    for entry in config["quant_cfg"]:
        cfg = entry.get("cfg")
        if isinstance(cfg, dict) and _is_nvfp4(cfg):
            entry["cfg"] = {**cfg, "backend": TORCH_NVFP4_BACKEND}
    return config


def use_torch_nvfp4_off_cuda(model: nn.Module) -> int:
    """Route NVFP4 fake quantization of a non-CUDA model through ``autoq.fakequant``.

    ModelOpt's NVFP4 fake-quant kernels are CUDA/Triton only; its quantizers accept a registered
    functional backend, so the same calibrated quantizers run on CPU with our bit-matched
    implementation. Returns how many quantizers were switched.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    _register_torch_nvfp4()
    switched = 0
    for module in model.modules():
        blocks = getattr(module, "block_sizes", None) if isinstance(module, TensorQuantizer) else None
        nvfp4 = blocks and blocks.get("type") == "dynamic" and module.num_bits == (2, 1)
        if nvfp4 and module.amax is not None and not module.amax.is_cuda:
            module.backend = TORCH_NVFP4_BACKEND
            switched += 1
    return switched


def _forward_loop(batches: list[torch.Tensor], device: torch.device, desc: str, progress: bool) -> Callable:
    def loop(model: nn.Module) -> None:
        for ids in tqdm(batches, desc=f"autoq {desc}", disable=not progress, leave=False):
            model(input_ids=ids.to(device), use_cache=False)

    return loop


def apply_plan(model: nn.Module, formats: dict[str, str], batches: list[torch.Tensor], progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place with ModelOpt as ``formats`` says, calibrated on ``batches``.

    AWQ layers are quantized and calibrated first (awq_lite, the others off); then the remaining
    layers are configured and max-calibrated with the AWQ layers' unquantized originals in their
    place (AWQ smooths weights in place, and a smoothed layer's output differs in the last bits).
    So every layer is calibrated on the unquantized model's own activations, and its scales do not
    depend on the other layers' formats (``autoq.measure`` relies on it).
    """
    import modelopt.torch.quantization as mtq

    device = next(model.parameters()).device
    check_plan_fits_model(model, formats, batches[0][:1, :64].to(device))
    awq = {n: f for n, f in formats.items() if FORMATS[f].calibration == "awq_lite"}
    rest = {n: f for n, f in formats.items() if n not in awq}
    with modelopt_quietly():
        if not awq:
            mtq.quantize(model, modelopt_config(rest), _forward_loop(batches, device, "calibrating (max)", progress))
            return _as_exported(model)
        rest_quant_cfg = modelopt_config(rest)["quant_cfg"][1:]  # without the leading "disable everything"
        originals = {n: copy.deepcopy(model.get_submodule(n)).cpu() for n in awq} if rest_quant_cfg else {}
        # debug: awq_lite keeps its per-layer search results (module.awq_lite), read by modelopt_calibration_state
        awq_config = {**modelopt_config(awq), "algorithm": {"method": "awq_lite", "alpha_step": 0.1, "debug": True}}
        mtq.quantize(model, awq_config, _forward_loop(batches, device, "calibrating (AWQ)", progress))
        if rest_quant_cfg:
            mtq.set_quantizer_by_cfg(model, rest_quant_cfg)
            with _swapped_in(model, originals, device):
                mtq.calibrate(model, algorithm="max", forward_loop=_forward_loop(batches, device, "calibrating (max)", progress))
        return _as_exported(model)


@contextlib.contextmanager
def _swapped_in(model: nn.Module, modules: dict[str, nn.Module], device: torch.device) -> Iterator[None]:
    """Put ``modules`` (name -> module) in place for the block, then the displaced ones back."""
    displaced = {name: model.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            model.set_submodule(name, module.to(device))
        yield
    finally:
        for name, module in displaced.items():
            model.set_submodule(name, module)


def _as_exported(model: nn.Module) -> nn.Module:
    """Make fused layers share scales now, as the exporter will: the in-memory model then
    computes what the exported checkpoint computes (and exporting again changes nothing).

    ``requantize_resmooth_fused_llm_layers`` is not in ModelOpt's public API (see the README's
    list and ``tests/test_modelopt_api.py``)."""
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    use_torch_nvfp4_off_cuda(model)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(model)
    return model


def modelopt_calibration_state(model: nn.Module, formats: dict[str, str], sample_ids: torch.Tensor) -> CalibrationState:
    """The calibration ModelOpt chose for ``formats`` in ``apply_plan``, as an ``autoq.calibstate``
    state: the streamed exporter given it writes what ``export_hf_checkpoint`` writes for ``model``
    (``tests/test_export.py``).

    Input amax: the per-channel amax AWQ smoothed with (``_amax_for_smoothing``), else the
    per-tensor one. AWQ: ``p = 1 / best_scale`` of awq_lite's search, as its postprocess applies it.
    """
    from autoq.calibstate import LayerCalibration, is_norm, norm_uses_weight_plus_one
    from autoq.decoder import SharedInputReaders

    modules = dict(model.named_modules())
    norms = {name: module for name, module in modules.items() if is_norm(module)}
    readers = SharedInputReaders({name: modules[name] for name in formats}, norms)
    with readers.observing(), torch.no_grad(), modelopt_quietly():
        model(input_ids=sample_ids, use_cache=False)
    shared, input_norms = readers.result(), readers.input_norms()
    layers = {}
    for name in formats:
        module, fmt = modules[name], FORMATS[formats[name]]
        quantizer = getattr(module, "input_quantizer", None)
        amax = getattr(quantizer, "_amax_for_smoothing", None)
        if amax is None and fmt.activation is not None and quantizer.amax is not None:
            amax = quantizer.amax.reshape(-1)
        layer = LayerCalibration(None if amax is None else amax.detach().float().cpu(), shared[name], input_norms[name])
        helper = getattr(module, "awq_lite", None)
        if fmt.awq and helper is not None and helper.best_scale is not None:
            layer.pre_quant_scale[fmt.name] = (1.0 / helper.best_scale.float()).detach().cpu()
            layer.alpha[fmt.name] = float(helper.best_alpha)
        layers[name] = layer
    used = {norm for norm in input_norms.values() if norm}
    return CalibrationState(layers, {n: norm_uses_weight_plus_one(norms[n]) for n in used}, {"calibrated_by": "modelopt awq_lite/max"})


def exported_layer_formats(model: nn.Module, formats: dict[str, str]) -> dict[str, str]:
    """``formats`` under the names ModelOpt's export writes.

    The export restores the hub checkpoint's names where transformers renamed modules on load
    (Mixtral's ``mlp`` is ``block_sparse_moe`` again), and writes a fused-experts projection as
    per-expert linears under the experts module (``...experts.<e>.gate_proj``, ``up_proj``,
    ``down_proj``, or the hub's ``w1``/``w3``/``w2``), which hf_quant_config lists once.
    """
    from modelopt.torch.export.quant_aware_conversion import QuantConversionUnsupportedError, build_reverse_name_mapper

    try:
        mapper = build_reverse_name_mapper(model)
    except QuantConversionUnsupportedError:
        mapper = None

    def exported(name: str) -> str:
        return mapper(f"{name}.weight").removesuffix(".weight") if mapper else name

    modules = dict(model.named_modules())
    result = {}
    for name, fmt in formats.items():
        parent, _, attr = name.rpartition(".")
        projection = getattr(modules.get(parent), attr, None)
        if isinstance(projection, nn.Parameter) and projection.dim() == 3:  # the experts module, named through its first expert
            leaf = {"gate_up_proj": "gate_proj"}.get(attr, attr)
            result[exported(f"{parent}.0.{leaf}").rsplit(".", 2)[0]] = fmt
        else:
            result[exported(name)] = fmt
    return result


def write_checkpoint(model: nn.Module, tokenizer, plan: Plan, directory: Path) -> VerifyReport:
    """Export a ModelOpt-quantized model as a unified HF checkpoint into the empty ``directory``, and
    verify it; any verification problem is an error.

    ModelOpt packs the weights in place: ``model`` is not usable for inference afterwards.
    """
    from modelopt.torch.export import export_hf_checkpoint

    dtype = next(model.parameters()).dtype
    exported_formats = exported_layer_formats(model, plan.formats())
    with modelopt_quietly():
        export_hf_checkpoint(model, dtype=dtype, export_dir=directory)
    tokenizer.save_pretrained(directory)
    plan.save(Path(directory) / "autoq_plan.json")
    report = verify_checkpoint(directory, exported_formats)
    if report.problems:
        raise AutoqError(f"exported checkpoint failed verification: {report.problems[0]} ({len(report.problems)} problem(s))")
    write_manifest(directory)  # last: every file's and tensor's sha256, for `autoq verify`
    return report


def export_checkpoint(model: nn.Module, tokenizer, plan: Plan, out_dir: Path, overwrite: bool = False) -> VerifyReport:
    """``write_checkpoint`` into ``out_dir``, all or nothing (a temporary directory renamed into place)."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        return write_checkpoint(model, tokenizer, plan, tmp)
