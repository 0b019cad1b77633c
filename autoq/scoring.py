"""Score hooks: each searched layer's ``sum((dL/dY * (Q_f(Y) - Y))^2)``, added up during the backward pass.

A forward hook on each layer attaches a gradient hook to its output ``Y``. When the gradient
``dL/dY`` arrives, the hook computes ``Q_f(Y) = Q_f(X) Q_f(W)^T`` for every candidate format
and reduces the term at once, so ``Q_f(Y) - Y`` never exists for more than one layer and one
format at a time. Quantized weights are built once per block and chunk, as the exporter will
store them; an input read by several fused layers (q/k/v) is quantized once per format.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from autoq import fakequant
from autoq.calibration import LayerStats
from autoq.formats import Format
from autoq.hooks import HooksMixin
from autoq.targets import Target


@fakequant.fused_on_cuda
def fisher_term(grad: torch.Tensor, quantized_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``sum((grad * (Q(Y) - Y))^2)`` in float32 (ModelOpt clamps the product the same way).

    One fused pass on CUDA: ``Q(Y) - Y`` is never written to memory.
    """
    diff = quantized_output - output  # in the model's dtype, as the quantized model computes it
    return diff.float().mul_(grad).clamp_(-1e10, 1e10).square_().sum()


@fakequant.fused_on_cuda
def fisher_terms(grad: torch.Tensor, output: torch.Tensor, *quantized_outputs: torch.Tensor) -> torch.Tensor:
    """``fisher_term`` of each quantized output, stacked: one fused pass over ``grad`` and ``output``
    on CUDA for all of a layer's formats."""
    return torch.stack([fisher_term.__wrapped__(grad, q, output) for q in quantized_outputs])


@dataclass
class _Prepared:
    """One format of one layer, ready to quantize that layer's inputs in a gradient hook."""

    fmt: Format
    qweight: torch.Tensor
    pre_quant_scale: torch.Tensor | None
    channel_amax: torch.Tensor


