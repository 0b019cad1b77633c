"""Apply a plan with NVIDIA ModelOpt, calibrate, and export a unified HF checkpoint.

The plan becomes ModelOpt ``quant_cfg`` entries, one per quantizer of every planned layer.
Calibration follows each format's needs: AWQ-lite for W4A8 / INT4_AWQ layers, ``max`` for the
rest, each pass with the other group's quantizers switched off. Export goes through ``modelopt.torch.export.export_hf_checkpoint`` into a
temporary directory that is verified (``autoq.verify``) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from autoq import fakequant
from autoq.errors import AutoqError, atomic_output_dir
from autoq.formats import FORMATS
from autoq.model import TIED_HEAD_REASON, lm_head_is_tied, shared_input_readers
from autoq.plan import Plan
from autoq.verify import VerifyReport, verify_checkpoint


@contextlib.contextmanager
def modelopt_quietly() -> Iterator[None]:
    """ModelOpt prints progress chatter ("Inserted N quantizers", awq_lite steps) on stdout and warns
    about untested transformers versions; keep stdout for results and drop that noise."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def modelopt_config(formats: dict[str, str]) -> dict:
    """The ModelOpt quantize config realising ``formats`` (layer name -> format name)."""
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for name, fmt_name in formats.items():
        for quantizer, cfg in FORMATS[fmt_name].modelopt_quantizer_cfgs().items():
            if cfg is not None:
                quant_cfg.append({"quantizer_name": f"{name}.{quantizer}", "cfg": cfg})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def check_plan_fits_model(model: nn.Module, formats: dict[str, str], sample_ids: torch.Tensor) -> None:
    """Every planned layer exists, is linear, fits its format, and fused layers agree."""
    modules = dict(model.named_modules())
    missing = [name for name in formats if name not in modules]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AutoqError(f"plan names {len(missing)} layer(s) the model does not have: {shown}")
    for name, fmt_name in formats.items():
        module = modules[name]
        if not isinstance(module, nn.Linear):
            raise AutoqError(f"plan layer {name} is a {type(module).__name__}, not a linear layer")
        if module is model.get_output_embeddings() and FORMATS[fmt_name].quantized and lm_head_is_tied(model):
            raise AutoqError(f"plan quantizes {name}, which cannot be: {TIED_HEAD_REASON}")
        if not FORMATS[fmt_name].supports(module.out_features, module.in_features):
            raise AutoqError(f"{name} ({module.out_features}x{module.in_features}) cannot be stored as {fmt_name}")
    readers = shared_input_readers(model, list(formats), sample_ids)
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


def use_torch_nvfp4_off_cuda(model: nn.Module) -> int:
    """Route NVFP4 fake quantization of a non-CUDA model through ``autoq.fakequant``.

    ModelOpt's NVFP4 fake-quant kernels are CUDA/Triton only; its quantizers accept a registered
    functional backend, so the same calibrated quantizers run on CPU with our bit-matched
    implementation. Returns how many quantizers were switched.
    """
    from modelopt.torch.quantization.nn import TensorQuantizer, is_registered_quant_backend, register_quant_backend

    if not is_registered_quant_backend(TORCH_NVFP4_BACKEND):
        register_quant_backend(TORCH_NVFP4_BACKEND, _torch_nvfp4)
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
    layers are configured and max-calibrated with the AWQ layers switched off, so neither
    calibration disturbs the other's state.
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
        awq_config = {**modelopt_config(awq), "algorithm": {"method": "awq_lite", "alpha_step": 0.1}}
        mtq.quantize(model, awq_config, _forward_loop(batches, device, "calibrating (AWQ)", progress))
        rest_quant_cfg = modelopt_config(rest)["quant_cfg"][1:]  # without the leading "disable everything"
        if rest_quant_cfg:
            mtq.set_quantizer_by_cfg(model, rest_quant_cfg)
            with mtq.set_quantizer_by_cfg_context(model, [{"quantizer_name": f"{n}.*", "enable": False} for n in awq]):
                mtq.calibrate(model, algorithm="max", forward_loop=_forward_loop(batches, device, "calibrating (max)", progress))
        return _as_exported(model)


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


def write_checkpoint(model: nn.Module, tokenizer, plan: Plan, directory: Path) -> VerifyReport:
    """Export a ModelOpt-quantized model as a unified HF checkpoint into the empty ``directory``, and
    verify it; any verification problem is an error.

    ModelOpt packs the weights in place: ``model`` is not usable for inference afterwards.
    """
    from modelopt.torch.export import export_hf_checkpoint

    dtype = next(model.parameters()).dtype
    with modelopt_quietly():
        export_hf_checkpoint(model, dtype=dtype, export_dir=directory)
    tokenizer.save_pretrained(directory)
    plan.save(Path(directory) / "autoq_plan.json")
    report = verify_checkpoint(directory, plan.formats())
    if report.problems:
        raise AutoqError(f"exported checkpoint failed verification: {report.problems[0]} ({len(report.problems)} problem(s))")
    return report


def export_checkpoint(model: nn.Module, tokenizer, plan: Plan, out_dir: Path, overwrite: bool = False) -> VerifyReport:
    """``write_checkpoint`` into ``out_dir``, all or nothing (a temporary directory renamed into place)."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        return write_checkpoint(model, tokenizer, plan, tmp)
