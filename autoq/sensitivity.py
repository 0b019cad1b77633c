"""The sensitivity engine: per-layer, per-format scores from loss gradients.

For a linear layer with output ``Y`` and a format ``f``, the score is the Fisher/Taylor estimate
of the loss increase from quantizing that layer alone::

    score(layer, f) = sum over calibration tokens of (dL/dY * (Q_f(Y) - Y))^2

with ``Q_f(Y) = Q_f(X) @ Q_f(W)^T``. ``L`` is the LM loss on the calibration text
(``objective="fisher"``) or, label-free, the loss on tokens sampled from the model's own
next-token distribution (``objective="kl"``), whose expected squared gradient is the Fisher of
the KL divergence to the unquantized model.

The engine puts the parts together, each in its own module:
* ``autoq.decoder``: the model as embedding stage -> blocks -> head, run by its own code, with
  every block's arguments captured from the model's own forward;
* ``autoq.executor``: runs the blocks forward (block-major) and recomputes them in reverse with
  autograd, in memory or streamed through the GPU (``autoq.streaming``);
* ``autoq.calibration``: pass 1 collects per-channel amax and AWQ statistics, then searches
  AWQ scales; the same pass keeps the first chunk's block inputs for pass 2;
* ``autoq.scoring``: pass 2's hooks, which turn each layer's output gradient into its scores;
* ``autoq.experts``: MoE experts fused in 3-D parameters, seen expert by expert by those hooks;
* ``autoq.cache``: finished tables, statistics and chunks on disk, so runs resume;
* ``autoq.distributed``: data-parallel ranks, each scoring every N-th step (hook points marked
  "data-parallel").
Parameters never require gradients, so no weight gradient is ever computed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from autoq import distributed
from autoq.cache import ScoreCache
from autoq.calibration import LayerStats, StatsCollector
from autoq.decoder import DecoderStructure
from autoq.devices import available_memory_bytes
from autoq.errors import AutoqError, log
from autoq.executor import BlockExecutor
from autoq.experts import ExpertRouting
from autoq.formats import FORMATS
from autoq.scoring import ScoreHooks
from autoq.search_space import LayerChoice
from autoq.targets import Target, build_targets, by_block

if TYPE_CHECKING:
    from autoq.diskmodel import DiskWeights

ENGINE_VERSION = 2  # 2: block arguments captured from the model's own forward
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
    # Memory for block inputs; more batches than fit are scored in chunks, each forward again.
    # None: 2 GiB; in memory on a GPU, half its free memory (usually one chunk: the calibration
    # pass is then the only forward pass).
    store_budget_gib: float | None = None
    awq_tokens: int = 1024  # calibration tokens sampled per layer for the AWQ scale search
    # AWQ's grid quantizes a layer's weight once per alpha: that many weight elements at a time
    # (fewer, larger kernels; 0: one alpha at a time). Scores do not depend on it.
    # None: 0 on a CPU (one alpha's weight stays in cache), 2^26 on a GPU.
    awq_batch_elements: int | None = None
    # Score hooks reduce every format's ``sum((dL/dY * (Q_f(Y) - Y))^2)`` of a layer in one fused
    # pass over dL/dY and Y (on a GPU; one kernel instead of one per format). False: one per format.
    fuse_formats: bool = True
    # Calibration batches are run this many tokens at a time (fewer, larger kernels; the loss is
    # still the sum of per-batch means, so scores depend on it only through rounding).
    # None: 8192; in memory on a GPU of 40 GiB or more, 16384.
    tokens_per_step: int | None = None
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
class EngineSizes:
    """The sizes ``ScoringOptions`` leaves to the engine (``None``), chosen for the device."""

    tokens_per_step: int
    awq_batch_elements: int
    store_budget: float | None  # GiB; None: half the GPU memory free when scoring starts
    device: torch.device

    @classmethod
    def resolve(cls, options: ScoringOptions, device: torch.device) -> EngineSizes:
        gpu = device.type == "cuda"
        in_gpu_memory = gpu and not options.stream_blocks
        large_gpu = in_gpu_memory and torch.cuda.get_device_properties(device).total_memory >= 40 * 2**30
        budget = options.store_budget_gib if options.store_budget_gib is not None or in_gpu_memory else 2.0
        awq_batch = options.awq_batch_elements
        if awq_batch is None:  # a CPU quantizes one alpha's weight from its cache; a GPU saves launches
            awq_batch = 1 << 26 if gpu else 0
        return cls(options.tokens_per_step or (16384 if large_gpu else 8192), awq_batch, budget, device)

    def store_budget_gib(self) -> float:
        if self.store_budget is not None:
            return self.store_budget
        return max(2.0, available_memory_bytes(self.device) / 2 / 2**30)


def batches_per_step(batches: list[torch.Tensor], tokens_per_step: int) -> int:
    return max(1, tokens_per_step // max(1, batches[0].numel()))


def make_steps(batches: list[torch.Tensor], per_step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Concatenate every ``per_step`` consecutive batches into one step.

    Also returns, per step, the weight of each of its rows: 1 / (tokens of its original batch),
    so that a step's loss is the sum of its batches' mean losses.
    """
    steps, row_weights = [], []
    for start in range(0, len(batches), per_step):
        group = batches[start : start + per_step]
        steps.append(torch.cat(group))
        row_weights.append(torch.cat([torch.full((len(b),), 1.0 / (b.shape[0] * (b.shape[1] - 1))) for b in group]))
    return steps, row_weights


