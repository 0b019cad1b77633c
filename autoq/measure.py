"""Measuring many plans fast: a model whose layers switch format without re-quantizing.

``SwitchableModel`` quantizes a copy of the model once per candidate format (``apply_plan`` on a
uniform plan of that format over the layers that allow it) and keeps, per layer, the quantized
module of every format. Applying a plan then only swaps modules. This reproduces exactly what
``apply_plan`` computes for any mixed plan, because in ``apply_plan``

* calibration sees unquantized activations (``max`` collects statistics with quantization off,
  ``awq_lite`` forwards the unquantized output), so a layer's scales do not depend on the formats
  of the other layers, and
* the export-time fusion (``requantize_resmooth_fused_llm_layers``) only ties layers that read the
  same tensor, which share a format. It may also fold an AWQ pre-scale into the norm that feeds
  them: such a norm is a *companion* of its readers and switches with them.

Each quantized layer's weight is fake-quantized once at build time (its weight quantizer then off),
so a trial costs one forward pass per held-out batch. Where the dense copies would not fit comfortably
(more than half of the memory available when the build starts), each fake-quantized weight is kept
*packed*: its distinct bit patterns and a uint8/int16 index per element (a quantized weight holds at
most a few thousand distinct values), unpacked just for its own forward. That is lossless by
construction (the unpacked tensor has the very bits of the dense one) and costs one gather per layer
and forward: an FP8 copy takes 1 byte per weight instead of 4 in float32, an NVFP4 copy at most 2.
``tests/test_refine.py`` checks that the metric of a switched plan equals ``autoq eval``'s
(``apply_plan`` + ``mean_kl``) bit for bit, packed or not.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from autoq.apply import apply_plan
from autoq.devices import available_memory_bytes
from autoq.diskmodel import release_memory
from autoq.errors import AutoqError
from autoq.evaluate import _log_probs
from autoq.formats import FORMATS


@dataclass
class _Companion:
    """A non-searched module that a format's quantization changes (an AWQ-fused norm)."""

    readers: list[str]  # searched layers that read its output
    original: nn.Module
    variants: dict[str, nn.Module] = field(default_factory=dict)  # format -> changed module


class SwitchableModel:
    """``model`` itself, its searched linears made to take any of their candidate formats.

    ``candidates`` maps each planned layer to the formats it may take (a group's formats, so
    fused layers can always agree). The model is taken, not copied (pass a copy to keep the
    original): building costs one ``apply_plan`` per quantized format on a copy of it, and memory
    is one model plus one copy of the searched linears per quantized format (packed: 1-2 bytes per
    weight; ``pack=None`` packs when the dense copies would take over half the available memory),
    and one more model while a format is built.
    """

    def __init__(
        self,
        model: nn.Module,
        candidates: dict[str, list[str]],
        calib_batches: list[torch.Tensor],
        progress: bool = True,
        pack: bool | None = None,
    ):
        self.model = model
        self.model.requires_grad_(False)
        own = dict(self.model.named_modules())
        self._original = {name: own[name] for name in candidates}
        self._variants: dict[str, dict[str, nn.Module]] = {name: {} for name in candidates}
        self._companions: dict[str, _Companion] = {}
        self._current = {name: "BF16" for name in candidates}
        quantized_formats = sorted({f for c in candidates.values() for f in c if FORMATS[f].quantized})
        self.packed = _should_pack(model, candidates) if pack is None else pack
        for fmt in quantized_formats:
            layers = [name for name, c in candidates.items() if fmt in c]
            # self.model is still unquantized here (nothing is switched before the first ``use``).
            quantized = apply_plan(copy.deepcopy(self.model), dict.fromkeys(layers, fmt), calib_batches, progress=progress)
            modules = dict(quantized.named_modules())
            for name in layers:
                self._variants[name][fmt] = _with_quantized_weight(modules[name], self.packed)
            for name in _changed_modules(self.model, quantized, skip=list(candidates)):
                self._companion(name, calib_batches[0]).variants[fmt] = modules[name]
            del quantized, modules
            release_memory()  # the rest of the copy, before the next format's

    def _companion(self, name: str, sample: torch.Tensor) -> _Companion:
        if name not in self._companions:
            readers = _readers_of(self.model, name, list(self._original), sample[:1, :64])
            if not readers:
                raise AutoqError(f"quantization changes {name}, which feeds no searched layer: cannot switch formats per layer")
            self._companions[name] = _Companion(readers, self.model.get_submodule(name))
        return self._companions[name]

    def use(self, formats: dict[str, str]) -> nn.Module:
        """Switch every searched layer (and companion) to ``formats``; returns the model."""
        missing = set(self._original) - set(formats)
        if missing:
            raise AutoqError(f"plan leaves {len(missing)} searched layer(s) without a format, e.g. {sorted(missing)[0]}")
        for name, fmt in formats.items():
            if self._current.get(name) == fmt:
                continue
            if fmt != "BF16" and fmt not in self._variants[name]:
                raise AutoqError(f"{name} has no {fmt} variant (not one of its candidate formats)")
            self.model.set_submodule(name, self._original[name] if fmt == "BF16" else self._variants[name][fmt])
            self._current[name] = fmt
        for name, companion in self._companions.items():
            fmts = {formats[r] for r in companion.readers}
            if len(fmts) > 1:
                raise AutoqError(f"layers reading {name} must share a format: {', '.join(sorted(fmts))}")
            fmt = fmts.pop()
            self.model.set_submodule(name, companion.variants.get(fmt, companion.original))
        return self.model


