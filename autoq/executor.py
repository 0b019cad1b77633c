"""Runs a causal LM's decoder blocks one at a time over steps of token batches, in memory or streamed.

Forward is block-major: every step goes through block 0, then every step through block 1, and
so on, so each block is on the device once per pass (streamed: brought in once, the next one
copied meanwhile) and the input each block saw can be kept. Backward walks the blocks in
reverse and recomputes each block with autograd from its kept input, so activation gradients
exist for one block at a time. Blocks get the arguments the model's own forward gave them
(``autoq.decoder``), captured once per step shape; the head is the model's own code too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function

from autoq.decoder import BlockCall, DecoderStructure
from autoq.streaming import BlockStreamer

if TYPE_CHECKING:
    from autoq.diskmodel import DiskWeights

# A context manager around one block's pass over all steps; what it yields, if callable, is
# called after each step (the score hooks drop that step's quantized inputs).
AroundBlock = Callable[[int], contextlib.AbstractContextManager]


def _no_hooks(_index: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class BlockExecutor:
    """Runs ``structure``'s blocks on ``device``; block inputs are kept on ``store_device``."""

    def __init__(
        self, structure: DecoderStructure, device: torch.device, store_device: torch.device, stream_blocks: bool,
        weights: DiskWeights | None = None,
    ):  # fmt: skip
        """``weights``: the blocks are empty (``autoq.diskmodel.load_skeleton``) and streamed from these files."""
        self.structure = structure
        self.weights = weights
        self.model = structure.model
        self.device = device
        self.store_device = store_device
        self.stream_blocks = stream_blocks or weights is not None
        self.streamer: BlockStreamer | None = None
        self._calls: dict[tuple[int, ...], list[BlockCall]] = {}  # per step shape
        self.peak_stored_bytes = 0  # most bytes of block inputs held on ``store_device`` by ``forward``

    @contextlib.contextmanager
    def placed(self) -> Iterator[None]:
        """Everything on the device for the ``with`` block; with streaming, the decoder blocks
        stay in CPU memory and come to the device one at a time."""
        if self.stream_blocks:
            s = self.structure
            self.streamer = BlockStreamer(self.model, s.layers, s.layer_prefix, self.device, self.weights)
        else:
            self.model.to(self.device)
        try:
            yield
        finally:
            if self.streamer is not None:
                self.streamer.close()
                self.streamer = None

    def _plain_forward(self) -> contextlib.AbstractContextManager:
        """With streaming, let a plain ``model(...)`` call bring each block to the device in turn."""
        return self.streamer.plain_forward() if self.streamer is not None else contextlib.nullcontext()

    def check_blockwise(self, sample: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, str]:
        """``DecoderStructure.check_blockwise`` on the device (streamed blocks too)."""
        with self._plain_forward():
            return self.structure.check_blockwise(sample.to(self.device), layers)

    def _resident(self, index: int, step: int) -> contextlib.AbstractContextManager:
        """Block ``index`` on the device; with streaming, block ``index + step`` is prefetched meanwhile."""
        if self.streamer is None:
            return contextlib.nullcontext()
        layers = self.structure.layers
        upcoming = layers[index + step] if 0 <= index + step < len(layers) else None
        return self.streamer.resident(layers[index], upcoming)

    def embed(self, input_ids: torch.Tensor, store: torch.device | None = None) -> torch.Tensor:
        """The first block's input, kept on ``store`` (default ``store_device``); the first step of
        each shape also captures every block's arguments."""
        shape = tuple(input_ids.shape)
        hidden, calls = self.structure.embed(input_ids.to(self.device), capture=shape not in self._calls)
        if calls is not None:
            self._calls[shape] = calls
        return hidden.to(store or self.store_device)

    def _run_block(self, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.structure.run_block(index, hidden, self._calls[tuple(input_ids.shape)])

    @torch.no_grad()
    def forward(
        self, steps: list[torch.Tensor], keep: int, around_block: AroundBlock = _no_hooks, label: str = "forward",
        tick: Callable[[], None] = lambda: None, stored_steps: int | None = None,
    ) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """Every step through every block, block-major.

        Returns every block's input for the first ``keep`` steps (and, last, the final block's
        output), and the final block's output for every step. Between blocks, the hidden states
        of the first ``stored_steps`` steps (default: all) wait on ``store_device``, the others in
        CPU memory: that bounds what a long calibration pass holds on the device.
        """
        stored = len(steps) if stored_steps is None else max(keep, stored_steps)
        places = [self.store_device if b < stored else torch.device("cpu") for b in range(len(steps))]
        hidden = [self.embed(ids, place) for ids, place in zip(steps, places)]
        kept: list[list[torch.Tensor]] = [[] for _ in steps[:keep]]
        for index in range(len(self.structure.layers)):
            with self._resident(index, +1), record_function(f"autoq.{label}"), around_block(index):
                for b, ids in enumerate(steps):
                    if b < keep:
                        kept[b].append(hidden[b])
                    hidden[b] = self._run_block(index, hidden[b].to(self.device), ids).to(places[b])
            self._account(kept, hidden[:stored])
            tick()
        for b, per_step in enumerate(kept):
            per_step.append(hidden[b])
        return kept, hidden

    def _account(self, kept: list[list[torch.Tensor]], waiting: list[torch.Tensor]) -> None:
        """Track the most bytes of block inputs ``forward`` held on ``store_device`` at once."""
        held = sum(t.numel() * t.element_size() for t in [*(t for per_step in kept for t in per_step), *waiting])
        self.peak_stored_bytes = max(self.peak_stored_bytes, held)

    def backward(
        self, steps: list[torch.Tensor], inputs: list[list[torch.Tensor]], grads: list[torch.Tensor],
        around_block: AroundBlock = _no_hooks, tick: Callable[[], None] = lambda: None,
    ) -> None:
        """Blocks in reverse, each recomputed with autograd from its kept input and given the
        gradient at its output (``grads``, replaced by the gradient at its input). Frees the
        kept inputs as it goes."""
        for index in reversed(range(len(self.structure.layers))):
            with self._resident(index, -1), record_function("autoq.score_backward"), around_block(index) as after_step:
                for b, (ids, per_step) in enumerate(zip(steps, inputs)):
                    x = per_step[index].to(self.device).requires_grad_(True)
                    per_step[index] = None
                    self._run_block(index, x, ids).backward(grads[b].to(self.device))
                    grads[b] = x.grad.to(self.store_device)
                    if callable(after_step):
                        after_step()
            tick()

    def head_backward(self, x: torch.Tensor, input_ids: torch.Tensor, loss: Callable[[torch.Tensor, slice], torch.Tensor]) -> None:
        """Backpropagate ``loss`` over the next-token logits into ``x.grad`` (``x``: the last block's
        output). Logits come from the model's own head code, ``head_rows`` tokens at a time;
        ``loss(logits, rows)`` gets float32 logits of the flattened positions ``rows``."""
        final = self.structure.final_hidden(x, input_ids.to(self.device))
        positions = final[:, :-1].reshape(-1, final.shape[-1])
        leaf = positions.detach().requires_grad_(True)
        chunk = self.structure.head_rows()
        for start in range(0, leaf.shape[0], chunk):
            rows = slice(start, start + chunk)
            loss(self.structure.logits(leaf[rows]).float(), rows).backward()
        positions.backward(leaf.grad)

    @torch.no_grad()
    def head_forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> None:
        """Run the head's code on the last block's output ``x`` (for hooks on the lm_head)."""
        final = self.structure.final_hidden(x.to(self.device), input_ids.to(self.device))
        for chunk in final.reshape(-1, final.shape[-1]).split(self.structure.head_rows()):
            self.structure.logits(chunk)

    def freeze_parameters(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)  # activation gradients only: no weight gradient, ever
