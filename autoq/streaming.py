"""Decoder blocks streamed through the GPU: a model larger than GPU memory can still be scored.

The blocks' tensors stay in CPU memory, page-locked so copies run at full speed and
asynchronously. A block is copied to the device when its turn
comes; leaving only points it back at its CPU tensors (weights are never copied back). While
one block computes, the next one is copied on a side stream, so the copies hide behind compute.

Streaming onto the CPU itself is real too: between its turns a block's tensors are empty
placeholders, and a fresh copy of its weights is made when its turn comes. That saves no
memory, but any use of a block outside its turn fails loudly, which is what makes the
streamed-equals-in-memory test mean something without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autoq.hooks import HooksMixin

_REGISTER_MIN_BYTES = 1 << 20


class BlockStreamer(HooksMixin):
    """Moves the blocks of ``layers`` to ``device`` one (plus one prefetched) at a time."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, layer_prefix: str, device: torch.device):
        self.layers = layers
        self.device = device
        parent_name, _, attr = layer_prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.ModuleList())  # detach the blocks so .to() skips them
        try:
            model.to(device)
        finally:
            setattr(parent, attr, layers)
        layers.to("cpu")
        pin = device.type == "cuda"
        self._placeholders = device.type == "cpu"  # blocks off turn hold empty tensors (see module doc)
        self._registered: list[int] = []  # host pointers page-locked in place, released by close()
        self._cpu: dict[nn.Module, dict[str, torch.Tensor]] = {}
        for block in layers:
            tensors = {}
            for name, tensor in self._tensors(block):
                if pin and not tensor.data.is_pinned() and not self._register(tensor.data):
                    tensor.data = tensor.data.pin_memory()
                tensors[name] = tensor.data
            self._cpu[block] = tensors
            self.leave(block)
        self._copy_stream = torch.cuda.Stream(device) if pin else None
        self._prefetched: dict[nn.Module, tuple[dict[str, torch.Tensor], torch.cuda.Event]] = {}

    def _register(self, tensor: torch.Tensor) -> bool:
        """Page-lock a large tensor where it lies (4x cheaper than a pinned copy, measured on an
        H100 host); small tensors, which may share a page with others, get a pinned copy."""
        nbytes = tensor.untyped_storage().nbytes()
        if nbytes < _REGISTER_MIN_BYTES:
            return False
        cudart = torch.cuda.cudart()
        pointer = tensor.untyped_storage().data_ptr()
        if int(cudart.cudaHostRegister(pointer, nbytes, 0)) != 0:
            cudart.cudaGetLastError()  # clear the error: the caller falls back to a pinned copy
            return False
        self._registered.append(pointer)
        return True

    def close(self) -> None:
        """Give every block its CPU tensors back and unlock the pages registered in place."""
        if self._copy_stream is not None:
            torch.cuda.synchronize(self.device)
        self._prefetched.clear()
        self.remove_hooks()
        for block, cpu in self._cpu.items():
            for name, tensor in self._tensors(block):
                tensor.data = cpu[name]
        cudart = torch.cuda.cudart() if self._registered else None
        for pointer in self._registered:
            cudart.cudaHostUnregister(pointer)
        self._registered.clear()

    @staticmethod
    def _tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*block.named_parameters(), *block.named_buffers()]

    def _prefetch(self, block: nn.Module) -> None:
        if self._copy_stream is None or block in self._prefetched:
            return
        with torch.cuda.stream(self._copy_stream):
            copies = {name: cpu.to(self.device, non_blocking=True) for name, cpu in self._cpu[block].items()}
            done = torch.cuda.Event()
            done.record()
        self._prefetched[block] = (copies, done)

    def arrive(self, block: nn.Module) -> None:
        if block in self._prefetched:
            copies, done = self._prefetched.pop(block)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for tensor in copies.values():
                tensor.record_stream(compute)  # freed on leaving: not before compute is done with it
        elif self._placeholders:
            copies = {name: cpu.clone() for name, cpu in self._cpu[block].items()}
        else:
            copies = {name: cpu.to(self.device, non_blocking=True) for name, cpu in self._cpu[block].items()}
        for name, tensor in self._tensors(block):
            tensor.data = copies[name]

    def leave(self, block: nn.Module) -> None:
        cpu = self._cpu[block]
        for name, tensor in self._tensors(block):
            tensor.data = cpu[name].new_empty(0) if self._placeholders else cpu[name]

    @contextlib.contextmanager
    def resident(self, block: nn.Module, upcoming: nn.Module | None = None) -> Iterator[None]:
        """``block`` on the device for the ``with`` body; ``upcoming`` copied meanwhile."""
        self.arrive(block)
        if upcoming is not None:
            self._prefetch(upcoming)
        try:
            yield
        finally:
            self.leave(block)

    @contextlib.contextmanager
    def plain_forward(self) -> Iterator[None]:
        """Let a plain ``model(...)`` call bring each block to the device in turn."""

        def arrive(module: nn.Module, _args: tuple) -> None:
            self.arrive(module)

        def leave(module: nn.Module, _args: tuple, _out: Any) -> None:
            self.leave(module)

        with self.hooks_attached():
            for block in self.layers:
                self.register_hook(block, arrive, "forward_pre")
                self.register_hook(block, leave, "forward")
            yield
