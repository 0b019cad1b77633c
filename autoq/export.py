"""File-to-file export: a plan applied to a safetensors checkpoint shard by shard, in PyTorch, written
as the unified HF checkpoint ModelOpt's ``export_hf_checkpoint`` writes, without building the model.

Each planned linear is read from the source files (memory-mapped), quantized with its format's
codec (``autoq.codec``) from the calibration state (``autoq.calibstate``), and written straight to
its place in the output shards (``autoq.shardwriter``); every other tensor is copied in row chunks.
What is held in memory is one fused group of layers (q/k/v, gate/up), quantized in row chunks.

What ModelOpt's export does to the calibrated model, done here in the same arithmetic:
* AWQ layers are smoothed to ``W / p`` (``Format.smooth``); the activation amax of W4A8 is
  ``max(bf16(channel amax) * p)`` in the model dtype (``apply_pre_quant_scale_and_smooth``);
* layers that read one input (``CalibrationState.fused_groups``), unless FP8, are made to agree
  (``requantize_resmooth_fused_llm_layers``): AWQ pre-scales averaged in the model dtype and the
  weights re-smoothed (``W_s * p_i / p_avg``), input amax and per-tensor weight amax (NVFP4
  global scale, W4A8's FP8 stage) set to the group maximum; an AWQ group's averaged pre-scale
  is folded into the norm producing its input (``fuse_prequant_layernorm``) instead of stored;
* scales are ``amax / largest code``, codes the nearest ``W / scale`` (``autoq.codec``);
* ``hf_quant_config.json`` and ``config.json``'s ``quantization_config`` come from ModelOpt's own
  ``process_layer_quant_config`` and ``convert_hf_quant_config_format`` (JSON only).

Supported: dense models whose checkpoint names are the modules' own (``autoq.diskmodel``), on the
CPU for every format and on CUDA when given. ``tests/test_export.py`` compares it with ModelOpt's
export byte for byte; ``benchmarks/bench_export.py`` measures its memory and time against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from autoq.calibstate import CalibrationState
from autoq.codec import codec_for, input_scale
from autoq.diskmodel import SAFETENSORS_DTYPES, DiskWeights, check_finite, check_shapes, meta_model, state_shapes
from autoq.errors import AutoqError, atomic_output_dir, log
from autoq.formats import FORMATS, Format
from autoq.manifest import write_manifest
from autoq.model import DTYPES, TIED_HEAD_REASON, lm_head_is_tied
from autoq.plan import Plan
from autoq.search_space import all_layers, planned_layers
from autoq.shardwriter import ShardWriter, TensorSpec
from autoq.verify import VerifyReport, verify_checkpoint

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
CHUNK_ELEMENTS = 1 << 24  # rows processed at a time: 64 MiB of float32 temporaries
# ModelOpt's internal format names (modelopt.torch.export.model_config) by the quant_algo that
# process_layer_quant_config writes for them (tests/test_export.py checks the correspondence).
MODELOPT_FORMATS = {
    "FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8_pc_pt", "W4A16_AWQ": "int4_awq", "W4A8_AWQ": "w4a8_awq",
    "W8A16": "int8_wo", "W8A8_SQ_PER_CHANNEL": "int8_sq", "NVFP4": "nvfp4", "W4A16_NVFP4": "w4a16_nvfp4",
    "NVFP4_AWQ": "nvfp4_awq", "W4A8_NVFP4_FP8": "w4a8_nvfp4_fp8", "W4A8_MXFP4_FP8": "w4a8_mxfp4_fp8", "MXFP8": "mxfp8",
}  # fmt: skip


@dataclass
class _Group:
    """Planned layers that read one input, quantized together as ModelOpt's export fuses them."""

    members: list[str]
    fmt: Format
    norm: str | None  # the norm an AWQ group's averaged pre-scale is folded into

    @property
    def fused(self) -> bool:  # ModelOpt's _fuse_shared_input_modules: not FP8, several modules
        return len(self.members) > 1 and self.fmt.weight != "fp8"


