"""A causal LM seen as embedding stage -> decoder blocks -> head, each part run by the model's own code.

The sensitivity engine runs a model one decoder block at a time, so it can recompute a block
with autograd during the backward pass, or stream blocks through a GPU. It never rebuilds what
a block is given. One forward of the model itself, with every block swapped for a stub that
records its arguments, captures the first block's hidden-state input (the embedding stage,
Gemma's sqrt(d) scale included) and every block's own positional and keyword arguments:
attention masks per layer type, sliding windows, position embeddings per layer type (Gemma 3's
local and global RoPE), cache positions, whatever the architecture passes. Blocks are then
called with exactly those arguments. The head runs through the model's own code too: the
decoder's code after its block loop (final norm, ...) with the blocks stubbed out, then the
LM's code after the decoder (lm_head on tied or untied weights, logit soft-capping, logit
scaling) with the decoder stubbed out. ``check_blockwise`` verifies on real input, at the
calibration sequence length, that all of this reproduces the model's own logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from autoq.calibstate import is_norm, norm_uses_weight_plus_one
from autoq.errors import AutoqError
from autoq.hooks import HooksMixin

# Logits are computed this many elements at a time (128 MiB in float32).
HEAD_CHUNK_ELEMENTS = 1 << 25


class _Stop(Exception):
    """Raised by a block stub to end a forward pass once it has what it needs."""


class _BaseModelOutput(BaseModelOutputWithPast):
    """What a stubbed-out base model hands the LM's head code: the final hidden states only.
    Any other field a head reads (``rope_deltas``, ``image_hidden_states`` ...) is None."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


@dataclass
class BlockCall:
    """The arguments the model's forward passed to one decoder block, besides the hidden states."""

    args: tuple
    kwargs: dict[str, Any]
    hidden_as_keyword: bool  # the hidden states came as ``hidden_states=`` rather than first

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_keyword:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _split_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    if args:
        return args[0], BlockCall(tuple(args[1:]), dict(kwargs), hidden_as_keyword=False)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), BlockCall((), kwargs, hidden_as_keyword=True)


