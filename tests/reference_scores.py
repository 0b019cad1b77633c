"""A plain full-model implementation of the sensitivity score, to test the engine against.

Pass 1 (no grad): the per-channel input amax of every searched linear over all batches. Then per
batch: one forward of the whole model with hooks that keep each searched linear's input X and
output Y, the model's own LM loss (``labels=ids``), ``loss.backward()``, and for each format
``sum((dL/dY * (Q(X) Q(W)^T - Y))^2)``. No blocks, no captured arguments, no streaming, no
chunks, no steps: whatever the engine does differently must not change the numbers.

Only formats without AWQ (FP8, NVFP4): AWQ's scale search is tested separately.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from autoq.decoder import shared_input_readers
from autoq.formats import FORMATS
from autoq.search_space import linear_weight


def reference_scores(
    model: nn.Module, layer_names: list[str], batches: list[torch.Tensor], formats: list[str], fused_scales: bool = True
) -> pd.Series:
    """Scores indexed by (layer, format). ``fused_scales``: linears reading one input share the
    group's largest per-tensor weight amax, as ModelOpt's export stores them."""
    modules = dict(model.named_modules())
    amax = {n: None for n in layer_names}

    def observe(name: str, args: tuple) -> None:
        x = args[0].detach()
        current = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        amax[name] = current if amax[name] is None else torch.maximum(amax[name], current)

    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: observe(n, a)) for n in layer_names]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    weights = {n: linear_weight(modules[n]) for n in layer_names}
    weight_amax = {n: weights[n].abs().amax().float() for n in layer_names}
    if fused_scales:
        readers = shared_input_readers(model, layer_names, batches[0][:1])
        weight_amax = {n: max(weight_amax[m] for m in layer_names if readers[m] == readers[n]) for n in layer_names}

    totals = {(n, f): 0.0 for n in layer_names for f in formats}
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)  # so that every activation carries a gradient
    try:
        for ids in batches:
            seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def keep(name: str, args: tuple, y: torch.Tensor) -> None:
                y.retain_grad()
                seen[name] = (args[0].detach(), y)

            handles = [modules[n].register_forward_hook(lambda m, a, y, n=n: keep(n, a, y)) for n in layer_names]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for name, (x, y) in seen.items():
                    module = modules[name]
                    for fmt_name in formats:
                        fmt = FORMATS[fmt_name]
                        qweight = fmt.quantize_weight(weights[name], tensor_amax=weight_amax[name])
                        diff = F.linear(fmt.quantize_input(x, amax[name]), qweight, module.bias) - y
                        totals[(name, fmt_name)] += (y.grad.float() * diff.float()).square().sum().item()
    finally:
        embedding.requires_grad_(False)
        embedding.grad = None
    return pd.Series(totals)