@dataclass
class SourceCheckpoint:
    """A checkpoint and the plan to apply to it, checked before any work (``inspect_source``)."""

    path: Path
    weights: DiskWeights
    skeleton: torch.nn.Module  # the model built from config.json, weightless
    keys: list[str]  # the tensors the loaded model would save, in its order (a tied head once)
    unsupported: str | None  # why the streamed export cannot write it (None: it can)


def inspect_source(source: Path, formats: dict[str, str], dtype: torch.dtype) -> SourceCheckpoint:
    """Read the checkpoint's headers and config and check the plan against them.

    Bad input raises ``AutoqError``: a shard missing from the index, a tensor shape config.json
    contradicts, a planned layer the model does not have or that is not linear, a tied head
    quantized, a format that cannot store a layer's shape. What the streamed export does not
    handle (tensors transformers converts on load, fused experts, Conv1D) is ``unsupported``.
    """
    source = Path(source)
    weights = DiskWeights(source)
    skeleton = meta_model(source, dtype)
    check_shapes(skeleton, weights.headers, source / "config.json")
    keys = list(state_shapes(skeleton))
    absent = [key for key in keys if key not in weights.headers]
    unsupported = None
    if absent:
        unsupported = f"the checkpoint does not store {absent[0]} under the model's own name (transformers converts its tensors on load)"
    layers, modules = planned_layers(skeleton, formats)
    for name, fmt_name in formats.items():
        layer = layers[name]
        if not FORMATS[fmt_name].quantized:
            continue
        if modules.get(name) is skeleton.get_output_embeddings() and lm_head_is_tied(skeleton):
            raise AutoqError(f"plan quantizes {name}, which cannot be: {TIED_HEAD_REASON}")
        if not layer.supports(fmt_name):
            raise AutoqError(f"{name} ({layer.out_features}x{layer.in_features}) cannot be stored as {fmt_name}")
        if unsupported is None and (layer.experts > 1 or layer.class_name != "Linear"):
            unsupported = f"{name} is a {'fused-experts projection' if layer.experts > 1 else layer.class_name}, which it does not quantize"
    return SourceCheckpoint(source, weights, skeleton, keys, unsupported)


