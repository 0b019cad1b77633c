"""MoE experts that transformers 5 fuses into 3-D parameters, scored as linear layers.

Mixtral, Qwen2-MoE, Qwen3-MoE (and every experts class built with transformers'
``@use_experts_implementation``) keep all experts of a layer in two parameters,
``gate_up_proj`` ``[experts, 2 * intermediate, hidden]`` and ``down_proj``
``[experts, hidden, intermediate]``, and their reference ("eager") forward calls
``F.linear(tokens_routed_to_e, param[e])`` once per projection and expert. autoq treats each
projection as one layer, named after its parameter (``model.layers.0.mlp.experts.gate_up_proj``),
whose ``params`` are ``experts * out * in`` and whose stored bits are those of every expert's
exported linears (ModelOpt's export splits ``gate_up_proj`` into ``gate_proj`` and ``up_proj``
per expert).

Scoring sees each expert's real routed tokens: while an experts module runs its eager forward,
``F.linear`` calls on a slice of one of its projections are routed through an
``ExpertProjection`` (a module of its own, outside the model), so the ordinary hooks see
``(tokens, expert, weight, bias)`` and the output ``Y_e``. This is ModelOpt's own way of
quantizing fused experts (``_QuantFusedExperts``), with the expert found from the weight
slice's storage offset.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoq.hooks import HooksMixin

_LINEAR = F.linear  # the real one, while ``routed_linear`` stands in for it


def fused_projections(module: nn.Module) -> dict[str, int] | None:
    """For a fused-experts module: its 3-D projections and into how many linears the export
    splits each along its output (2 for a gated ``gate_up_proj``); None for any other module.

    Only the ``[experts, out, in]`` layout whose eager forward calls ``F.linear``; transposed
    layouts (GPT-OSS) are not recognised, so their experts stay unsearched.
    """
    down = getattr(module, "down_proj", None)
    if not (isinstance(down, nn.Parameter) and down.dim() == 3) or getattr(module, "is_transposed", False):
        return None
    if not hasattr(type(module).forward, "__wrapped__"):  # not dispatched by @use_experts_implementation
        return None
    first = "gate_up_proj" if isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) else "up_proj"
    if not (isinstance(getattr(module, first, None), nn.Parameter) and getattr(module, first).dim() == 3):
        return None
    return {first: 2 if first == "gate_up_proj" else 1, "down_proj": 1}


class ExpertProjection(nn.Module):
    """One 3-D projection of a fused-experts module, called once per expert with that expert's
    routed tokens: ``forward(x, expert, weight, bias) = F.linear(x, weight, bias)``, where
    ``weight`` is the expert's slice of the projection."""

    def __init__(self, experts: nn.Module, attr: str):
        super().__init__()
        self.__dict__["experts"] = experts  # not a submodule: the model owns it
        self.attr = attr

    @property
    def weight(self) -> torch.Tensor:
        """``[experts, out, in]``."""
        return getattr(self.experts, self.attr)

    def forward(self, x: torch.Tensor, expert: int, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return _LINEAR(x, weight, bias)

    def expert_of(self, weight: torch.Tensor) -> int | None:
        """Which expert's slice ``weight`` is (None: not a slice of this projection)."""
        param = self.weight
        if weight.shape != param.shape[1:] or weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            return None
        return (weight.storage_offset() - param.storage_offset()) // param.stride(0)


@contextlib.contextmanager
def routed_linear(projections: list[ExpertProjection]) -> Iterator[None]:
    """``F.linear`` on a slice of one of ``projections`` goes through that projection."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        for projection in projections:
            expert = projection.expert_of(weight)
            if expert is not None:
                return projection(x, expert, weight, bias)
        return _LINEAR(x, weight, bias)

    F.linear = linear
    try:
        yield
    finally:
        F.linear = _LINEAR


class ExpertRouting(HooksMixin):
    """While attached, the experts modules of ``projections`` run their eager (reference)
    forward with ``F.linear`` routed through the projections."""

    def __init__(self, projections: list[ExpertProjection]):
        self.by_module: dict[nn.Module, list[ExpertProjection]] = {}
        for projection in projections:
            self.by_module.setdefault(projection.experts, []).append(projection)

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        with self.hooks_attached():
            for module, projections in self.by_module.items():
                eager = type(module).forward.__wrapped__  # the forward @use_experts_implementation dispatches from
                self.register_hook(module, functools.partial(self._forward, module, eager, projections), "replace_forward")
            yield

    @staticmethod
    def _forward(module: nn.Module, eager, projections: list[ExpertProjection], *args: Any, **kwargs: Any) -> Any:
        with routed_linear(projections):
            return eager(module, *args, **kwargs)
