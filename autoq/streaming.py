"""Decoder blocks streamed through the GPU: a model larger than GPU memory can still be scored.

The blocks' tensors stay in CPU memory, page-locked so copies run at full speed and
asynchronously. A block is copied to the device when its turn
comes; leaving only points it back at its CPU tensors (weights are never copied back). While
one block computes, the next one is copied on a side stream, so the copies hide behind compute.

Streaming onto the CPU itself is real too: between its turns a block's tensors are empty
placeholders, and a fresh copy of its weights is made when its turn comes. That saves no
memory, but any use of a block outside its turn fails loudly, which is what makes the
streamed-equals-in-memory test mean something without a GPU.

From disk (``weights``: a model from ``autoq.diskmodel.load_skeleton``), no block is held in CPU
memory at all: a block's tensors are read from the memory-mapped safetensors files when its turn
comes (the next block's read, page-locked for CUDA, runs in a background thread meanwhile) and
dropped when it leaves. Peak memory is then a few blocks, on the CPU as on the GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoq.hooks import HooksMixin

if TYPE_CHECKING:
    from autoq.diskmodel import DiskWeights

_REGISTER_MIN_BYTES = 1 << 20


class BlockStreamer(HooksMixin):
    """Moves the blocks of ``layers`` to ``device`` one (plus one prefetched) at a time."""

    def __init__(
        self, model: nn.Module, layers: nn.ModuleList, layer_prefix: str, device: torch.device, weights: DiskWeights | None = None
    ):
        self.layers = layers
        self.device = device
        self.weights = weights
        parent_name, _, attr = layer_prefix.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, nn.ModuleList())  # detach the blocks so .to() skips them
        try:
            model.to(device)
        finally:
            setattr(parent, attr, layers)
        pin = device.type == "cuda"
        if weights is not None:
            self._init_from_disk(layer_prefix, pin)
            return
        layers.to("cpu")
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

    def _init_from_disk(self, layer_prefix: str, pin: bool) -> None:
        """Blocks read from ``self.weights``: only buffers the checkpoint lacks stay resident."""
        self.layers.to(self.device)  # empty parameters and computed buffers (rotary tables)
        self._pin = pin
        self._placeholders = True
        self._registered, self._cpu, self._prefetched = [], {}, {}
        self._copy_stream = None
        # Per block: its state-dict tensors (parameters, persistent buffers), by checkpoint key and dtype.
        self._disk_keys: dict[nn.Module, dict[str, tuple[str, torch.dtype]]] = {}
        for index, block in enumerate(self.layers):
            state = block.state_dict(keep_vars=True)
            self._disk_keys[block] = {name: (f"{layer_prefix}.{index}.{name}", t.dtype) for name, t in state.items()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoq-block-read")
        self._loading: dict[nn.Module, Future] = {}
        for block in self.layers:
            self.leave(block)

    def _read_block(self, block: nn.Module) -> dict[str, torch.Tensor]:
        keys = self._disk_keys[block]
        by_key = self.weights.read([key for key, _ in keys.values()], {key: dtype for key, dtype in keys.values()})
        tensors = {name: by_key[key] for name, (key, _) in keys.items()}
        return {name: t.pin_memory() for name, t in tensors.items()} if self._pin else tensors

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
        """Give every block its CPU tensors back (from disk: leave them empty) and unlock the pages
        registered in place."""
        if self.weights is not None:
            for future in self._loading.values():
                future.cancel()
            self._pool.shutdown(wait=True)
            self._loading.clear()
            self.remove_hooks()
            return
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

    def _tensors(self, block: nn.Module) -> list[tuple[str, torch.Tensor]]:
        tensors = [*block.named_parameters(), *block.named_buffers()]
        if self.weights is not None:  # from disk: the tensors the checkpoint holds
            return [(name, t) for name, t in tensors if name in self._disk_keys[block]]
        return tensors

    def _prefetch(self, block: nn.Module) -> None:
        if self.weights is not None:
            if block not in self._loading:
                self._loading[block] = self._pool.submit(self._read_block, block)
            return
        if self._copy_stream is None or block in self._prefetched:
            return
        with torch.cuda.stream(self._copy_stream):
            copies = {name: cpu.to(self.device, non_blocking=True) for name, cpu in self._cpu[block].items()}
            done = torch.cuda.Event()
            done.record()
        self._prefetched[block] = (copies, done)

    def arrive(self, block: nn.Module) -> None:
        if self.weights is not None:
            future = self._loading.pop(block, None)
            cpu = future.result() if future is not None else self._read_block(block)
            copies = {name: t.to(self.device, non_blocking=True) for name, t in cpu.items()}
        elif block in self._prefetched:
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
        if self.weights is not None:
            from autoq.diskmodel import release_freed_memory

            for _, tensor in self._tensors(block):
                tensor.data = tensor.data.new_empty(0)
            release_freed_memory()
            return
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
