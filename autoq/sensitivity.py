"""The sensitivity engine: per-layer, per-format scores from loss gradients.

For a linear layer with output ``Y`` and a format ``f``, the score is the Fisher/Taylor estimate
of the loss increase from quantizing that layer alone::

    score(layer, f) = sum over calibration tokens of (dL/dY * (Q_f(Y) - Y))^2

with ``Q_f(Y) = Q_f(X) @ Q_f(W)^T``. ``L`` is the LM loss on the calibration text
(``objective="fisher"``) or, label-free, the loss on tokens sampled from the model's own
next-token distribution (``objective="kl"``), whose expected squared gradient is the Fisher of
the KL divergence to the unquantized model.

How it stays cheap (see ``docs`` in the README for the numbers):
* Block by block. Pass 1 (calibration) runs every decoder block over all calibration batches,
  collecting what every format needs (per-channel input amax, AWQ activation statistics and a
  token sample), then searches AWQ scales. Pass 2 (scoring) runs a chunk of batches forward,
  storing only each block's input, then walks the blocks in reverse, recomputing each block's
  forward with gradients to get its activation gradients.
* Activation gradients only: parameters never require gradients, so no weight gradient is ever
  computed or stored.
* ``Q_f(Y) - Y`` is computed inside the gradient hook of ``Y`` and reduced at once: it never
  exists for more than one layer and one format at a time. Each format's quantized weights are
  computed once per block per chunk, not once per batch.
* Blocks can be streamed (``stream_blocks``, ``autoq.streaming``): kept in page-locked CPU memory
  and moved to the GPU one at a time, the next one copied while the current one computes, so a
  model larger than the GPU can be scored at about the in-memory speed.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from autoq import awq, fakequant
from autoq.cache import ScoreCache
from autoq.decoder import BlockCall, DecoderStructure
from autoq.formats import FORMATS, Format
from autoq.search_space import LayerChoice
from autoq.streaming import BlockStreamer

ENGINE_VERSION = 1
SCORE_COLUMNS = ["layer", "block", "format", "score", "params", "bits", "shared_input"]
HEAD_BLOCK = -1  # ``block`` value of the lm_head in score tables


@dataclass
class ScoringOptions:
    objective: Literal["fisher", "kl"] = "fisher"
    batch_size: int = 4
    device: str | None = None  # None: CUDA when available, else CPU
    stream_blocks: bool = False  # keep decoder blocks on the CPU, move one at a time to ``device``
    store_on_cpu: bool = False  # keep block inputs in CPU memory (slower: they cross PCIe twice)
    chunk_steps: int | None = None  # steps scored per pass (resume unit); None: from ``store_budget_gib``
    store_budget_gib: float = 2.0  # memory for block inputs; more batches than fit are scored in chunks
    awq_tokens: int = 1024  # calibration tokens sampled per layer for the AWQ scale search
    # Calibration batches are run this many tokens at a time (fewer, larger kernels; the loss is
    # still the sum of per-batch means, so scores do not depend on it).
    tokens_per_step: int = 8192
    # Score fused layers (shared input) with the shared scales ModelOpt's export gives them.
    # False reproduces mtq.auto_quantize's per-layer scales exactly.
    export_fused_scales: bool = True
    seed: int = 0
    progress: bool = True

    def cache_key_parts(self) -> dict[str, Any]:
        """What changes the scores (devices, streaming and chunking do not)."""
        return {
            "objective": self.objective, "batch_size": self.batch_size, "awq_tokens": self.awq_tokens,
            "seed": self.seed, "export_fused_scales": self.export_fused_scales,
        }  # fmt: skip


@dataclass
class _Target:
    choice: LayerChoice
    module: nn.Linear
    block: int | None  # None: the lm_head
    formats: list[Format]  # quantized formats to score (BF16 scores 0 by definition)

    @property
    def name(self) -> str:
        return self.choice.name


@dataclass
class _Stats:
    """What pass 1 collects for one linear layer."""

    channel_amax: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    rows: int = 0
    awq_samples: list[torch.Tensor] = field(default_factory=list)
    shared_input: str | None = None
    pre_quant_scale: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Prepared:
    """One format of one layer, ready to quantize that layer's inputs in a gradient hook."""

    fmt: Format
    qweight: torch.Tensor
    pre_quant_scale: torch.Tensor | None
    channel_amax: torch.Tensor


