"""Apply a plan with NVIDIA ModelOpt, calibrate, and export a unified HF checkpoint.

The plan becomes ModelOpt ``quant_cfg`` entries, one per quantizer of every planned layer, plus
the KV-cache preset's ``*[kv]_bmm_quantizer`` entry when a KV cache is asked for. Calibration
follows each format's needs: AWQ-lite for W4A8 / INT4_AWQ layers, SmoothQuant for INT8_SQ, ``max``
for the rest and the KV cache, each pass with the other groups' quantizers switched off. Export
goes through ``modelopt.torch.export.export_hf_checkpoint`` into a temporary directory that is
verified (``autoq.verify``) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
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
from autoq.formats import FORMATS, KVCacheFormat, get_kv_cache_format
from autoq.manifest import write_manifest
from autoq.model import TIED_HEAD_REASON, lm_head_is_tied
from autoq.plan import Plan
from autoq.search_space import planned_layers
from autoq.verify import VerifyReport, verify_checkpoint


@contextlib.contextmanager
def modelopt_quietly() -> Iterator[None]:
    """ModelOpt prints progress chatter ("Inserted N quantizers", awq_lite steps) on stdout and warns
    about untested transformers versions; keep stdout for results and drop that noise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


@functools.cache
def modelopt_quantization():
    """``modelopt.torch.quantization``, imported so that no model stays in memory because of it.

    ModelOpt's AutoQuantize imports PuLP, which keeps the exceptions of its optional solvers'
    failed imports as class attributes (``COPT_DLL.err``, ``CPLEX_PY.err``, ...). Their tracebacks
    keep every frame that was on the stack at that first import, locals included: a model being
    searched or applied stayed in memory after it was deleted (7 GiB in float32 for a 1.5B model,
    and a sweep ran out of memory). The tracebacks are dropped here, after the import."""
    import sys

    import modelopt.torch.quantization as mtq
    import pulp  # noqa: F401 - imported here, with its import failures, to be cleaned below

    for name, module in list(sys.modules.items()):
        if not name.startswith("pulp"):
            continue
        for value in list(vars(module).values()):
            error = value.__dict__.get("err") if isinstance(value, type) else None
            while isinstance(error, BaseException) and error.__traceback__ is not None:
                error.__traceback__ = None
                error = error.__context__
    return mtq


def _quantizer_name(layer: str, quantizer: str) -> str:
    """ModelOpt's name for a quantizer of ``layer``. A fused-experts projection (``...experts.gate_up_proj``)
    has one input quantizer and one weight quantizer per expert (``_QuantFusedExperts``)."""
    parent, _, attr = layer.rpartition(".")
    if attr in ("gate_up_proj", "up_proj", "down_proj") and parent.endswith(".experts"):
        return f"{layer}_input_quantizer" if quantizer == "input_quantizer" else f"{layer}_weight_quantizers.*"
    return f"{layer}.{quantizer}"


def modelopt_config(formats: dict[str, str], kv_cache: KVCacheFormat | None = None) -> dict:
    """The ModelOpt quantize config realising ``formats`` (layer name -> format name) and the KV cache."""
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, fmt_name in formats.items():
        for quantizer, cfg in FORMATS[fmt_name].modelopt_quantizer_cfgs().items():
            if cfg is not None:
                quant_cfg.append({"quantizer_name": _quantizer_name(name, quantizer), "cfg": cfg})
    if kv_cache is not None:
        quant_cfg += kv_cache.modelopt_quant_cfg()
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def kv_cache_attention_layers(model: nn.Module) -> list[str]:
    """Attention modules whose KV cache ModelOpt's export quantizes and writes scales for: transformers
    attention classes on the attention-function interface (ModelOpt's ``_QuantAttention`` test: the
    class's module has ``ALL_ATTENTION_FUNCTIONS``) with ``k_proj`` and ``v_proj`` linears, the names
    the exporter writes ``k_proj.k_scale`` / ``v_proj.v_scale`` under."""
    found = []
    for name, module in model.named_modules():
        cls = next((c for c in type(module).__mro__ if c.__module__.startswith("transformers.")), type(module))
        if not cls.__name__.endswith("Attention") or getattr(inspect.getmodule(cls), "ALL_ATTENTION_FUNCTIONS", None) is None:
            continue
        if all(isinstance(getattr(module, proj, None), nn.Linear) for proj in ("k_proj", "v_proj")):
            found.append(name)
    return found