def _chunk_plan(steps: int, chunk_size: int, finished: dict[int, tuple[int, Any]]) -> list[tuple[int, int]]:
    """Chunks ``[first, end)`` tiling ``range(steps)``: finished chunks where one starts, else
    ``chunk_size`` steps (cut short where a finished chunk starts)."""
    plan, first = [], 0
    while first < steps:
        if first in finished:
            end = finished[first][0]
        else:
            end = min([steps, first + chunk_size, *(start for start in finished if start > first)])
        plan.append((first, end))
        first = end
    return plan


class SensitivityEngine:
    """Scores the layers in ``choices`` of ``model`` for all their candidate formats."""

    def __init__(
        self, model: nn.Module, choices: list[LayerChoice], options: ScoringOptions, cache: ScoreCache | None = None,
        weights: DiskWeights | None = None,
    ):  # fmt: skip
        """``weights``: ``model`` is a skeleton whose blocks are read from these files (``autoq.diskmodel``)."""
        self.model = model
        self.options = options
        self.cache = cache
        self.structure = DecoderStructure(model)
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.store_device = torch.device("cpu") if options.store_on_cpu else self.device
        self.executor = BlockExecutor(self.structure, self.device, self.store_device, options.stream_blocks, weights)
        self.targets = build_targets(model, self.structure, choices)
        self.by_block = by_block(self.targets)
        self.routing = ExpertRouting([t.module for t in self.targets if t.fused_experts])
        self.parallel = distributed.current()  # data-parallel: this process's rank (0 of 1 alone)
        self.sizes = EngineSizes.resolve(options, self.device)
        self.stats: dict[str, LayerStats] = {}  # calibration statistics, once run (the calibration state's)

    def run(self, token_batches: list[torch.Tensor]) -> pd.DataFrame:
        """Score table (``SCORE_COLUMNS``), from the cache when this exact work was done before."""
        if self.cache is not None and (cached := self.cache.load_table()) is not None:
            return cached
        self.executor.freeze_parameters()
        with self.executor.placed(), self.routing.attached():
            table = self._scores(token_batches)
        bad = table[~table.score.map(math.isfinite)]
        if len(bad):  # never cached, never solved: a plan from NaN scores would look valid and mean nothing
            dtype = next(self.model.parameters()).dtype
            raise AutoqError(f"{len(bad)} scores are NaN or infinite (first: {bad.layer.iloc[0]} as {bad.format.iloc[0]}): the model's "
                             f"activations or gradients overflow in {str(dtype).removeprefix('torch.')}; try --dtype float32")  # fmt: skip
        if self.cache is not None:
            self.cache.save_table(table)
        return table

    def calibrate(self, token_batches: list[torch.Tensor]) -> dict[str, LayerStats]:
        """Pass 1 alone: the targets' calibration statistics, no scores (``autoq.streamcalib``)."""
        self.executor.freeze_parameters()
        with self.executor.placed(), self.routing.attached():
            readers = self.executor.check_blockwise(token_batches[0][:1], {t.name: t.module for t in self.targets})
            steps, _ = make_steps(token_batches, batches_per_step(token_batches, self.sizes.tokens_per_step))
            _, stored_steps = self._memory_plan(steps)
            self.stats, _ = self._calibrate(steps, self.parallel.own_steps(len(steps)), readers, 0, stored_steps)
        return self.stats

    def _scores(self, token_batches: list[torch.Tensor]) -> pd.DataFrame:
        readers = self.executor.check_blockwise(token_batches[0][:1], {t.name: t.module for t in self.targets})
        per_step = batches_per_step(token_batches, self.sizes.tokens_per_step)
        steps, self._row_weights = make_steps(token_batches, per_step)
        layout = {"batches_per_step": per_step, "steps": len(steps)}
        chunk_size, stored_steps = self._memory_plan(steps)
        mine = self.parallel.own_steps(len(steps))  # data-parallel: this rank's steps (all, alone)
        stats, first_chunk_inputs = self._load_or_calibrate(steps, mine, readers, chunk_size, stored_steps, layout)
        self.stats = stats
        finished = self.cache.load_chunks() if self.cache is not None else {}
        plan = _chunk_plan(len(steps), chunk_size, finished)
        done = sum(end - first for first, end in plan if first in finished)
        if done:
            log(f"resuming from the score cache: {done} of {len(steps)} steps already scored")
        totals: dict[str, dict[str, float]] = {t.name: {f.name: 0.0 for f in t.formats} for t in self.targets}
        steps_per_chunk = 2 * len(self.structure.layers) + 1
        to_score = [first for first, _ in plan if first not in finished]
        with self._progress(len(to_score) * steps_per_chunk, "scoring") as bar:
            for first, end in plan:
                if first in finished:
                    partial = finished[first][1]
                else:
                    indices = self.parallel.shard(range(first, end))  # data-parallel: this rank's steps of the chunk
                    kept = first_chunk_inputs if first == 0 and first_chunk_inputs and len(indices) == len(first_chunk_inputs) else None
                    partial = self._score_chunk([steps[i] for i in indices], indices, stats, bar, kept)
                    partial = self.parallel.reduce_scores(partial)  # data-parallel: the chunk's scores over all ranks
                    if self.cache is not None:
                        self.cache.save_chunk(first, end, partial)
                for name, per_format in partial.items():
                    for fmt, value in per_format.items():
                        totals[name][fmt] += value
        return self._table(totals, stats)

    def _memory_plan(self, steps: list[torch.Tensor]) -> tuple[int, int]:
        """Steps per scoring chunk, and how many steps' hidden states calibration keeps on the
        store device, within ``store_budget_gib``. Data-parallel: each of N ranks scores 1/N of a
        chunk's steps, and every rank plans the same chunks (from all steps, not its own).

        A chunk of ``c`` steps holds ``L + 2`` hidden states per step while it is scored (every
        block's input, the head's output and the gradient). Calibration keeps the first chunk's
        block inputs (``c * (L + 1)`` states) and one state per other step; steps beyond the
        budget wait in CPU memory.
        """
        layers = len(self.structure.layers)
        dtype_bytes = next(self.model.parameters()).element_size()
        step_bytes = max(s.numel() for s in steps) * self.structure.lm_head.in_features * dtype_bytes
        budget = self.sizes.store_budget_gib() * 2**30 / step_bytes  # in hidden states of one step
        world = self.parallel.world
        most = -(-len(steps) // world)  # the most steps one rank has
        own = max(1, min(most, int(budget // (layers + 2))))  # steps of a chunk one rank scores
        if self.options.chunk_steps:
            own = -(-self.options.chunk_steps // world)
        return self.options.chunk_steps or own * world, max(own, min(most, int(budget - own * layers)))

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=f"autoq {desc}", unit="step", disable=not self.options.progress, leave=False)

    # ------------------------------------------------------ pass 1: calibration
    def _load_or_calibrate(
        self, steps: list[torch.Tensor], mine: list[int], readers: dict[str, str], keep_inputs: int, stored_steps: int,
        layout: dict[str, int],
    ) -> tuple[dict[str, LayerStats], list[list[torch.Tensor]] | None]:
        """Calibration statistics, and every block's input for this rank's steps (``mine``) among
        the first ``keep_inputs``: the calibration pass is also the first scoring chunk's forward pass.

        An interrupted run's statistics are reused only if its steps were the same batches
        (its finished chunks are then sums over the same steps); otherwise it starts over.
        """
        if self.cache is not None and (saved := self.cache.load_stats(self.device)) is not None:
            stats, saved_layout = saved
            if saved_layout == layout:
                return stats, None
            log(f"the interrupted run in the score cache grouped its batches differently ({saved_layout}, now {layout}): "
                "starting over")  # fmt: skip
        stats, kept = self._calibrate(steps, mine, readers, keep_inputs, stored_steps)
        if self.cache is not None:
            self.cache.save_stats(stats, layout)
        return stats, kept

    def _calibrate(
        self, steps: list[torch.Tensor], mine: list[int], readers: dict[str, str], keep_inputs: int, stored_steps: int
    ) -> tuple[dict[str, LayerStats], list[list[torch.Tensor]]]:
        collector = StatsCollector(self.targets, readers, StatsCollector.samples_per_step_for(self.options.awq_tokens, len(steps)))
        keep = len(self.parallel.shard(range(min(keep_inputs, len(steps)))))  # data-parallel: this rank's share
        steps = [steps[i] for i in mine]

        @contextlib.contextmanager
        def collecting(targets: list[Target]) -> Iterator[None]:
            with collector.observing(targets):
                yield
            self.parallel.reduce_stats(targets, collector.stats)  # data-parallel: statistics over all ranks
            with record_function("autoq.awq_search"):
                # data-parallel: AWQ losses summed over all ranks
                collector.search_pre_quant_scales(targets, self.parallel.sum_losses, self.sizes.awq_batch_elements)

        with self._progress(len(self.structure.layers) + 1, "calibrating") as bar:
            kept, finals = self.executor.forward(
                steps, keep, lambda index: collecting(self.by_block.get(index, [])), label="calibrate",
                tick=bar.update, stored_steps=stored_steps,
            )  # fmt: skip
            if head := self.by_block.get(None, []):
                with collecting(head):
                    for final, ids in zip(finals, steps):
                        self.executor.head_forward(final, ids)
            bar.update()
        return collector.stats, kept

    # ---------------------------------------------------------- pass 2: scores
    def _score_chunk(
        self, steps: list[torch.Tensor], step_indices: list[int], stats: dict[str, LayerStats], bar,
        inputs: list[list[torch.Tensor]] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Scores of one chunk of steps (``step_indices``: their global indices). ``inputs``:
        every block's input per step, if known."""
        hooks = ScoreHooks(self.targets, stats, self.options.export_fused_scales, self.device, self.options.fuse_formats)
        if inputs is None:  # forward, block-major: keep every block's input for this chunk
            inputs, _ = self.executor.forward(steps, len(steps), label="score_forward", tick=bar.update)
        else:
            bar.update(len(self.structure.layers))
        # Head: loss gradient with respect to the last block's output.
        grads: list[torch.Tensor] = []
        with record_function("autoq.score_head"), hooks.scoring(self.by_block.get(None, [])) as after_step:
            for b, (ids, per_step) in enumerate(zip(steps, inputs)):
                x = per_step[-1].to(self.device).requires_grad_(True)
                per_step[-1] = None
                self.executor.head_backward(x, ids, self._loss(ids, step_indices[b]))
                grads.append(x.grad.to(self.store_device))
                after_step()
        bar.update()
        self.executor.backward(steps, inputs, grads, lambda index: hooks.scoring(self.by_block.get(index, [])), bar.update)
        return hooks.totals()

    def _loss(self, input_ids: torch.Tensor, step_index: int):
        """One step's loss over a chunk of its next-token logits: its batches' mean losses, summed."""
        ids = input_ids.to(self.device)
        labels = ids[:, 1:].reshape(-1)
        weights = self._row_weights[step_index].to(self.device).repeat_interleave(ids.shape[1] - 1)
        generator = None
        if self.options.objective == "kl":
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.options.seed * 1_000_003 + step_index)

        def loss(logits: torch.Tensor, rows: slice) -> torch.Tensor:
            if generator is None:
                target = labels[rows]
            else:  # label-free: tokens sampled from the unquantized model's own distribution
                target = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(1)
            return (F.cross_entropy(logits, target, reduction="none") * weights[rows]).sum()

        return loss

    def _table(self, totals: dict[str, dict[str, float]], stats: dict[str, LayerStats]) -> pd.DataFrame:
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
                    "bits": choice.storage_bits(fmt_name),
                    "shared_input": stats[choice.name].shared_input,
                })  # fmt: skip
        return pd.DataFrame(rows, columns=SCORE_COLUMNS)