class StreamedExport:
    """One export of ``plan`` from the checkpoint at ``source``; ``write`` fills a directory."""

    def __init__(self, source: Path, plan: Plan, state: CalibrationState, dtype: str = "bfloat16", device: str = "cpu"):
        if dtype not in DTYPES:
            raise AutoqError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
        self.plan, self.state = plan, state
        self.dtype, self.device = DTYPES[dtype], torch.device(device)
        checked = inspect_source(source, plan.formats(), self.dtype)
        if checked.unsupported:
            raise AutoqError(f"the streamed export cannot write this: {checked.unsupported} (use --engine modelopt)")
        self.source, self.weights, self.skeleton, self.keys = checked.path, checked.weights, checked.skeleton, checked.keys
        self.formats = {n: f for n, f in plan.formats().items() if FORMATS[f].quantized}
        needed = state.missing(plan.formats())
        if needed:
            raise AutoqError(f"the calibration state lacks statistics for {len(needed)} planned layer(s), first {next(iter(needed))}")
        self.groups = self._groups()

    def _groups(self) -> list[_Group]:
        """Quantized layers grouped by the input they read; every layer of a group (BF16 ones too)
        must share a format, as runtimes fuse them."""
        planned = self.plan.formats()
        groups = []
        for members in self.state.fused_groups(list(planned)):
            formats = {planned[n] for n in members}
            if len(formats) > 1:
                detail = ", ".join(f"{n}={planned[n]}" for n in members)
                raise AutoqError(f"layers that read the same input are fused at runtime and must share a format: {detail}")
            fmt = FORMATS[formats.pop()]
            if not fmt.quantized:
                continue
            norm = self.state.layers[members[0]].input_norm if fmt.awq and len(members) > 1 else None
            groups.append(_Group(members, fmt, norm if norm and f"{norm}.weight" in self.keys else None))
        return groups

    # ------------------------------------------------------------- layout
    def _specs(self) -> list[TensorSpec]:
        by_layer = {f"{name}.weight": name for name in self.formats}
        specs = []
        for key in self.keys:
            info = self.weights.headers[key]
            if key in by_layer:
                name = by_layer[key]
                fmt = FORMATS[self.formats[name]]
                group = next(g for g in self.groups if name in g.members)
                out_features, in_features = info.shape
                for stored in fmt.stored:
                    if stored.suffix == "input_scale" and fmt.activation is None:
                        continue
                    if stored.suffix == "pre_quant_scale":
                        if group.norm is None:
                            specs.append(TensorSpec(f"{name}.pre_quant_scale", self.dtype, (in_features,)))
                        continue
                    specs.append(TensorSpec(f"{name}.{stored.suffix}", SAFETENSORS_DTYPES[stored.dtype], stored.shape(out_features, in_features)))
            else:
                dtype = SAFETENSORS_DTYPES[info.dtype]
                specs.append(TensorSpec(key, self.dtype if dtype.is_floating_point else dtype, info.shape))
        return specs

    # -------------------------------------------------------------- write
    def write(self, directory: Path, tokenizer, max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> VerifyReport:
        """The checkpoint into the empty ``directory``, verified (any problem is an error)."""
        directory = Path(directory)
        writer = ShardWriter(directory, self._specs(), max_shard_bytes)
        try:
            grouped = {name for g in self.groups for name in g.members}
            owned = {f"{name}.{suffix}" for name in grouped for suffix in ("weight", "bias")} | {
                f"{g.norm}.{s}" for g in self.groups if g.norm for s in ("weight", "bias")
            }
            copies = [key for key in self.keys if key not in owned]
            with tqdm(total=len(self.groups) + len(copies), desc="autoq exporting", unit="tensor", disable=not progress, leave=False) as bar:
                for group in self.groups:
                    self._write_group(group, writer)
                    bar.update()
                for key in copies:
                    self._copy(key, writer)
                    bar.update()
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        self._write_configs(directory, tokenizer)
        report = verify_checkpoint(directory, self.plan.formats())
        if report.problems:
            raise AutoqError(f"exported checkpoint failed verification: {report.problems[0]} ({len(report.problems)} problem(s))")
        write_manifest(directory)  # last: every file's and tensor's sha256, for `autoq verify`
        return report

    def _read(self, key: str) -> torch.Tensor:
        """A source tensor (floating point: in the model dtype), checked finite, on the export device."""
        tensor = self.weights.read([key])[key]
        return (tensor.to(self.dtype) if tensor.is_floating_point() else tensor).to(self.device)

    def _write_group(self, group: _Group, writer: ShardWriter) -> None:
        fmt, dtype = group.fmt, self.dtype
        layers = [self.state.layers[name] for name in group.members]
        weights = [self._read(f"{name}.weight") for name in group.members]
        stored_scale = None
        input_amax = [None] * len(weights)
        if fmt.awq:
            scales = [layer.pre_quant_scale[fmt.name].to(self.device) for layer in layers]
            weights = [_in_rows(w, lambda rows, p=p: fmt.smooth(rows, p)) for w, p in zip(weights, scales)]
            if fmt.activation is not None:  # ModelOpt: (bf16 channel amax * p).amax() in the model dtype
                input_amax = [(layer.input_amax.to(self.device, dtype) * p).amax().to(dtype) for layer, p in zip(layers, scales)]
            stored = [p.to(dtype) for p in scales]
            stored_scale = stored[0]
            if group.fused:  # averaged in the model dtype; weights re-smoothed where theirs differs
                stored_scale = torch.stack(stored).mean(0)
                weights = [
                    w if torch.equal(p, stored_scale) else _in_rows(w, lambda rows, p=p: (rows.float() * p.float() / stored_scale.float()).to(dtype))
                    for w, p in zip(weights, stored)
                ]  # fmt: skip
        elif fmt.activation is not None:
            input_amax = [layer.input_amax.to(self.device).float().amax() for layer in layers]
        tensor_amax = [w.abs().amax().float() for w in weights]
        if group.fused:
            tensor_amax = [torch.stack(tensor_amax).amax()] * len(weights)
            if fmt.activation is not None:
                input_amax = [torch.stack(input_amax).amax()] * len(weights)
        codec = codec_for(fmt)
        for name, weight, amax, act_amax in zip(group.members, weights, tensor_amax, input_amax):
            for row, stored in _encode_in_rows(codec, weight, amax):
                for suffix, tensor in stored.items():
                    key = f"{name}.{suffix}"
                    if tensor.dim() == 0:
                        if not row:  # per-tensor scales: every chunk computes the same one
                            writer.write(key, tensor)
                        continue
                    # A stored tensor's rows follow the weight's (INT4: one per two weight rows).
                    writer.write(key, tensor, row * writer.placed[key].spec.shape[0] // weight.shape[0])
            if act_amax is not None:
                writer.write(f"{name}.input_scale", input_scale(fmt, act_amax))
            if fmt.awq and group.norm is None:
                writer.write(f"{name}.pre_quant_scale", stored_scale)
            bias = f"{name}.bias"
            if bias in self.weights.headers:
                writer.write(bias, self._read(bias))
        if group.norm is not None:
            self._fold_into_norm(group.norm, stored_scale, writer)

    def _fold_into_norm(self, norm: str, pre_quant_scale: torch.Tensor, writer: ShardWriter) -> None:
        """ModelOpt's ``fuse_prequant_layernorm``, in the model dtype."""
        weight = self._read(f"{norm}.weight")
        if self.state.norms.get(norm, False):  # the norm computes with (1 + weight)
            folded = (weight + 1.0) * pre_quant_scale - 1.0
        else:
            folded = weight * pre_quant_scale
        writer.write(f"{norm}.weight", folded.to(self.dtype))
        if f"{norm}.bias" in self.keys:
            writer.write(f"{norm}.bias", (self._read(f"{norm}.bias") * pre_quant_scale).to(self.dtype))

    def _copy(self, key: str, writer: ShardWriter) -> None:
        """A tensor the plan leaves alone, in row chunks (floating point: in the model dtype)."""
        info = self.weights.headers[key]
        rows = max(1, CHUNK_ELEMENTS // max(1, math.prod(info.shape[1:]))) if info.shape else 1
        from safetensors import safe_open

        with safe_open(str(self.source / info.shard), framework="pt") as handle:
            if not info.shape:
                chunks: Iterator[tuple[int, torch.Tensor]] = iter([(0, handle.get_tensor(key))])
            else:
                view = handle.get_slice(key)
                chunks = ((start, view[start : start + rows]) for start in range(0, info.shape[0], rows))
            for start, chunk in chunks:
                if chunk.is_floating_point():
                    chunk = chunk.to(self.dtype)
                    check_finite(key, chunk)
                writer.write(key, chunk, start)

    # ------------------------------------------------------------ configs
    def _write_configs(self, directory: Path, tokenizer) -> None:
        """hf_quant_config.json, config.json with quantization_config, generation config, tokenizer,
        autoq_plan.json: what ModelOpt's export and ``autoq.apply.write_checkpoint`` write."""
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
        from modelopt.torch.export.plugins import sanitize_hf_config_for_deployment

        quant = hf_quant_config(self.skeleton, self.formats)
        self.skeleton.config.save_pretrained(directory)
        self._generation_config().save_pretrained(directory)
        config_path = directory / "config.json"
        config = json.loads(config_path.read_text())
        sanitize_hf_config_for_deployment(config, self.skeleton)
        if quant["quantization"].get("quant_algo") is not None:
            (directory / "hf_quant_config.json").write_text(json.dumps(quant, indent=4))
            config["quantization_config"] = convert_hf_quant_config_format(quant)
        config_path.write_text(json.dumps(config, indent=4))
        tokenizer.save_pretrained(directory)
        self.plan.save(directory / "autoq_plan.json")

    def _generation_config(self):
        """As ``from_pretrained`` sets it: the source's generation_config.json, else from the config."""
        from transformers import GenerationConfig

        if (self.source / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(self.source)
        return GenerationConfig.from_model_config(self.skeleton.config)


def unsupported_reason(source: Path, formats: dict[str, str], dtype: str) -> str | None:
    """Why the streamed export cannot write ``formats`` for the checkpoint at ``source`` (None: it
    can); bad input raises, as the export itself would (``inspect_source``)."""
    return inspect_source(source, formats, DTYPES[dtype]).unsupported


def hf_quant_config(model: torch.nn.Module, formats: dict[str, str]) -> dict:
    """hf_quant_config.json for ``formats`` (quantized layers only) over ``model``'s linear layers,
    built by ModelOpt's own ``process_layer_quant_config`` as its ``get_quant_config`` does.

    ModelOpt's ``get_quant_config`` lists every module ``mtq.quantize`` gave quantizers, which is every
    module of a type in its ``QuantModuleRegistry`` that holds a weight: the embeddings (and any
    ``nn.LayerNorm``) too. Left unquantized, they go into ``exclude_modules`` of a single-format
    checkpoint, so they are listed here as well."""
    import modelopt
    from modelopt.torch.export.quant_utils import process_layer_quant_config
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    layer_config = {}
    for layer in all_layers(model):
        fmt = FORMATS[formats[layer.name]] if layer.name in formats else None
        layer_config[f"{layer.name}.quantization"] = MODELOPT_FORMATS[fmt.hf_quant_algo] if fmt else None
        layer_config[f"{layer.name}.awq_block_size"] = (fmt.weight_block or 0) if fmt else 0
    for name, module in model.named_modules():
        given_quantizers = type(module) in QuantModuleRegistry and getattr(module, "weight", None) is not None
        if given_quantizers and f"{name}.quantization" not in layer_config:
            layer_config[f"{name}.quantization"] = None
            layer_config[f"{name}.awq_block_size"] = 0
    quantization = {"quant_algo": None, "kv_cache_quant_algo": None}
    quantization.update(process_layer_quant_config(layer_config))
    return {"producer": {"name": "modelopt", "version": modelopt.__version__}, "quantization": quantization}


def _row_chunk(shape: torch.Size) -> int:
    """Rows per chunk: about ``CHUNK_ELEMENTS`` elements, a multiple of 128 (INT4 packs row pairs;
    any block along the output stays whole)."""
    per_row = max(1, math.prod(shape[1:]))
    return max(128, CHUNK_ELEMENTS // per_row // 128 * 128)


def _in_rows(weight: torch.Tensor, transform) -> torch.Tensor:
    """``transform`` applied to ``weight`` a chunk of rows at a time (bounded float32 temporaries)."""
    rows = _row_chunk(weight.shape)
    if weight.shape[0] <= rows:
        return transform(weight)
    return torch.cat([transform(weight[start : start + rows]) for start in range(0, weight.shape[0], rows)])


def _encode_in_rows(codec, weight: torch.Tensor, tensor_amax: torch.Tensor) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, stored tensors) of ``weight`` encoded a chunk of rows at a time: the same tensors
    as encoding it whole, given its per-tensor amax (each stored tensor's rows follow the weight's)."""
    rows = _row_chunk(weight.shape)
    for start in range(0, weight.shape[0], rows):
        stored = codec.encode(weight[start : start + rows], tensor_amax)
        yield start, {k: v.cpu() for k, v in stored.items()}


def stream_export(
    source: Path, plan: Plan, state: CalibrationState, out_dir: Path, tokenizer, overwrite: bool = False, dtype: str = "bfloat16",
    device: str = "cpu", max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
) -> VerifyReport:  # fmt: skip
    """``StreamedExport(...).write`` into ``out_dir``, all or nothing (a temporary directory renamed
    into place; one left by an interrupted run is removed first, see ``atomic_output_dir``)."""
    export = StreamedExport(source, plan, state, dtype, device)
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        report = export.write(tmp, tokenizer, max_shard_bytes, progress)
    log(f"streamed export of {len(export.formats)} quantized layers from {source}")
    return report