def _share_equal_tensors(calls: list[BlockCall]) -> None:
    """Keep one object per distinct tensor value across the blocks' arguments.

    Blocks mostly receive the same few tensors (one mask per layer type, one position
    embedding per RoPE kind); a model that builds an equal one per block would otherwise cost
    one copy per block.
    """
    distinct: list[torch.Tensor] = []

    def canonical(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            for seen in distinct:
                if seen is value or (
                    seen.shape == value.shape and seen.dtype == value.dtype and seen.device == value.device
                    and torch.equal(seen, value)
                ):  # fmt: skip
                    return seen
            distinct.append(value)
            return value
        if isinstance(value, tuple):
            items = [canonical(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, list):
            return [canonical(v) for v in value]
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in value.items()}
        return value

    for call in calls:
        call.args, call.kwargs = canonical(call.args), canonical(call.kwargs)


class DecoderStructure(HooksMixin):
    """Finds a causal LM's decoder blocks and head, and runs them one part at a time."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.name = type(model).__name__
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        names = {module: name for name, module in model.named_modules()}
        # The blocks are the decoder's ModuleList (``layers`` in Llama-likes, ``h`` in GPT-2 ...).
        layers = next((m for m in (decoder.children() if decoder is not None else ()) if isinstance(m, nn.ModuleList)), None)
        if layers is None or len(layers) == 0:
            raise AutoqError(f"{self.name}: cannot find its list of decoder blocks")
        self.decoder: nn.Module = decoder
        self.layers: nn.ModuleList = layers
        self.layer_prefix = names[layers]
        self.base: nn.Module = getattr(model, "base_model", model)  # what the LM's forward calls before its head
        if self.base is model:
            raise AutoqError(f"{self.name}: cannot tell its base model from its head")
        self.lm_head: nn.Module = model.get_output_embeddings()
        if not isinstance(self.lm_head, nn.Linear):
            raise AutoqError(f"{self.name}: has no linear output embedding (lm_head)")
        self.lm_head_name = names[self.lm_head]
        self.input_norms: dict[str, str | None] = {}  # filled by check_blockwise
        self.norms: dict[str, bool] = {}

    def block_index(self, layer_name: str) -> int | None:
        """Index of the decoder block holding ``layer_name``; None for the head."""
        if layer_name == self.lm_head_name:
            return None
        prefix = self.layer_prefix + "."
        if not layer_name.startswith(prefix):
            raise AutoqError(
                f"layer {layer_name} is outside the decoder blocks ({self.layer_prefix}.*) and is not the lm_head: "
                "autoq searches a model's language decoder only (skip vision towers and other encoders in the search space)"
            )
        return int(layer_name[len(prefix) :].split(".", 1)[0])

    def _stub_blocks(self, stub) -> None:
        for index, block in enumerate(self.layers):
            self.register_hook(block, functools.partial(stub, index), "replace_forward")

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor, capture: bool = True) -> tuple[torch.Tensor, list[BlockCall] | None]:
        """The first block's hidden-state input for ``input_ids``, from the model's own forward,
        and (``capture``) the arguments that forward passes to every block."""
        calls: list[BlockCall] = []
        first: list[torch.Tensor] = []

        def stub(index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            hidden, call = _split_call(args, kwargs)
            if index != len(calls):
                raise AutoqError(f"{self.name}: its forward calls decoder block {index} out of order; "
                                 "block-wise scoring needs each block called once, in order")  # fmt: skip
            if index == 0:
                first.append(hidden)
                if not capture:
                    raise _Stop
            calls.append(call)
            if index == len(self.layers) - 1:
                raise _Stop
            return hidden

        with self.hooks_attached():
            self._stub_blocks(stub)
            try:
                self.model(input_ids=input_ids, use_cache=False)
            except _Stop:
                pass
            else:
                raise AutoqError(f"{self.name}: its forward did not call all {len(self.layers)} decoder blocks")
        if capture:
            _share_equal_tensors(calls)
        return first[0], calls if capture else None

    def run_block(self, index: int, hidden: torch.Tensor, calls: list[BlockCall]) -> torch.Tensor:
        return calls[index].run(self.layers[index], hidden)

    def final_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """What the decoder returns when its last block outputs ``hidden``: the decoder's own
        code after its block loop (final norm, ...), run with every block stubbed out."""

        def stub(index: int, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden if index == 0 else _split_call(args, kwargs)[0]

        with self.hooks_attached():
            self._stub_blocks(stub)
            return self.decoder(input_ids=input_ids, use_cache=False)[0]

    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """The LM's own head code (lm_head, logit soft-capping, logit scale ...) applied to final
        hidden states ``final`` [tokens, hidden], with the base model stubbed out."""
        output = _BaseModelOutput(last_hidden_state=final[None])
        placeholder_ids = torch.zeros(1, final.shape[0], dtype=torch.long, device=final.device)
        with self.hooks_attached():
            self.register_hook(self.base, lambda *args, **kwargs: output, "replace_forward")
            return self.model(input_ids=placeholder_ids, use_cache=False).logits[0]

    def head_rows(self) -> int:
        """Tokens per ``logits`` call, so one call's logits stay within ``HEAD_CHUNK_ELEMENTS``."""
        return max(1, HEAD_CHUNK_ELEMENTS // self.lm_head.out_features)

    @torch.no_grad()
    def check_blockwise(self, input_ids: torch.Tensor, layers: dict[str, nn.Module], tolerance: float = 1e-2) -> dict[str, str]:
        """Fail clearly unless running the model block by block reproduces its own logits.

        One forward of the whole model gives the reference logits and finds the linears that
        share an input (``SharedInputReaders``); then the captured block inputs are replayed
        block by block and the head code run on the result. Passes if the largest logit
        difference is at most ``tolerance`` times the largest reference logit. Returns the
        shared-input readers of ``layers`` (name -> module called with the layer's input), and
        records in ``input_norms`` which normalisation module (if any) produced each one's input
        and in ``norms`` whether each such norm computes with ``1 + weight`` (the calibration state
        keeps both: the exporter folds AWQ pre-scales into those norms).
        """
        norms = {name: module for name, module in self.model.named_modules() if is_norm(module)}
        readers = SharedInputReaders(layers, norms)
        with readers.observing():
            reference = self.model(input_ids=input_ids, use_cache=False).logits
        hidden, calls = self.embed(input_ids)
        for index in range(len(self.layers)):
            hidden = self.run_block(index, hidden, calls)
        final = self.final_hidden(hidden, input_ids).reshape(-1, hidden.shape[-1])
        rows, error = self.head_rows(), 0.0
        for start in range(0, final.shape[0], rows):
            ours = self.logits(final[start : start + rows]).float()
            theirs = reference.reshape(-1, reference.shape[-1])[start : start + rows].float()
            error = max(error, (ours - theirs).abs().max().item())
        scale = reference.abs().max().float().item() or 1.0
        if not error <= tolerance * scale:
            raise AutoqError(
                f"{self.name}: running its decoder blocks one by one does not reproduce its logits "
                f"(max difference {error:.3g} against a largest logit of {scale:.3g}, at {input_ids.shape[1]} tokens); "
                "this architecture is not supported by block-wise scoring"
            )
        self.input_norms = readers.input_norms()
        self.norms = {name: norm_uses_weight_plus_one(norms[name]) for name in set(self.input_norms.values()) if name}
        return readers.result()


class SharedInputReaders(HooksMixin):
    """For each named linear, the first of them (in forward order) that reads the same input tensor.

    Runtimes fuse linears that read one tensor (q/k/v into qkv_proj, gate/up into gate_up_proj),
    so those must share a format. Pre-hooks on the linears see it during one forward pass run
    inside ``observing``.
    """

    def __init__(self, layers: dict[str, nn.Module], norms: dict[str, nn.Module] | None = None):
        self.layers = layers
        self.norms = norms or {}  # also noted: which of these produced each layer's input
        # id(tensor) -> (tensor, first reader); holding the tensor keeps its id from being reused.
        self._first_reader: dict[int, tuple[torch.Tensor, str]] = {}
        self._readers: dict[str, str] = {}
        self._norm_outputs: dict[int, tuple[torch.Tensor, str]] = {}
        self._input_norms: dict[str, str | None] = {}

    @contextlib.contextmanager
    def observing(self) -> Iterator[None]:
        with self.hooks_attached():
            for name, module in self.layers.items():
                self.register_hook(module, functools.partial(self._observe, name), "forward_pre")
            for name, module in self.norms.items():
                self.register_hook(module, functools.partial(self._observe_norm, name), "forward")
            yield

    def _observe(self, name: str, _module: nn.Module, args: tuple) -> None:
        if name not in self._readers:
            self._readers[name] = self._first_reader.setdefault(id(args[0]), (args[0], name))[1]
            self._input_norms[name] = self._norm_outputs.get(id(args[0]), (None, None))[1]

    def _observe_norm(self, name: str, _module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor):
            self._norm_outputs[id(output)] = (output, name)

    def result(self) -> dict[str, str]:
        return {name: self._readers.get(name, name) for name in self.layers}

    def input_norms(self) -> dict[str, str | None]:
        """Each layer's input producer among ``norms`` (None: not a norm's output)."""
        return {name: self._input_norms.get(name) for name in self.layers}


def shared_input_readers(model: nn.Module, layer_names: list[str], input_ids: torch.Tensor) -> dict[str, str]:
    """``SharedInputReaders`` of the named linears from one forward pass of ``model`` on ``input_ids``."""
    modules = dict(model.named_modules())
    readers = SharedInputReaders({name: modules[name] for name in layer_names})
    with readers.observing(), torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    return readers.result()
