"""Calibration statistics: what every format needs to know about a layer's inputs before scoring.

Per searched layer, from forward pre-hooks during the calibration pass: the per-input-channel
amax (activation scales of every format), and for AWQ formats the mean |x| per channel and an
evenly spaced sample of tokens, from which the AWQ scale search (``autoq.awq``, ModelOpt's
``awq_lite`` grid and loss) picks each AWQ format's pre-quantization scale. SmoothQuant formats
(INT8_SQ) take theirs from the per-channel amax alone (``autoq.smoothquant``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from autoq import awq, fakequant, smoothquant
from autoq.hooks import HooksMixin
from autoq.targets import Target


@fakequant.fused_on_cuda
def channel_abs_stats(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and sum of ``|x|`` of a ``[tokens, channels]`` activation, in float32."""
    magnitude = flat.abs().float()
    return magnitude.amax(0), magnitude.sum(0)


@dataclass
class LayerStats:
    """What calibration learns about one layer's inputs."""

    channel_amax: torch.Tensor | None = None
    # float64: adding up float32 per-step sums is then exact, so its order (over data-parallel ranks) does not matter
    abs_sum: torch.Tensor | None = None
    rows: int = 0
    awq_samples: list[torch.Tensor] = field(default_factory=list)
    shared_input: str | None = None  # first layer reading the same input (itself if none)
    pre_quant_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # per AWQ format
    alpha: dict[str, torch.Tensor] = field(default_factory=dict)  # per AWQ format: the grid point chosen (0-d)

    @property
    def act_scale(self) -> torch.Tensor:
        """Mean |x| per input channel (float32)."""
        return (self.abs_sum / self.rows).float()


class StatsCollector(HooksMixin):
    """Collects ``LayerStats`` for ``targets`` from forward pre-hooks, then searches AWQ scales.

    ``samples_per_step``: AWQ sample rows taken from each step's input of a layer (evenly spaced).
    """

    def __init__(self, targets: list[Target], readers: dict[str, str], samples_per_step: int):
        self.stats = {t.name: LayerStats(shared_input=readers[t.name]) for t in targets}
        self.samples_per_step = samples_per_step

    @staticmethod
    def samples_per_step_for(awq_tokens: int, steps: int) -> int:
        return math.ceil(awq_tokens / steps)

    @contextlib.contextmanager
    def observing(self, targets: list[Target]) -> Iterator[None]:
        """Collect the inputs of ``targets`` for the duration of the ``with`` block."""
        with self.hooks_attached():
            for target in targets:
                self.register_hook(target.module, functools.partial(self._observe, target), "forward_pre")
            yield

    def _observe(self, target: Target, _module: nn.Module, args: tuple) -> None:
        x = args[0]
        s = self.stats[target.name]
        flat = x.reshape(-1, x.shape[-1])
        amax, abs_sum = channel_abs_stats(flat)
        s.channel_amax = amax if s.channel_amax is None else torch.maximum(s.channel_amax, amax)
        s.abs_sum = abs_sum.double() if s.abs_sum is None else s.abs_sum + abs_sum
        s.rows += flat.shape[0]
        if any(f.awq for f in target.formats):
            count = min(self.samples_per_step, flat.shape[0])
            picks = torch.linspace(0, flat.shape[0] - 1, count, device=flat.device)
            s.awq_samples.append(flat[picks.long()].clone())

    def search_pre_quant_scales(self, targets: list[Target], sum_losses: awq.LossReduction = awq.this_process, batch_elements: int = 0) -> None:
        """AWQ and SmoothQuant pre-quantization scales of ``targets`` (whose inputs have all been seen).

        ``sum_losses``: adds up the AWQ grid's per-alpha losses over data-parallel ranks;
        ``batch_elements``: see ``awq.search_pre_quant_scale``.
        """
        for target in targets:
            s = self.stats[target.name]
            if s.channel_amax is not None:
                for fmt in target.formats:
                    if fmt.calibration == "smoothquant":
                        s.pre_quant_scale[fmt.name] = smoothquant.pre_quant_scale(s.channel_amax, target.weight)
            if not s.awq_samples:
                continue
            sample = torch.cat(s.awq_samples)
            for fmt in target.formats:
                if fmt.awq:
                    s.pre_quant_scale[fmt.name], s.alpha[fmt.name] = awq.search_pre_quant_scale(
                        fmt, target.weight, s.act_scale, sample, sum_losses, batch_elements=batch_elements
                    )
            s.awq_samples.clear()