class ScoreHooks(HooksMixin):
    """Accumulates the scores of every target, per format, on ``device`` (read with ``totals``)."""

    def __init__(
        self, targets: list[Target], stats: dict[str, LayerStats], export_fused_scales: bool, device: torch.device,
        fuse_formats: bool = False,
    ):
        self.stats = stats
        self.export_fused_scales = export_fused_scales
        self.fuse_formats = fuse_formats and device.type == "cuda"  # no gain from eager (CPU) stacking
        # float64: sums over steps do not depend on how the steps are chunked (resume is exact)
        self._totals = {t.name: {f.name: torch.zeros((), dtype=torch.float64, device=device) for f in t.formats} for t in targets}
        # Linears fused at runtime read one input (q/k/v): quantize it once per format. Their
        # gradient hooks fire one after another, so only the latest input's quantizations are
        # kept, and only for inputs with several readers.
        # Keyed by the input tensor object the layers were called with: a detached view of it
        # is a new object on every call, so it cannot tell a shared input from a fresh one.
        self._quantized_inputs: dict[tuple[str, int], torch.Tensor] = {}
        self._quantized_from: torch.Tensor | None = None

    def totals(self) -> dict[str, dict[str, float]]:
        return {name: {fmt: value.item() for fmt, value in per.items()} for name, per in self._totals.items()}

    @contextlib.contextmanager
    def scoring(self, targets: list[Target]) -> Iterator[Callable[[], None]]:
        """Score ``targets`` during the ``with`` block; call the yielded function after each
        step's backward pass (it drops that step's quantized inputs)."""
        prepared = self._prepare(targets)
        readers = Counter(self.stats[t.name].shared_input for t in targets)
        with self.hooks_attached():
            for target in targets:
                shared = readers[self.stats[target.name].shared_input] > 1
                hook = functools.partial(self._on_forward, target, prepared[target.name], shared)
                self.register_hook(target.module, hook, "forward")
            try:
                yield self._forget
            finally:
                self._forget()

    def _forget(self) -> None:
        self._quantized_inputs.clear()
        self._quantized_from = None

    def _prepare(self, targets: list[Target]) -> dict[str, list[_Prepared]]:
        """Quantized weights of one block, as the exporter will store them.

        Linears that read one input are fused at runtime, and ModelOpt's export makes them agree
        first: AWQ / SmoothQuant pre-scales averaged, per-tensor weight amax (FP8 scale, NVFP4 global scale)
        set to the group maximum. Scores are taken with those shared values.
        """
        fused: dict[str | None, list[Target]] = defaultdict(list)
        for target in targets:
            fused[self.stats[target.name].shared_input if self.export_fused_scales else target.name].append(target)
        prepared: dict[str, list[_Prepared]] = {t.name: [] for t in targets}
        with torch.no_grad():
            for members in fused.values():
                for fmt in dict.fromkeys(f for t in members for f in t.formats):
                    sharing = [t for t in members if fmt in t.formats]
                    pre_quant_scale = None
                    if fmt.pre_scaled:
                        pre_quant_scale = torch.stack([self.stats[t.name].pre_quant_scale[fmt.name] for t in sharing]).mean(0)
                    tensor_amax = torch.stack([fmt.smooth(t.weight, pre_quant_scale).abs().amax().float() for t in sharing]).amax()
                    for t in sharing:
                        if t.fused_experts:  # one weight scale per expert, as ModelOpt quantizes and exports them
                            qweight = torch.stack([fmt.quantize_weight(w) for w in t.weight])
                        else:
                            qweight = fmt.quantize_weight(t.weight, pre_quant_scale, tensor_amax)
                        prepared[t.name].append(_Prepared(fmt, qweight, pre_quant_scale, self.stats[t.name].channel_amax))
        return prepared

    def _quantized_input(self, source: torch.Tensor, x: torch.Tensor, p: _Prepared, shared: bool) -> torch.Tensor:
        """``x`` (= ``source``, detached) quantized for format ``p``."""
        if not shared:
            return p.fmt.quantize_input(x, p.channel_amax, p.pre_quant_scale)
        if self._quantized_from is not source:
            self._forget()
            self._quantized_from = source
        key = (p.fmt.name, id(p.pre_quant_scale))  # fused layers share one (averaged) AWQ pre-scale
        if key not in self._quantized_inputs:
            self._quantized_inputs[key] = p.fmt.quantize_input(x, p.channel_amax, p.pre_quant_scale)
        return self._quantized_inputs[key]

    def _on_forward(
        self, target: Target, prepared: list[_Prepared], shared: bool, module: nn.Module, args: tuple, output: torch.Tensor
    ) -> None:
        if not output.requires_grad or not prepared:
            return
        source = args[0]
        x, y = source.detach(), output.detach()
        totals = self._totals[target.name]
        # A fused-experts projection is called per expert: (tokens, expert, weight slice, bias).
        expert, bias = (args[1], args[3]) if target.fused_experts else (None, module.bias)

        def quantized_output(p: _Prepared) -> torch.Tensor:
            qweight = p.qweight if expert is None else p.qweight[expert]
            with record_function(f"autoq.score_hook.{p.fmt.name}"):  # profiler rows per format
                return F.linear(self._quantized_input(source, x, p, shared), qweight, bias)

        def on_grad(grad: torch.Tensor) -> None:
            with torch.no_grad():
                if self.fuse_formats:
                    outputs = [quantized_output(p) for p in prepared]
                    with record_function("autoq.score_hook.fisher"):
                        terms = fisher_terms(grad, y, *outputs)
                    for p, term in zip(prepared, terms):
                        totals[p.fmt.name] += term
                    return
                for p in prepared:
                    output = quantized_output(p)
                    with record_function("autoq.score_hook.fisher"):
                        totals[p.fmt.name] += fisher_term(grad, output, y)

        self.register_hook(output, on_grad, "grad")
