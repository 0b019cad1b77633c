"""SmoothQuant's per-input-channel pre-scale, the same math as ModelOpt's ``smoothquant`` calibration.

INT8_SQ layers are deployed smoothed: the activation is multiplied by ``p`` and the weight stored as
``W / p``, so that outlier channels of the activation move into the weight. ModelOpt picks
``p = max|W[:, c]|^(1 - alpha) / max|x[:, c]|^alpha`` from the calibration pass's per-channel input
amax, with ``alpha = 1`` in ``INT8_SMOOTHQUANT_CFG`` (``SmoothQuantCalibConfig``): then ``p`` is
``1 / amax`` per channel, and the smoothed activation's amax is 1 in every channel.
"""

from __future__ import annotations

import torch

ALPHA = 1.0  # ModelOpt's default (SmoothQuantCalibConfig.alpha)
_EPSILON = 1.0 / (1 << 31)


@torch.no_grad()
def pre_quant_scale(channel_amax: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """``p`` (float32, one per input channel) from the calibrated per-channel input amax and the weight.

    Step for step as ``modelopt.torch.quantization.model_calib.smoothquant``: float32 math, channels
    whose amax overflows the scale set to 1 (checked only when some scale is tiny, as ModelOpt does),
    then clamped to [1e-4, 1e4] (a channel never seen non-zero gets 1e4).
    """
    act_amax = channel_amax.float()
    weight_scale = weight.abs().amax(dim=0)  # in the weight's dtype, as ModelOpt computes it
    scale = weight_scale.pow(1 - alpha) / act_amax.pow(alpha)
    if scale.min() <= _EPSILON:
        scale = torch.where(act_amax <= _EPSILON, torch.ones_like(scale), scale)
    return scale.float().clamp(min=1e-4, max=1e4)