def _should_pack(model: nn.Module, candidates: dict[str, list[str]]) -> bool:
    """Whether the dense quantized copies would take more than half of the memory available now."""
    modules = dict(model.named_modules())
    dense = sum(modules[name].weight.nbytes * sum(FORMATS[f].quantized for f in fmts) for name, fmts in candidates.items())
    available = available_memory_bytes(next(model.parameters()).device)
    return available is not None and dense > available / 2


@dataclass
class PackedWeight:
    """A tensor stored as its distinct bit patterns and, per element, the index of its own."""

    values: torch.Tensor  # the distinct values, in the tensor's dtype
    index: torch.Tensor  # uint8, or int16 offset by -32768
    shape: torch.Size

    @classmethod
    def pack(cls, tensor: torch.Tensor) -> PackedWeight | None:
        """The packed tensor, or None where packing saves nothing (too many distinct values)."""
        as_int = {4: torch.int32, 2: torch.int16}.get(tensor.element_size())
        if as_int is None:
            return None
        # Unique *bit patterns*, so -0.0 and +0.0 (or two NaNs) stay what they were.
        bits, inverse = torch.unique(tensor.reshape(-1).view(as_int), return_inverse=True)
        if len(bits) <= 256:
            index = inverse.to(torch.uint8)
        elif len(bits) <= 65536 and tensor.element_size() > 2:
            index = (inverse - 32768).to(torch.int16)
        else:
            return None
        packed = cls(bits.view(tensor.dtype), index, tensor.shape)
        return packed if packed.nbytes < tensor.nbytes else None

    def unpack(self) -> torch.Tensor:
        index = self.index.int() + 32768 if self.index.dtype == torch.int16 else self.index.int()
        return self.values[index].view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.index.nbytes


def _with_quantized_weight(module: nn.Module, pack: bool) -> nn.Module:
    """Store the fake-quantized weight (what the weight quantizer computes every forward) once,
    packed if asked and if packing saves memory."""
    with torch.no_grad():
        weight = module.weight_quantizer(module.weight)
    module.weight_quantizer.disable()
    packed = PackedWeight.pack(weight) if pack else None
    if packed is None:
        module.weight.data = weight
        return module
    empty = weight.new_empty(0)
    module.weight.data = empty
    module.packed_weight = packed  # kept with its module, so a switched-out layer keeps it too

    def unpack(mod: nn.Module, _args: tuple) -> None:
        mod.weight.data = mod.packed_weight.unpack()

    def release(mod: nn.Module, _args: tuple, _output) -> None:
        mod.weight.data = empty

    module.register_forward_pre_hook(unpack)
    module.register_forward_hook(release)
    return module


def _changed_modules(reference: nn.Module, quantized: nn.Module, skip: list[str]) -> list[str]:
    """Modules outside ``skip`` (and their children) whose own parameters or buffers changed."""
    ref_modules = dict(reference.named_modules())
    skipped = tuple(f"{s}." for s in skip)
    changed = []
    for name, module in quantized.named_modules():
        ref = ref_modules.get(name)
        if ref is None or name in skip or name.startswith(skipped):
            continue
        ours = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        theirs = dict(ref.named_parameters(recurse=False)) | dict(ref.named_buffers(recurse=False))
        if ours.keys() != theirs.keys() or any(
            ours[k].shape != theirs[k].shape or not torch.equal(ours[k], theirs[k].to(ours[k].device)) for k in ours
        ):
            changed.append(name)
    return changed


def _readers_of(model: nn.Module, producer: str, layers: list[str], input_ids: torch.Tensor) -> list[str]:
    """The ``layers`` whose input is the very tensor module ``producer`` outputs (one forward pass)."""
    modules = dict(model.named_modules())
    produced: list[torch.Tensor] = []
    readers: list[str] = []

    def keep_output(_module: nn.Module, _args: tuple, output) -> None:
        produced.append(output[0] if isinstance(output, tuple) else output)

    def make_reader_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if any(args[0] is p for p in produced) and name not in readers:
                readers.append(name)

        return hook

    handles = [modules[producer].register_forward_hook(keep_output)]
    handles += [modules[name].register_forward_pre_hook(make_reader_hook(name)) for name in layers]
    try:
        with torch.no_grad():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return readers


class HeldoutSlice:
    """Held-out token batches with the reference model's log-probs computed once.

    ``measure`` gives the same numbers as ``autoq.evaluate.mean_kl`` and ``perplexity`` on these
    batches (same log-prob function, same summation order), from one forward pass of the model.
    """

    def __init__(self, reference: nn.Module, batches: list[torch.Tensor], description: dict):
        self.batches = batches
        self.description = description
        self._reference = [_log_probs(reference, ids) for ids in batches]

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        kl_total, nll_total, count = 0.0, 0.0, 0
        for ids, ref in zip(self.batches, self._reference):
            ours = _log_probs(model, ids).to(ref.device)
            kl_total += (ref.exp() * (ref - ours)).sum().item()
            targets = ids[:, 1:].to(ours.device)
            nll_total += -ours.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
        return {"kl": kl_total / count, "ppl": math.exp(nll_total / count)}