@fakequant.fused_on_cuda
def fisher_term(grad: torch.Tensor, quantized_output: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``sum((grad * (Q(Y) - Y))^2)`` in float32 (ModelOpt clamps the product the same way).

    One fused pass on CUDA: ``Q(Y) - Y`` is never written to memory.
    """
    diff = quantized_output - output
    return (grad.float() * diff.float()).clamp(-1e10, 1e10).square().sum()


@fakequant.fused_on_cuda
def channel_abs_stats(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and sum of ``|x|`` of a ``[tokens, channels]`` activation, in float32."""
    magnitude = flat.abs().float()
    return magnitude.amax(0), magnitude.sum(0)


class SensitivityEngine:
    """Scores the layers in ``choices`` of ``model`` for all their candidate formats."""

    def __init__(self, model: nn.Module, choices: list[LayerChoice], options: ScoringOptions, cache: ScoreCache | None = None):
        self.model = model
        self.options = options
        self.cache = cache
        self.structure = DecoderStructure(model)
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.store_device = torch.device("cpu") if options.store_on_cpu else self.device
        modules = dict(model.named_modules())
        self.targets = [
            _Target(
                choice=c,
                module=modules[c.name],
                block=self.structure.block_index(c.name),
                formats=[FORMATS[f] for f in c.candidates if FORMATS[f].quantized],
            )
            for c in choices
        ]
        self.by_block: dict[int | None, list[_Target]] = defaultdict(list)
        for target in self.targets:
            self.by_block[target.block].append(target)
        self._block_calls: dict[tuple[int, ...], list[BlockCall]] = {}  # per batch shape

    # ------------------------------------------------------------------ public
    def run(self, token_batches: list[torch.Tensor]) -> pd.DataFrame:
        """Score table (``SCORE_COLUMNS``), from the cache when this exact work was done before."""
        if self.cache is not None and (cached := self.cache.load_table()) is not None:
            return cached
        for param in self.model.parameters():
            param.requires_grad_(False)  # activation gradients only: no weight gradient, ever
        self._place_model()
        try:
            return self._scores(token_batches)
        finally:
            if self._streamer is not None:
                self._streamer.close()

    def _scores(self, token_batches: list[torch.Tensor]) -> pd.DataFrame:
        readers = self._inspect(token_batches[0][:1])
        token_batches = self._steps(token_batches)
        chunk_size = self._chunk_size(token_batches)
        stats, first_chunk_inputs = self._load_or_calibrate(token_batches, readers, keep_inputs=chunk_size)
        totals: dict[str, dict[str, float]] = {t.name: {f.name: 0.0 for f in t.formats} for t in self.targets}
        chunks = [token_batches[i : i + chunk_size] for i in range(0, len(token_batches), chunk_size)]
        steps_per_chunk = 2 * len(self.structure.layers) + 1
        with self._progress(len(chunks) * steps_per_chunk, "scoring") as bar:
            for index, chunk in enumerate(chunks):
                partial = self.cache.load_chunk(index) if self.cache is not None else None
                if partial is None:
                    inputs = first_chunk_inputs if index == 0 else None
                    partial = self._score_chunk(chunk, index * chunk_size, stats, bar, inputs)
                    if self.cache is not None:
                        self.cache.save_chunk(index, partial)
                else:
                    bar.update(steps_per_chunk)
                for name, per_format in partial.items():
                    for fmt, value in per_format.items():
                        totals[name][fmt] += value
        table = self._table(totals, stats)
        if self.cache is not None:
            self.cache.save_table(table)
        return table

    def _inspect(self, sample: torch.Tensor) -> dict[str, str]:
        """Check block-wise execution is faithful (at the calibration sequence length); find
        linears that share an input."""
        with self._streamed_forward():
            return self.structure.check_blockwise(sample.to(self.device), [t.name for t in self.targets])

    def _streamed_forward(self) -> contextlib.AbstractContextManager:
        """With streaming, let a plain ``model(...)`` call bring each block to the device in turn."""
        return self._streamer.plain_forward() if self._streamer is not None else contextlib.nullcontext()

    def _steps(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Concatenate consecutive batches into steps of about ``tokens_per_step`` tokens.

        ``self._row_weights[i]`` weights each row of step ``i`` by 1 / (tokens of its original
        batch), so a step's loss is the sum of its batches' mean losses.
        """
        per_step = max(1, self.options.tokens_per_step // max(1, batches[0].numel()))
        steps, self._row_weights = [], []
        for start in range(0, len(batches), per_step):
            group = batches[start : start + per_step]
            steps.append(torch.cat(group))
            self._row_weights.append(torch.cat([torch.full((len(b),), 1.0 / (b.shape[0] * (b.shape[1] - 1))) for b in group]))
        return steps

    # --------------------------------------------------------------- placement
    def _place_model(self) -> None:
        """Everything on ``device``; with streaming, the decoder blocks stay on the CPU."""
        self._streamer = None
        if self.options.stream_blocks:
            self._streamer = BlockStreamer(self.model, self.structure.layers, self.structure.layer_prefix, self.device)
        else:
            self.model.to(self.device)

    def _resident(self, index: int, step: int) -> contextlib.AbstractContextManager:
        """Block ``index`` on the device; with streaming, block ``index + step`` is prefetched meanwhile."""
        if self._streamer is None:
            return contextlib.nullcontext()
        layers = self.structure.layers
        upcoming = layers[index + step] if 0 <= index + step < len(layers) else None
        return self._streamer.resident(layers[index], upcoming)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first block's input; the first step of each shape also captures every block's arguments."""
        shape = tuple(input_ids.shape)
        hidden, calls = self.structure.embed(input_ids.to(self.device), capture=shape not in self._block_calls)
        if calls is not None:
            self._block_calls[shape] = calls
        return hidden.to(self.store_device)

    def _run_block(self, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.structure.run_block(index, hidden, self._block_calls[tuple(input_ids.shape)])

    def _chunk_size(self, batches: list[torch.Tensor]) -> int:
        if self.options.chunk_steps:
            return self.options.chunk_steps
        hidden_size = self.structure.lm_head.in_features
        batch = batches[0]
        per_batch = (len(self.structure.layers) + 2) * batch.numel() * hidden_size * self._dtype_bytes()
        return max(1, min(len(batches), int(self.options.store_budget_gib * 2**30 // per_batch)))

    def _dtype_bytes(self) -> int:
        return next(self.model.parameters()).element_size()

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=f"autoq {desc}", unit="step", disable=not self.options.progress, leave=False)

    # ------------------------------------------------------ pass 1: calibration
    def _load_or_calibrate(
        self, batches: list[torch.Tensor], readers: dict[str, str], keep_inputs: int
    ) -> tuple[dict[str, _Stats], list[list[torch.Tensor]] | None]:
        """Calibration statistics, and every block's input for the first ``keep_inputs`` batches:
        the calibration pass is also the first scoring chunk's forward pass."""
        if self.cache is not None and (saved := self.cache.load_stats()) is not None:
            return self._stats_from_saved(*saved), None
        stats, kept = self._calibrate(batches, readers, keep_inputs)
        if self.cache is not None:
            self.cache.save_stats(*self._stats_to_saved(stats))
        return stats, kept

    @torch.no_grad()
    def _calibrate(
        self, batches: list[torch.Tensor], readers: dict[str, str], keep_inputs: int
    ) -> tuple[dict[str, _Stats], list[list[torch.Tensor]]]:
        stats = {t.name: _Stats(shared_input=readers[t.name]) for t in self.targets}
        rows_per_batch = math.ceil(self.options.awq_tokens / len(batches))
        hidden = [self._embed(ids) for ids in batches]
        kept: list[list[torch.Tensor]] = [[] for _ in batches[:keep_inputs]]
        blocks = list(enumerate(self.structure.layers))
        with self._progress(len(blocks) + 1, "calibrating") as bar:
            for index, block in blocks:
                targets = self.by_block.get(index, [])
                with self._resident(index, +1), record_function("autoq.calibrate"):
                    with self._stat_hooks(targets, stats, rows_per_batch):
                        for b, ids in enumerate(batches):
                            if b < keep_inputs:
                                kept[b].append(hidden[b])
                            out = self._run_block(index, hidden[b].to(self.device), ids)
                            hidden[b] = out.to(self.store_device)
                    with record_function("autoq.awq_search"):
                        self._search_awq(targets, stats)
                bar.update()
            head = self.by_block.get(None, [])
            if head:
                rows = self.structure.head_rows()
                with self._stat_hooks(head, stats, rows_per_batch):
                    for h, ids in zip(hidden, batches):
                        final = self.structure.final_hidden(h.to(self.device), ids.to(self.device))
                        for chunk in final.reshape(-1, final.shape[-1]).split(rows):
                            self.structure.logits(chunk)
                self._search_awq(head, stats)
            bar.update()
        for b, per_batch in enumerate(kept):
            per_batch.append(hidden[b])
        return stats, kept

    @contextlib.contextmanager
    def _stat_hooks(self, targets: list[_Target], stats: dict[str, _Stats], rows_per_batch: int) -> Iterator[None]:
        def make_hook(target: _Target):
            wants_awq = any(f.awq for f in target.formats)

            def hook(_module: nn.Module, args: tuple) -> None:
                x = args[0]
                s = stats[target.name]
                flat = x.reshape(-1, x.shape[-1])
                amax, abs_sum = channel_abs_stats(flat)
                s.channel_amax = amax if s.channel_amax is None else torch.maximum(s.channel_amax, amax)
                s.abs_sum = abs_sum if s.abs_sum is None else s.abs_sum + abs_sum
                s.rows += flat.shape[0]
                if wants_awq:
                    picks = torch.linspace(0, flat.shape[0] - 1, min(rows_per_batch, flat.shape[0]), device=flat.device)
                    s.awq_samples.append(flat[picks.long()].clone())

            return hook

        handles = [t.module.register_forward_pre_hook(make_hook(t)) for t in targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _search_awq(self, targets: list[_Target], stats: dict[str, _Stats]) -> None:
        for target in targets:
            s = stats[target.name]
            if not s.awq_samples:
                continue
            sample = torch.cat(s.awq_samples)
            act_scale = s.abs_sum / s.rows
            for fmt in target.formats:
                if fmt.awq:
                    s.pre_quant_scale[fmt.name] = awq.search_pre_quant_scale(fmt, target.module.weight, act_scale, sample)
            s.awq_samples.clear()

    @staticmethod
    def _stats_to_saved(stats: dict[str, _Stats]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, s in stats.items():
            tensors[f"{name}:channel_amax"] = s.channel_amax
            tensors[f"{name}:act_scale"] = s.abs_sum / s.rows
            for fmt, scale in s.pre_quant_scale.items():
                tensors[f"{name}:pre_quant_scale:{fmt}"] = scale
        return tensors, {"shared_input": {name: s.shared_input for name, s in stats.items()}}

    def _stats_from_saved(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, _Stats]:
        stats = {}
        for target in self.targets:
            name = target.name
            s = _Stats(channel_amax=tensors[f"{name}:channel_amax"].to(self.device), rows=1)
            s.abs_sum = tensors[f"{name}:act_scale"].to(self.device)
            s.shared_input = meta["shared_input"][name]
            for fmt in target.formats:
                if f"{name}:pre_quant_scale:{fmt.name}" in tensors:
                    s.pre_quant_scale[fmt.name] = tensors[f"{name}:pre_quant_scale:{fmt.name}"].to(self.device)
            stats[name] = s
        return stats

    # ---------------------------------------------------------- pass 2: scores
    def _score_chunk(
        self,
        batches: list[torch.Tensor],
        first_batch: int,
        stats: dict[str, _Stats],
        bar,
        inputs: list[list[torch.Tensor]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Scores of one chunk of batches. ``inputs``: every block's input per batch, if known."""
        totals = {t.name: {f.name: torch.zeros((), device=self.device) for f in t.formats} for t in self.targets}
        layers = self.structure.layers
        if inputs is not None:
            bar.update(len(layers))
        else:  # forward, block-major: keep every block's input for this chunk of batches
            with torch.no_grad():
                inputs = [[self._embed(ids)] for ids in batches]
                for index, block in enumerate(layers):
                    with self._resident(index, +1), record_function("autoq.score_forward"):
                        for ids, per_batch in zip(batches, inputs):
                            per_batch.append(self._run_block(index, per_batch[-1].to(self.device), ids).to(self.store_device))
                    bar.update()
        # Head: loss gradient with respect to the last block's output.
        grads: list[torch.Tensor] = []
        with record_function("autoq.score_head"), self._score_hooks(self.by_block.get(None, []), stats, totals) as next_batch:
            for b, (ids, per_batch) in enumerate(zip(batches, inputs)):
                x = per_batch[-1].to(self.device).requires_grad_(True)
                per_batch[-1] = None
                self._head_backward(x, ids.to(self.device), first_batch + b)
                grads.append(x.grad.to(self.store_device))
                next_batch()
        bar.update()
        # Backward, block-major and in reverse: recompute each block with gradients.
        for index in reversed(range(len(layers))):
            with self._resident(index, -1), record_function("autoq.score_backward"), \
                    self._score_hooks(self.by_block.get(index, []), stats, totals) as next_batch:
                for b, (ids, per_batch) in enumerate(zip(batches, inputs)):
                    x = per_batch[index].to(self.device).requires_grad_(True)
                    per_batch[index] = None
                    y = self._run_block(index, x, ids)
                    y.backward(grads[b].to(self.device))
                    grads[b] = x.grad.to(self.store_device)
                    next_batch()
            bar.update()
        return {name: {fmt: value.item() for fmt, value in per.items()} for name, per in totals.items()}

    def _head_backward(self, x: torch.Tensor, input_ids: torch.Tensor, batch_index: int) -> None:
        """Backpropagate one step's loss (its batches' mean next-token losses, summed) into
        ``x.grad``, computing the logits a chunk of tokens at a time."""
        final = self.structure.final_hidden(x, input_ids)
        normed = final[:, :-1].reshape(-1, final.shape[-1])
        leaf = normed.detach().requires_grad_(True)
        labels = input_ids[:, 1:].reshape(-1)
        token_weights = self._row_weights[batch_index].to(self.device).repeat_interleave(input_ids.shape[1] - 1)
        generator = None
        if self.options.objective == "kl":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.options.seed * 1_000_003 + batch_index)
        rows = self.structure.head_rows()
        for start in range(0, leaf.shape[0], rows):
            logits = self.structure.logits(leaf[start : start + rows]).float()
            if generator is None:
                target = labels[start : start + rows]
            else:  # label-free: tokens sampled from the unquantized model's own distribution
                target = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(1)
            loss = (F.cross_entropy(logits, target, reduction="none") * token_weights[start : start + rows]).sum()
            loss.backward()
        normed.backward(leaf.grad)

    def _prepare(self, targets: list[_Target], stats: dict[str, _Stats]) -> dict[str, list[_Prepared]]:
        """Quantized weights of one block, as the exporter will store them.

        Linears that read one input are fused at runtime, and ModelOpt's export makes them agree
        first: AWQ pre-scales averaged, per-tensor weight amax (FP8 scale, NVFP4 global scale)
        set to the group maximum. Scores are taken with those shared values.
        """
        fused: dict[str | None, list[_Target]] = defaultdict(list)
        for target in targets:
            fused[stats[target.name].shared_input if self.options.export_fused_scales else target.name].append(target)
        prepared: dict[str, list[_Prepared]] = {t.name: [] for t in targets}
        with torch.no_grad():
            for members in fused.values():
                for fmt in dict.fromkeys(f for t in members for f in t.formats):
                    sharing = [t for t in members if fmt in t.formats]
                    pre_quant_scale = None
                    if fmt.awq:
                        pre_quant_scale = torch.stack([stats[t.name].pre_quant_scale[fmt.name] for t in sharing]).mean(0)
                    tensor_amax = torch.stack(
                        [fmt.smooth(t.module.weight, pre_quant_scale).abs().amax().float() for t in sharing]
                    ).amax()
                    for t in sharing:
                        qweight = fmt.quantize_weight(t.module.weight, pre_quant_scale, tensor_amax)
                        prepared[t.name].append(_Prepared(fmt, qweight, pre_quant_scale, stats[t.name].channel_amax))
        return prepared

    @contextlib.contextmanager
    def _score_hooks(
        self, targets: list[_Target], stats: dict[str, _Stats], totals: dict[str, dict[str, torch.Tensor]]
    ) -> Iterator[Callable[[], None]]:
        """Forward hooks that attach, to each target's output, a gradient hook adding its scores."""
        prepared = self._prepare(targets, stats)
        # Linears fused at runtime read one input (q/k/v): quantize it once per format. Their
        # gradient hooks fire one after another, so only the latest input's quantizations are kept,
        # and only for inputs with several readers.
        readers = Counter(stats[t.name].shared_input for t in targets)
        quantized_inputs: dict[tuple[str, int], torch.Tensor] = {}
        quantized_from: list[torch.Tensor | None] = [None]

        def forget() -> None:
            quantized_inputs.clear()
            quantized_from[0] = None

        def quantized_input(x: torch.Tensor, p: _Prepared, shared: bool) -> torch.Tensor:
            if not shared:
                return p.fmt.quantize_input(x, p.channel_amax, p.pre_quant_scale)
            if quantized_from[0] is not x:
                forget()
                quantized_from[0] = x
            key = (p.fmt.name, id(p.pre_quant_scale))  # fused layers share one (averaged) AWQ pre-scale
            if key not in quantized_inputs:
                quantized_inputs[key] = p.fmt.quantize_input(x, p.channel_amax, p.pre_quant_scale)
            return quantized_inputs[key]

        def make_hook(target: _Target):
            shared = readers[stats[target.name].shared_input] > 1

            def on_forward(module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
                if not output.requires_grad:
                    return
                x, y = args[0].detach(), output.detach()

                def on_grad(grad: torch.Tensor) -> None:
                    with torch.no_grad():
                        for p in prepared[target.name]:
                            quantized_output = F.linear(quantized_input(x, p, shared), p.qweight, module.bias)
                            totals[target.name][p.fmt.name] += fisher_term(grad, quantized_output, y)

                output.register_hook(on_grad)

            return on_forward

        handles = [t.module.register_forward_hook(make_hook(t)) for t in targets]
        try:
            yield forget  # the caller calls it after each batch's backward
        finally:
            for handle in handles:
                handle.remove()
            forget()

    def _table(self, totals: dict[str, dict[str, float]], stats: dict[str, _Stats]) -> pd.DataFrame:
        rows = []
        for target in self.targets:
            choice = target.choice
            for fmt_name in choice.candidates:
                fmt = FORMATS[fmt_name]
                rows.append({
                    "layer": choice.name,
                    "block": HEAD_BLOCK if target.block is None else target.block,
                    "format": fmt_name,
                    "score": totals[choice.name][fmt_name] if fmt.quantized else 0.0,
                    "params": choice.params,
                    "bits": fmt.storage_bits(choice.out_features, choice.in_features),
                    "shared_input": stats[choice.name].shared_input,
                })  # fmt: skip
        return pd.DataFrame(rows, columns=SCORE_COLUMNS)
