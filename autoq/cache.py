"""On-disk score cache: finished score tables, calibration statistics and the chunks of interrupted runs.

An entry is keyed by everything the scores depend on (model and data fingerprints, formats and
their numerics, layers, objective, batching), so a re-run with another bits budget, or after a
crash, finds the work already done. An interrupted run leaves its calibration statistics, with
the step layout they were collected with (batches per step), and one file per finished chunk
named by the steps it covers. Files are written atomically (temp file + rename), tensors
as safetensors and everything else as JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from autoq.calibration import LayerStats
from autoq.errors import atomic_write as _atomic_write


class ScoreCache:
    """One cache entry: ``<root>/scores/<key>/``."""

    def __init__(self, root: Path, key_parts: dict[str, Any]):
        self.key_parts = key_parts
        self.key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = Path(root) / "scores" / self.key

    @property
    def table_path(self) -> Path:
        return self.dir / "scores.parquet"

    def load_table(self) -> pd.DataFrame | None:
        return pd.read_parquet(self.table_path) if self.table_path.is_file() else None

    def save_table(self, table: pd.DataFrame) -> None:
        _atomic_write(self.dir / "key.json", lambda p: p.write_text(json.dumps(self.key_parts, indent=1, sort_keys=True)))
        _atomic_write(self.table_path, lambda p: table.to_parquet(p, index=False))

    def load_stats(self, device: torch.device) -> tuple[dict[str, LayerStats], dict[str, Any]] | None:
        """Calibration statistics of an interrupted run (amax, mean |x|, AWQ scales) on ``device``,
        with the step layout they were collected with."""
        tensors_path, meta_path = self.dir / "stats.safetensors", self.dir / "stats.json"
        if not (tensors_path.is_file() and meta_path.is_file()):
            return None
        meta = json.loads(meta_path.read_text())
        tensors = {k: v.to(device) for k, v in load_file(tensors_path).items()}
        stats = {}
        for name, shared_input in meta["shared_input"].items():
            s = LayerStats(channel_amax=tensors[f"{name}:channel_amax"], abs_sum=tensors[f"{name}:act_scale"], rows=1)
            s.shared_input = shared_input
            prefix = f"{name}:pre_quant_scale:"
            s.pre_quant_scale = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            s.alpha = {k.rpartition(":")[2]: v.reshape(()) for k, v in tensors.items() if k.startswith(f"{name}:alpha:")}
            stats[name] = s
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
        _atomic_write(self.dir / "stats.safetensors", lambda p: save_file(cpu, str(p)))
        _atomic_write(self.dir / "stats.json", lambda p: p.write_text(json.dumps(meta)))

    def clear_partial(self) -> None:
        """Forget an interrupted run: its statistics and finished chunks."""
        for path in [self.dir / "stats.safetensors", self.dir / "stats.json", *self.dir.glob("chunk_*.json")]:
            path.unlink(missing_ok=True)

    def load_chunks(self) -> dict[int, tuple[int, dict[str, dict[str, float]]]]:
        """Finished chunks of the run whose statistics are saved: first step -> (end step, scores).

        A chunk is the sum of its steps' scores, named by the steps it covers, so a resumed run
        can reuse it whatever its own chunk size (the step layout is the statistics').
        """
        chunks = {}
        for path in self.dir.glob("chunk_*-*.json"):
            first, end = (int(part) for part in path.stem.removeprefix("chunk_").split("-"))
            chunks[first] = (end, json.loads(path.read_text()))
        return chunks

    def save_chunk(self, first: int, end: int, scores: dict[str, dict[str, float]]) -> None:
        _atomic_write(self.dir / f"chunk_{first:05d}-{end:05d}.json", lambda p: p.write_text(json.dumps(scores)))
