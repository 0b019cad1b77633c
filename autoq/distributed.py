"""Data-parallel scoring: several processes (one per GPU) share the calibration steps.

Launch with ``torchrun --nproc-per-node N -m autoq search ...``, or ``autoq search ... --gpus N``,
which runs torchrun's own machinery (``torch.distributed.run``) on the same command line. Every
process (rank) loads the model and the calibration data, and scores on ``cuda:LOCAL_RANK`` with
NCCL (``--device cpu``: on the CPU with gloo). The engine (``autoq.sensitivity``) groups batches
into steps exactly as one process does, and rank ``r`` of ``N`` takes steps ``r, r + N, ...``:

* a block's calibration statistics are completed over all ranks before any rank searches AWQ
  scales or scores: per-channel amax with MAX, |x| sums (float64, so the sum is exact and the
  order of summation does not matter) and row counts with SUM; the AWQ grid's per-alpha squared
  errors with SUM, so every rank picks the alpha the single-process search would;
* a chunk's scores (float64 sums over its steps) are summed over the ranks. Chunks are ranges of
  the global steps, each rank scoring its own steps of a chunk, so a run resumes per chunk;
* rank 0 alone reads and writes the score cache (``RankZeroCache``: the others get what it read),
  solves, writes the outputs and speaks; the others stay quiet.

Failures: a collective that fails (a rank died, or ``COLLECTIVE_TIMEOUT`` passed) raises
``RankLost``, and torchrun stops every rank as soon as one exits. Rank 0 writes the outputs at the
end, atomically, so a failed run leaves none; its finished chunks stay in the cache. A failing
rank records its error for torchrun's failure report, which ``--gpus`` prints as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autoq import errors
from autoq.errors import AutoqError, log

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from autoq.cache import ScoreCache
    from autoq.calibration import LayerStats
    from autoq.targets import Target

# How long a rank waits in a collective for the others (e.g. while they load a large model).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_LAUNCHER_ENV = "AUTOQ_GPUS_LAUNCHER"  # set by ``launch`` for its workers: the launcher prints errors
RESUME_HINT = "no outputs were written; finished scoring chunks are in the score cache: rerun the same command to resume"


class RankLost(AutoqError):
    """A collective failed: another rank died, or did not arrive within ``COLLECTIVE_TIMEOUT``."""


@contextlib.contextmanager
def _collective(during: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:  # torch.distributed's errors and gloo's lost connections are RuntimeErrors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        minutes = int(COLLECTIVE_TIMEOUT.total_seconds() // 60)
        raise RankLost(f"lost contact with another rank during {during} (it failed, was killed, or did not "
                       f"arrive within {minutes} minutes): {first}") from None  # fmt: skip


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run (rank 0 of 1 when alone: every method is then a no-op)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives' tensors live

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, steps: range) -> list[int]:
        """This rank's steps among ``steps``: every ``world``-th global step, from step ``rank``."""
        return [step for step in steps if step % self.world == self.rank]

    def own_steps(self, count: int) -> list[int]:
        """This rank's share of all ``count`` steps (rank 0 says when some ranks get none)."""
        if count < self.world and self.is_main:
            log(f"only {count} calibration steps for {self.world} processes: {self.world - count} of them idle "
                "(use more calibration data or a smaller --tokens-per-step)")  # fmt: skip
        return self.shard(range(count))

    def reduce_stats(self, targets: list[Target], stats: dict[str, LayerStats]) -> None:
        """Complete ``targets``' calibration statistics over all ranks, in place: channel amax with
        MAX, |x| sums and row counts with SUM. A rank that saw no input of a layer adds the
        identities, and an empty AWQ sample so that it still takes part in the AWQ search."""
        if self.world == 1 or not targets:
            return
        amax, sums = [], []
        for target in targets:
            s, channels = stats[target.name], target.weight.shape[-1]
            none = torch.zeros(channels, dtype=torch.float64, device=self.device)
            amax.append(none.float() if s.channel_amax is None else s.channel_amax.to(self.device))
            sums.append(none if s.abs_sum is None else s.abs_sum.to(self.device, torch.float64))
            sums.append(torch.tensor([float(s.rows)], dtype=torch.float64, device=self.device))
            if not s.awq_samples and any(f.awq for f in target.formats):
                s.awq_samples.append(target.weight.new_zeros(0, channels))
        amax_all, sums_all = torch.cat(amax), torch.cat(sums)
        with _collective("calibration"):
            dist.all_reduce(amax_all, op=dist.ReduceOp.MAX)
            dist.all_reduce(sums_all, op=dist.ReduceOp.SUM)
        channels = [t.weight.shape[-1] for t in targets]
        summed = sums_all.split([size for c in channels for size in (c, 1)])
        rows = torch.stack(summed[1::2]).tolist()
        for target, channel_amax, abs_sum, (row_count,) in zip(targets, amax_all.split(channels), summed[0::2], rows):
            s = stats[target.name]
            s.channel_amax, s.abs_sum, s.rows = channel_amax, abs_sum, int(row_count)

    def sum_losses(self, losses: torch.Tensor) -> torch.Tensor:
        """The AWQ grid's per-alpha squared-error sums over all ranks' samples (in place)."""
        if self.world > 1:
            with _collective("the AWQ scale search"):
                dist.all_reduce(losses, op=dist.ReduceOp.SUM)
        return losses

    def reduce_scores(self, partial: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """A chunk's scores summed over all ranks (each scored its own steps of the chunk)."""
        if self.world == 1:
            return partial
        keys = [(name, fmt) for name, per_format in partial.items() for fmt in per_format]
        flat = torch.tensor([partial[name][fmt] for name, fmt in keys], dtype=torch.float64, device=self.device)
        with _collective("scoring"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        summed: dict[str, dict[str, float]] = {name: {} for name in partial}
        for (name, fmt), value in zip(keys, flat.tolist()):
            summed[name][fmt] = value
        return summed

    def broadcast(self, value: Any, during: str) -> Any:
        """Rank 0's ``value`` on every rank (torch's object collectives: pickled between our own
        processes, never read from a file)."""
        if self.world == 1:
            return value
        box = [value]
        with _collective(during):
            dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value: Any, during: str) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        with _collective(during):
            dist.all_gather_object(values, value)
        return values

    def shared_cache(self, cache: ScoreCache) -> ScoreCache | RankZeroCache:
        return cache if self.world == 1 else RankZeroCache(cache, self)


class RankZeroCache:
    """A ``ScoreCache`` that rank 0 reads and writes for every rank: the others get what it read
    (so every rank resumes the same chunks, with or without a shared file system) and never write."""

    def __init__(self, cache: ScoreCache, parallel: DataParallel):
        self.cache = cache
        self.parallel = parallel
        self.key, self.key_parts, self.dir = cache.key, cache.key_parts, cache.dir

    def _read(self, read: Callable[[], Any]) -> Any:
        return self.parallel.broadcast(read() if self.parallel.is_main else None, "reading the score cache")

    def load_table(self):
        return self._read(self.cache.load_table)

    def load_chunks(self):
        return self._read(self.cache.load_chunks)

    def load_stats(self, device: torch.device):
        loaded = self._read(lambda: self.cache.load_stats(torch.device("cpu")))
        if loaded is None:
            return None
        stats, layout = loaded
        for s in stats.values():
            s.channel_amax, s.abs_sum = s.channel_amax.to(device), s.abs_sum.to(device)
            s.pre_quant_scale = {fmt: scale.to(device) for fmt, scale in s.pre_quant_scale.items()}
        return stats, layout

    def save_table(self, *args: Any) -> None:
        if self.parallel.is_main:
            self.cache.save_table(*args)

    def save_stats(self, *args: Any) -> None:
        if self.parallel.is_main:
            self.cache.save_stats(*args)

    def save_chunk(self, *args: Any) -> None:
        if self.parallel.is_main:
            self.cache.save_chunk(*args)

    def clear_partial(self) -> None:
        if self.parallel.is_main:
            self.cache.clear_partial()

    def locked(self) -> contextlib.AbstractContextManager:
        """Rank 0 takes the entry's lock; the others wait for it in the next collective."""
        return self.cache.locked() if self.parallel.is_main else contextlib.nullcontext()


def current() -> DataParallel:
    """This process's place in the run: from torch.distributed's default process group, if any."""
    if not (dist.is_available() and dist.is_initialized()):
        return DataParallel()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return DataParallel(dist.get_rank(), dist.get_world_size(), device)


def _device_kind(device: str | None) -> tuple[str, int | None]:
    if device is None:
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise AutoqError(f"--device {device}: not a device (expected cpu, cuda or cuda:N)") from None
    return parsed.type, parsed.index


def check_launch(processes: int, device: str | None) -> None:
    """``--gpus N``: fail before starting N processes that could not each get a device."""
    if device is None and not torch.cuda.is_available():
        raise AutoqError(f"--gpus {processes}: no CUDA GPU is visible (--device cpu runs {processes} CPU processes, with gloo)")
    _check_devices(processes, device)


def _check_devices(processes: int, device: str | None) -> None:
    """``processes`` processes on this host can each have a ``device`` (GPU ``LOCAL_RANK`` for cuda)."""
    kind, index = _device_kind(device)
    if kind == "cpu":
        return
    if kind != "cuda":
        raise AutoqError(f"--device {device}: several processes run on cuda (NCCL) or cpu (gloo)")
    if index is not None:
        raise AutoqError(f"--device {device}: with several processes each uses its own GPU (cuda:LOCAL_RANK); pass --device cuda")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < processes:
        raise AutoqError(f"{processes} processes on this host, {visible} CUDA GPU(s) visible (--device cpu runs them on the CPU, with gloo)")


@contextlib.contextmanager
def process_group(device: str | None, expected: int | None = None) -> Iterator[tuple[DataParallel, str | None]]:
    """Join the run's process group if torchrun started several processes (else: one process,
    unchanged). Yields this rank's ``DataParallel`` and the device it scores on. Ranks other
    than 0 are quiet from here on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if world == 1:
        yield DataParallel(), device
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    errors.set_quiet(rank != 0)
    if expected is not None and expected != world:
        raise AutoqError(f"--gpus {expected}, but torchrun started {world} processes")
    _check_devices(int(os.environ.get("LOCAL_WORLD_SIZE", world)), device)
    if _device_kind(device)[0] == "cuda":
        torch.cuda.set_device(local_rank)
        rank_device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        rank_device, backend = torch.device("cpu"), "gloo"
    with _collective("start-up"):
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=rank_device if backend == "nccl" else None)
    try:
        yield current(), str(rank_device)
    finally:
        dist.destroy_process_group()


def record_error(err: BaseException) -> None:
    """Record ``err`` for torchrun's failure report (which the ``--gpus`` launcher prints)."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)


def prints_errors() -> bool:
    """Under torchrun, rank 0 prints errors, unless the ``--gpus`` launcher does."""
    return os.environ.get("RANK", "0") == "0" and _LAUNCHER_ENV not in os.environ


def launch(processes: int, argv: list[str]) -> int:
    """Run ``autoq <argv>`` in ``processes`` processes on this host with torchrun's own machinery
    (``torch.distributed.run``, standalone rendezvous). If a rank fails, torchrun stops the others
    and this prints the root cause as one line. Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    env = {_LAUNCHER_ENV: "1"}
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1: share this host's cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # its failure report becomes one line
    try:
        run(parse_args(["--standalone", "--nproc-per-node", str(processes), "--module", "autoq", *argv]))
    except ChildFailedError as failed:
        message, status = describe_failure(failed)
        print(f"autoq: error: {message}", file=sys.stderr, flush=True)
        return status
    except SignalException:
        print(f"autoq: interrupted; {RESUME_HINT}", file=sys.stderr, flush=True)
        return 130
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return 0


def describe_failure(failed: ChildFailedError) -> tuple[str, int]:
    """The root cause of a failed launch as one line, and the exit status (2: an autoq error,
    i.e. bad input; 1: anything else).

    torchrun lists every rank that ended badly, in seconds-resolution time: the rank that failed
    on its own (its recorded error, or a signal such as SIGKILL) is blamed before one that only
    saw it go (``RankLost``) and before those torchrun then stopped itself (SIGTERM).
    """

    def recorded(failure) -> str | None:  # "Type: message", as ErrorHandler records it
        message = failure.error_file_data.get("message")
        return message.get("message") if isinstance(message, dict) else None

    def blame(failure) -> int:  # lower: more likely the root cause
        error = recorded(failure)
        if error is not None:
            return 2 if error.startswith(f"{RankLost.__name__}: ") else 0
        return 3 if failure.exitcode == -signal.SIGTERM else 1

    order = {rank: position for position, rank in enumerate(failed.failures)}  # as torchrun saw them
    rank, failure = min(failed.failures.items(), key=lambda item: (blame(item[1]), item[1].timestamp, order[item[0]]))
    error = recorded(failure)
    if error is not None:
        kind, _, text = error.partition(": ")
        if kind == AutoqError.__name__:
            return text.splitlines()[0], 2
        return f"rank {rank}: {error.splitlines()[0]}; {RESUME_HINT}", 1
    if failure.exitcode < 0:
        return f"rank {rank} was killed by {failure.signal_name()}; {RESUME_HINT}", 1
    return f"rank {rank} exited with status {failure.exitcode} (see its messages above); {RESUME_HINT}", 1
