"""The layers the sensitivity engine scores: each searched linear (or fused-experts projection) with its block and formats."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from autoq.decoder import DecoderStructure
from autoq.experts import ExpertProjection
from autoq.formats import FORMATS, Format
from autoq.search_space import LayerChoice, linear_weight


@dataclass
class Target:
    choice: LayerChoice
    module: nn.Module  # hooks go here: its forward takes the layer input first and returns its output
    block: int | None  # None: the lm_head
    formats: list[Format]  # quantized formats to score (BF16 scores 0 by definition)

    @property
    def name(self) -> str:
        return self.choice.name

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight as ``(out_features, in_features)`` (a transposed view for ``Conv1D``);
        ``(experts, out_features, in_features)`` for fused experts."""
        return self.module.weight if self.fused_experts else linear_weight(self.module)

    @property
    def fused_experts(self) -> bool:
        return isinstance(self.module, ExpertProjection)


def build_targets(model: nn.Module, structure: DecoderStructure, choices: list[LayerChoice]) -> list[Target]:
    """One target per choice; a fused-experts projection gets an ``ExpertProjection`` to hook."""
    modules = dict(model.named_modules())

    def module_of(choice: LayerChoice) -> nn.Module:
        if choice.name in modules:
            return modules[choice.name]
        parent, _, attr = choice.name.rpartition(".")  # a fused-experts parameter
        return ExpertProjection(modules[parent], attr)

    return [
        Target(
            choice=c, module=module_of(c), block=structure.block_index(c.name),
            formats=[FORMATS[f] for f in c.candidates if FORMATS[f].quantized],
        )
        for c in choices
    ]  # fmt: skip


def by_block(targets: list[Target]) -> dict[int | None, list[Target]]:
    grouped: dict[int | None, list[Target]] = defaultdict(list)
    for target in targets:
        grouped[target.block].append(target)
    return grouped
