"""AWQ-lite scale search, the same math as ModelOpt's ``awq_lite`` calibration.

Scoring a W4A8 / INT4_AWQ layer with plain round-to-nearest INT4 would overstate its error: the
format is deployed with AWQ smoothing. So the sensitivity engine searches the AWQ scale the way
ModelOpt does (grid over alpha in [0, 1], scale = act^alpha / w^(1 - alpha), loss = output MSE
with the weight quantized and the activation not), on a sample of the calibration tokens
instead of every token of a quarter of the batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from autoq.formats import Format

ALPHAS = tuple(round(0.1 * k, 1) for k in range(11))
# Turns this process's per-alpha squared-error sums into those over every process's samples.
LossReduction = Callable[[torch.Tensor], torch.Tensor]


def this_process(losses: torch.Tensor) -> torch.Tensor:
    return losses


def weight_scale(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-input-channel mean of |w| normalised by its block's max (ModelOpt ``get_weight_scale``)."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(-1, block_size).abs()
    normalised = blocks / (blocks.amax(dim=1, keepdim=True) + torch.finfo(weight.dtype).tiny)
    return normalised.reshape(out_features, in_features).mean(0).to(torch.float32)


def smoothing_scale(act_scale: torch.Tensor, w_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ scale ``s`` for one alpha (ModelOpt ``get_scale``); the activation is multiplied by 1/s."""
    scales = (act_scale.pow(alpha) / (w_scale.pow(1 - alpha) + torch.finfo(torch.float32).tiny)).clamp(1e-4, 1e4)
    return scales / (scales.max() * scales.min()).sqrt()


@torch.no_grad()
def search_pre_quant_scale(
    fmt: Format, weight: torch.Tensor, act_scale: torch.Tensor, x_sample: torch.Tensor,
    sum_losses: LossReduction = this_process, *, batch_elements: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The AWQ ``pre_quant_scale`` (= 1/s, float32) minimising output MSE on ``x_sample``, and the
    alpha it was made with (a 0-d tensor on the weight's device: reading it is the caller's sync).

    ``act_scale`` is the mean |x| per input channel over all calibration tokens; ``x_sample``
    is ``[tokens, in_features]`` in the model dtype. The loss is the squared error summed in
    float64 (the MSE's argmin), so that data-parallel ranks add up theirs with ``sum_losses``.
    The candidates' weights are quantized in batches of up to ``batch_elements`` weight elements
    (0: one at a time); the numbers are the same.
    """
    reference = F.linear(x_sample, weight)
    w_scale = weight_scale(weight, fmt.weight_block)
    candidates = torch.stack([1.0 / smoothing_scale(act_scale, w_scale, alpha) for alpha in ALPHAS])
    per_batch = max(1, batch_elements // weight.numel())
    losses = []
    for first in range(0, len(ALPHAS), per_batch):  # no host sync: the GPU runs all alphas back to back
        batch = candidates[first : first + per_batch]
        for pre_quant_scale, qweight in zip(batch, fmt.quantize_weight_candidates(weight, batch)):
            out = F.linear(x_sample * pre_quant_scale.to(x_sample.dtype), qweight)
            losses.append((out - reference).float().pow(2).sum(dtype=torch.float64))
    # argmin returns the first minimum: ties keep the smaller alpha, like ModelOpt's min().
    best = sum_losses(torch.stack(losses)).nan_to_num(nan=float("inf")).argmin().reshape(1)
    alphas = torch.tensor(ALPHAS, device=best.device)
    return candidates.index_select(0, best)[0], alphas.index_select(0, best)[0]
