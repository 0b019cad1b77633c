"""A plain full-model implementation of the sensitivity score, to test the engine against.

Pass 1 (no grad): the per-channel input amax of every searched linear over all batches. Then per
batch: one forward of the whole model with hooks that keep each searched linear's input X and
output Y, the model's own LM loss (``labels=ids``), ``loss.backward()``, and for each format
``sum((dL/dY * (Q(X) Q(W)^T - Y))^2)``. No blocks, no captured arguments, no streaming, no
chunks, no steps: whatever the engine does differently must not change the numbers.

Fused MoE experts: ``F.linear`` calls on a slice of an experts parameter are recorded during the
same full forward (the model's eager experts code), each with its expert's routed tokens.

Only formats without AWQ (FP8, NVFP4): AWQ's scale search is tested separately.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from autoq.decoder import shared_input_readers
from autoq.formats import FORMATS
from autoq.search_space import linear_weight


@contextlib.contextmanager
def _expert_linears(projections: dict[str, torch.Tensor], record) -> Iterator[None]:
    """While active, ``F.linear`` on a slice of a fused-experts parameter in ``projections``
    (name -> 3-D parameter) also calls ``record(name, x, y)``."""
    linear = F.linear

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = linear(x, weight, bias)
        for name, param in projections.items():
            if weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
                record(name, (weight.storage_offset() - param.storage_offset()) // param.stride(0), x, y)
        return y

    F.linear = recording
    try:
        yield
    finally:
        F.linear = linear


def reference_scores(
    model: nn.Module, layer_names: list[str], batches: list[torch.Tensor], formats: list[str], fused_scales: bool = True
) -> pd.Series:
    """Scores indexed by (layer, format). ``fused_scales``: linears reading one input share the
    group's largest per-tensor weight amax, as ModelOpt's export stores them. Fused MoE experts
    (``...experts.gate_up_proj``) are scored per expert on its routed tokens, with a weight scale
    per expert and one input scale for all experts of the projection."""
    modules = dict(model.named_modules())
    linears = [n for n in layer_names if n in modules]
    projections = {n: getattr(modules[n.rsplit(".", 1)[0]], n.rsplit(".", 1)[1]) for n in layer_names if n not in modules}
    if projections:
        model.set_experts_implementation("eager")  # the reference forward, one F.linear per expert
    amax = {n: None for n in layer_names}

    def observe(name: str, x: torch.Tensor) -> None:
        x = x.detach()
        current = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        amax[name] = current if amax[name] is None else torch.maximum(amax[name], current)

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: observe(n, a[0])) for n in linears]
    with torch.no_grad(), _expert_linears(projections, lambda n, e, x, y: observe(n, x)):
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    weights = {n: linear_weight(modules[n]) for n in linears}
    weight_amax = {n: weights[n].abs().amax().float() for n in linears}
    if fused_scales:
        readers = shared_input_readers(model, linears, batches[0][:1])
        weight_amax = {n: max(weight_amax[m] for m in linears if readers[m] == readers[n]) for n in linears}
    qweights = {
        (n, f): FORMATS[f].quantize_weight(weights[n], tensor_amax=weight_amax[n]) for n in linears for f in formats
    } | {(n, f): torch.stack([FORMATS[f].quantize_weight(w) for w in param]) for n, param in projections.items() for f in formats}

    totals = {(n, f): 0.0 for n in layer_names for f in formats}
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)  # so that every activation carries a gradient
    try:
        for ids in batches:
            seen: list[tuple[str, int | None, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

            def keep(name: str, expert: int | None, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> None:
                y.retain_grad()
                seen.append((name, expert, x.detach(), y, bias))

            handles = [
                modules[n].register_forward_hook(lambda m, a, y, n=n: keep(n, None, a[0], y, m.bias)) for n in linears
            ]
            with _expert_linears(projections, lambda n, e, x, y: keep(n, e, x, y, None)):
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for name, expert, x, y, bias in seen:
                    for fmt_name in formats:
                        qweight = qweights[(name, fmt_name)] if expert is None else qweights[(name, fmt_name)][expert]
                        diff = F.linear(FORMATS[fmt_name].quantize_input(x, amax[name]), qweight, bias) - y
                        totals[(name, fmt_name)] += (y.grad.float() * diff.float()).square().sum().item()
    finally:
        embedding.requires_grad_(False)
        embedding.grad = None
    return pd.Series(totals)
