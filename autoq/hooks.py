"""One way to attach code to a model: every hook the engine uses is registered and removed here.

The shape is llm-compressor's ``HooksMixin``: an object that adds hooks to modules or tensors
does it through ``register_hook`` and takes them all off with ``remove_hooks`` (or by leaving
``hooks_attached``). Besides torch's own hook types there is ``replace_forward``: the module's
``forward`` is swapped for another function until the hook is removed. The engine uses it to
stub out decoder blocks (capturing their inputs, running the model's own head code) and to see
each expert of a fused MoE layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import nn

HookType = Literal["forward_pre", "forward", "grad", "replace_forward"]


class _ForwardOverride:
    """Handle of a ``replace_forward`` hook: removing it restores the module's own forward."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]):
        self.module = module
        self.previous = module.__dict__.get("forward")  # an instance-level forward set by someone else
        module.forward = forward

    def remove(self) -> None:
        if self.previous is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.previous


class HooksMixin:
    """Registers hooks and remembers them, so they can all be removed at once."""

    def register_hook(
        self, target: nn.Module | torch.Tensor, hook: Callable[..., Any], hook_type: HookType, **kwargs: Any
    ) -> Any:
        """Attach ``hook`` to ``target``.

        ``forward_pre`` / ``forward``: ``nn.Module`` forward hooks (``kwargs`` such as
        ``with_kwargs=True`` are passed on); ``grad``: a tensor gradient hook;
        ``replace_forward``: ``hook`` is called instead of the module's ``forward``.
        """
        if hook_type == "replace_forward":
            handle = _ForwardOverride(target, hook)
        elif hook_type == "grad":
            handle = target.register_hook(hook)
        else:
            handle = getattr(target, f"register_{hook_type}_hook")(hook, **kwargs)
        self.__dict__.setdefault("_hooks", []).append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove every hook this object registered, the latest first (stacked overrides unwind)."""
        handles = self.__dict__.get("_hooks", [])
        while handles:
            handles.pop().remove()

    @contextlib.contextmanager
    def hooks_attached(self) -> Iterator[None]:
        """The hooks registered inside the ``with`` block are removed when it ends."""
        handles = self.__dict__.setdefault("_hooks", [])
        before = len(handles)
        try:
            yield
        finally:
            while len(handles) > before:
                handles.pop().remove()