def check_kv_cache_fits_model(model: nn.Module, kv_cache: KVCacheFormat | None) -> None:
    """A KV cache needs attention layers the exporter knows (``kv_cache_attention_layers``)."""
    if kv_cache is not None and not kv_cache_attention_layers(model):
        raise AutoqError(f"--kv-cache {kv_cache.name.lower()}: {type(model).__name__} has no attention layers the exporter "
                         "writes KV-cache scales for (transformers attention modules with k_proj and v_proj linears)")  # fmt: skip


def check_plan_fits_model(model: nn.Module, formats: dict[str, str], sample_ids: torch.Tensor) -> None:
    """Every planned layer exists, is linear (or a fused-experts projection), fits its format, and fused layers agree."""
    layers, modules = planned_layers(model, formats)
    for name, fmt_name in formats.items():
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
TORCH_MXFP8_BACKEND = "autoq_torch_mxfp8"


def _torch_nvfp4(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    return fakequant.nvfp4(inputs, quantizer.amax.float(), quantizer.block_sizes[-1])


def _torch_mxfp8(inputs: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
    return fakequant.mxfp8(inputs, quantizer.block_sizes[-1])


def _register_torch_backends() -> None:
    from modelopt.torch.quantization.nn import is_registered_quant_backend, register_quant_backend

    for name, backend in ((TORCH_NVFP4_BACKEND, _torch_nvfp4), (TORCH_MXFP8_BACKEND, _torch_mxfp8)):
        if not is_registered_quant_backend(name):
            register_quant_backend(name, backend)


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

    _register_torch_backends()
    config = copy.deepcopy(getattr(mtq, preset))
    for entry in config["quant_cfg"]:
        cfg = entry.get("cfg")
        if isinstance(cfg, dict) and _is_nvfp4(cfg):
            entry["cfg"] = {**cfg, "backend": TORCH_NVFP4_BACKEND}
    return config


def use_torch_nvfp4_off_cuda(model: nn.Module) -> int:
    """Route NVFP4 and MXFP8 fake quantization of a non-CUDA model through ``autoq.fakequant``.

    ModelOpt's NVFP4 and MX fake-quant kernels are CUDA/Triton only; its quantizers accept a
    registered functional backend, so the same calibrated quantizers run on CPU with our
    bit-matched implementations. Returns how many quantizers were switched.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer

    _register_torch_backends()
    on_cuda = any(p.is_cuda for p in model.parameters())
    switched = 0
    for module in model.modules():
        blocks = getattr(module, "block_sizes", None) if isinstance(module, TensorQuantizer) else None
        dynamic = bool(blocks) and blocks.get("type") == "dynamic"
        nvfp4 = dynamic and module.num_bits == (2, 1) and blocks.get("scale_bits") == (4, 3)
        mxfp8 = dynamic and module.num_bits == (4, 3) and blocks.get("scale_bits") == (8, 0)
        if nvfp4 and module.amax is not None and not module.amax.is_cuda:
            module.backend = TORCH_NVFP4_BACKEND
            switched += 1
        elif mxfp8 and not on_cuda:  # MX quantizers hold no tensor to tell their device by
            module.backend = TORCH_MXFP8_BACKEND
            switched += 1
    return switched


def _forward_loop(batches: list[torch.Tensor], device: torch.device, desc: str, progress: bool) -> Callable:
    def loop(model: nn.Module) -> None:
        for ids in tqdm(batches, desc=f"autoq {desc}", disable=not progress, leave=False):
            model(input_ids=ids.to(device), use_cache=False)

    return loop


# Calibration passes in order: the pre-scaling algorithms smooth weights in place, so they run first,
# and later passes see their layers' unquantized originals.
# debug: awq_lite keeps its per-layer search results (module.awq_lite), read by modelopt_calibration_state.
_PASSES = (("awq_lite", {"method": "awq_lite", "alpha_step": 0.1, "debug": True}), ("smoothquant", "smoothquant"), ("max", "max"))


def apply_plan(
    model: nn.Module, formats: dict[str, str], batches: list[torch.Tensor], progress: bool = True,
    kv_cache: KVCacheFormat | None = None,
) -> nn.Module:  # fmt: skip
    """Quantize ``model`` in place with ModelOpt as ``formats`` says (and its KV cache as ``kv_cache``
    says), calibrated on ``batches``.

    One calibration pass per algorithm the plan needs: AWQ layers first (awq_lite, the others off),
    then SmoothQuant layers, then the remaining layers and the KV cache (max), each later pass with
    the earlier passes' layers swapped back to their unquantized originals (AWQ and SmoothQuant
    smooth weights in place, and a smoothed layer's output differs in the last bits). So every
    layer is calibrated on the unquantized model's own activations, and its scales do not depend
    on the other layers' formats (``autoq.measure`` relies on it).
    """
    mtq = modelopt_quantization()

    device = next(model.parameters()).device
    check_plan_fits_model(model, formats, batches[0][:1, :64].to(device))
    check_kv_cache_fits_model(model, kv_cache)
    groups = {calibration: {} for calibration, _ in _PASSES}
    for name, fmt in formats.items():
        groups["max" if FORMATS[fmt].calibration in (None, "max") else FORMATS[fmt].calibration][name] = fmt
    passes = [(groups[c], algorithm, kv_cache if c == "max" else None) for c, algorithm in _PASSES]
    passes = [p for p in passes if p[0] or p[2] is not None] or [({}, "max", None)]  # nothing planned: ModelOpt still wraps the model
    originals: dict[str, nn.Module] = {}
    with modelopt_quietly():
        for index, (layers, algorithm, kv) in enumerate(passes):
            if index + 1 < len(passes):  # later passes run with these layers unquantized
                originals |= {n: copy.deepcopy(model.get_submodule(n)).cpu() for n in layers}
            config = {**modelopt_config(layers, kv), "algorithm": algorithm}
            loop = _forward_loop(batches, device, f"calibrating ({config['algorithm'] if isinstance(algorithm, str) else 'AWQ'})", progress)
            if index == 0:
                mtq.quantize(model, config, loop)
                continue
            mtq.set_quantizer_by_cfg(model, config["quant_cfg"][1:])  # without the leading "disable everything"
            with _swapped_in(model, {n: m for n, m in originals.items() if n not in layers}, device):
                mtq.calibrate(model, algorithm=algorithm, forward_loop=loop)
    if kv_cache is not None:
        _check_kv_cache_calibrated(model, kv_cache)
    return _as_exported(model)


def _check_kv_cache_calibrated(model: nn.Module, kv_cache: KVCacheFormat) -> None:
    """ModelOpt wrapped and calibrated the k/v quantizers of every attention layer the exporter knows."""
    for name in kv_cache_attention_layers(model):
        module = model.get_submodule(name)
        quantizers = [getattr(module, q, None) for q in ("k_bmm_quantizer", "v_bmm_quantizer")]
        if not all(q is not None and q.is_enabled and q.amax is not None for q in quantizers):
            raise AutoqError(f"--kv-cache {kv_cache.name.lower()}: ModelOpt did not calibrate the KV cache of {name} "
                             f"({type(module).__name__})")  # fmt: skip


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
    kv_cache = get_kv_cache_format(plan.kv_cache)
    report = verify_checkpoint(directory, exported_formats, kv_cache=None if kv_cache is None else kv_cache.hf_quant_algo)
    if report.problems:
        raise AutoqError(f"exported checkpoint failed verification: {report.problems[0]} ({len(report.problems)} problem(s))")
    write_manifest(directory)  # last: every file's and tensor's sha256, for `autoq verify`
    return report


def export_checkpoint(model: nn.Module, tokenizer, plan: Plan, out_dir: Path, overwrite: bool = False) -> VerifyReport:
    """``write_checkpoint`` into ``out_dir``, all or nothing (a temporary directory renamed into place)."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        return write_checkpoint(model, tokenizer, plan, tmp)
