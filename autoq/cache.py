"""On-disk score cache: finished score tables, calibration statistics and the chunks of interrupted runs.

An entry is keyed by everything the scores depend on (model and data fingerprints, formats and
their numerics, layers, objective, batching), so a re-run with another bits budget, or after a
crash, finds the work already done. An interrupted run leaves its calibration statistics, with
the step layout they were collected with (batches per step), and one file per finished chunk
named by the steps it covers. Tensors are stored as safetensors and everything else as JSON or
parquet: nothing is ever unpickled.

Integrity: every file is written atomically (temp file + rename) and followed by its checksum
``<file>.sha256``. A file whose bytes do not match its checksum (flipped or truncated on disk, or
written by a run killed before its checksum) is reported in one line, removed and recomputed.
Concurrency: one process at a time scores an entry (``locked``: an flock on ``<key>.lock`` next to
it); another process on the same entry waits, then reads the finished table.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from autoq.calibration import LayerStats
from autoq.errors import atomic_write as _atomic_write
from autoq.errors import file_lock, log

LAYOUT = 2  # 2: every file has a .sha256 checksum (entries of layout 1 are not read)


class ScoreCache:
    """One cache entry: ``<root>/scores/<key>/``."""

    def __init__(self, root: Path, key_parts: dict[str, Any]):
        self.key_parts = {**key_parts, "cache_layout": LAYOUT}
        self.key = hashlib.sha256(json.dumps(self.key_parts, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(root) / "scores" / self.key

    @property
    def table_path(self) -> Path:
        return self.dir / "scores.parquet"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This entry to this process alone for the block (other processes scoring it wait)."""
        with file_lock(self.dir.parent / f"{self.key}.lock",
                       f"another autoq process is scoring the same model and data (score cache {self.dir}): waiting for it"):  # fmt: skip
            yield

    # ------------------------------------------------------------- checked files
    def _write(self, name: str, data: bytes) -> None:
        """``name`` in the entry, then its checksum (a file without one is never trusted)."""
        _atomic_write(self.dir / name, lambda p: p.write_bytes(data))
        _atomic_write(self.dir / f"{name}.sha256", lambda p: p.write_text(hashlib.sha256(data).hexdigest() + "\n"))

    def _read(self, name: str) -> bytes | None:
        """The bytes of ``name`` if present and matching its checksum; a damaged file is reported and removed."""
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            expected = (self.dir / f"{name}.sha256").read_text().strip()
        except FileNotFoundError:
            return self._damaged(name, "it has no checksum (a write was interrupted)")
        if hashlib.sha256(data).hexdigest() != expected:
            return self._damaged(name, "its bytes do not match its sha256 checksum")
        return data

    def _damaged(self, name: str, why: str, also: list[str] | None = None) -> None:
        names = [name, *(also or [])]
        for each in names:
            (self.dir / each).unlink(missing_ok=True)
            (self.dir / f"{each}.sha256").unlink(missing_ok=True)
        extra = f" (and {len(names) - 1} file(s) computed from it)" if len(names) > 1 else ""
        log(f"score cache: {self.dir / name} is damaged: {why}; removed{extra}, recomputing")
        return None

    # ------------------------------------------------------------------- table
    def load_table(self) -> pd.DataFrame | None:
        data = self._read(self.table_path.name)
        if data is None:
            return None
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as err:  # noqa: BLE001 - matched its checksum, yet unreadable: same remedy
            return self._damaged(self.table_path.name, f"unreadable ({type(err).__name__})")

    def save_table(self, table: pd.DataFrame) -> None:
        _atomic_write(self.dir / "key.json", lambda p: p.write_text(json.dumps(self.key_parts, indent=1, sort_keys=True)))
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        self._write(self.table_path.name, buffer.getvalue())

    # -------------------------------------------------------------- statistics
    def load_stats(self, device: torch.device) -> tuple[dict[str, LayerStats], dict[str, Any]] | None:
        """Calibration statistics of an interrupted run (amax, mean |x|, AWQ scales) on ``device``,
        with the step layout they were collected with."""
        if not (self.dir / "stats.safetensors").is_file() and not (self.dir / "stats.json").is_file():
            return None
        chunks = [p.name for p in self.dir.glob("chunk_*-*.json")]
        tensors_data, meta_data = self._read("stats.safetensors"), self._read("stats.json")
        if tensors_data is None or meta_data is None:  # half a pair: the chunks scored with it go too
            self.clear_partial()
            return None
        try:
            meta = json.loads(meta_data)
            tensors = {k: v.to(device) for k, v in load_safetensors(tensors_data).items()}
            stats = {}
            for name, shared_input in meta["shared_input"].items():
                s = LayerStats(channel_amax=tensors[f"{name}:channel_amax"], abs_sum=tensors[f"{name}:act_scale"], rows=1)
                s.shared_input = shared_input
                prefix = f"{name}:pre_quant_scale:"
                s.pre_quant_scale = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                s.alpha = {k.rpartition(":")[2]: v.reshape(()) for k, v in tensors.items() if k.startswith(f"{name}:alpha:")}
                stats[name] = s
        except Exception as err:  # noqa: BLE001 - matched its checksum, yet unreadable: same remedy
            return self._damaged("stats.safetensors", f"unreadable ({type(err).__name__})", ["stats.json", *chunks])
        return stats, meta.get("layout", {})

    def save_stats(self, stats: dict[str, LayerStats], layout: dict[str, Any]) -> None:
        """Start a run's partial state: its statistics; chunks saved before (by another run) go."""
        self.clear_partial()
        tensors: dict[str, torch.Tensor] = {}
        for name, s in stats.items():
            tensors[f"{name}:channel_amax"] = s.channel_amax
            tensors[f"{name}:act_scale"] = s.act_scale
            for fmt, scale in s.pre_quant_scale.items():
                tensors[f"{name}:pre_quant_scale:{fmt}"] = scale
            for fmt, alpha in s.alpha.items():
                tensors[f"{name}:alpha:{fmt}"] = alpha.reshape(1).float()
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"shared_input": {name: s.shared_input for name, s in stats.items()}, "layout": layout}
        self._write("stats.safetensors", save_safetensors(cpu))
        self._write("stats.json", json.dumps(meta).encode())

    def clear_partial(self) -> None:
        """Forget an interrupted run: its statistics and finished chunks."""
        for path in [self.dir / "stats.safetensors", self.dir / "stats.json", *self.dir.glob("chunk_*.json")]:
            path.unlink(missing_ok=True)
            path.with_name(f"{path.name}.sha256").unlink(missing_ok=True)

    # ------------------------------------------------------------------ chunks
    def load_chunks(self) -> dict[int, tuple[int, dict[str, dict[str, float]]]]:
        """Finished chunks of the run whose statistics are saved: first step -> (end step, scores).

        A chunk is the sum of its steps' scores, named by the steps it covers, so a resumed run
        can reuse it whatever its own chunk size (the step layout is the statistics').
        """
        chunks = {}
        for path in sorted(self.dir.glob("chunk_*-*.json")):
            data = self._read(path.name)
            if data is None:
                continue
            try:
                first, end = (int(part) for part in path.stem.removeprefix("chunk_").split("-"))
                chunks[first] = (end, json.loads(data))
            except ValueError as err:
                self._damaged(path.name, f"unreadable ({type(err).__name__})")
        return chunks

    def save_chunk(self, first: int, end: int, scores: dict[str, dict[str, float]]) -> None:
        self._write(f"chunk_{first:05d}-{end:05d}.json", json.dumps(scores).encode())
