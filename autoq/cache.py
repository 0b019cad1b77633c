"""On-disk score cache: finished score tables and the partial state of interrupted runs.

An entry is keyed by everything the scores depend on (model and data fingerprints, formats and
their numerics, layers, objective, batching), so a re-run with another bits budget, or after a
crash, finds the work already done. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

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

    def load_stats(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        tensors, meta = self.dir / "stats.safetensors", self.dir / "stats.json"
        if not (tensors.is_file() and meta.is_file()):
            return None
        return load_file(tensors), json.loads(meta.read_text())

    def save_stats(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        _atomic_write(self.dir / "stats.safetensors", lambda p: save_file(cpu, str(p)))
        _atomic_write(self.dir / "stats.json", lambda p: p.write_text(json.dumps(meta)))

    def load_chunk(self, index: int) -> dict[str, dict[str, float]] | None:
        path = self.dir / f"chunk_{index:05d}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_chunk(self, index: int, scores: dict[str, dict[str, float]]) -> None:
        _atomic_write(self.dir / f"chunk_{index:05d}.json", lambda p: p.write_text(json.dumps(scores)))
