"""Safetensors shards written tensor by tensor: a checkpoint larger than memory, never held whole.

Every output tensor's name, dtype and shape is known before any data exists (``TensorSpec``), so
the shards are laid out first: tensors assigned to files in order until one reaches
``max_shard_bytes``, each file's header written and its size reserved. Tensors (or row ranges of
them) are then written straight to their byte offsets, in any order. ``finish`` checks that
every tensor was written whole and writes ``model.safetensors.index.json`` when there are several
shards (one shard is ``model.safetensors``, as transformers names it).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from autoq.diskmodel import SAFETENSORS_DTYPES

TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


@dataclass
class _Placed:
    spec: TensorSpec
    file: str
    offset: int  # absolute byte offset of the tensor's data in its file
    written: int = 0  # bytes written so far


class ShardWriter:
    """Writes the tensors ``specs`` (in this order) into safetensors files in ``directory``."""

    def __init__(self, directory: Path, specs: list[TensorSpec], max_shard_bytes: int):
        self.directory = Path(directory)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        count = len(shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.placed: dict[str, _Placed] = {}
        self._files: dict[str, int] = {}
        for name, members in zip(names, shards):
            self._lay_out(name, members)

    def _lay_out(self, file: str, specs: list[TensorSpec]) -> None:
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        start = 0
        for spec in specs:
            header[spec.name] = {"dtype": TORCH_TO_SAFETENSORS[spec.dtype], "shape": list(spec.shape), "data_offsets": [start, start + spec.nbytes]}
            start += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data 8-byte aligned, as safetensors writes it
        data_start = 8 + len(encoded)
        fd = os.open(self.directory / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._files[file] = fd
        _write_all(fd, struct.pack("<Q", len(encoded)) + encoded, 0)
        os.ftruncate(fd, data_start + start)
        for spec in specs:
            self.placed[spec.name] = _Placed(spec, file, data_start + int(header[spec.name]["data_offsets"][0]))

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """``tensor`` as ``name``'s rows from ``row`` on (all of it by default)."""
        placed = self.placed[name]
        spec = placed.spec
        if tensor.dtype != spec.dtype or tuple(tensor.shape[1:]) != spec.shape[1:] or (not spec.shape and tensor.dim()):
            raise ValueError(f"{name}: got {tensor.dtype}{list(tensor.shape)}, laid out as {spec.dtype}{list(spec.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        _write_all(self._files[placed.file], memoryview(data), placed.offset + row * spec.row_bytes)
        placed.written += data.nbytes

    def finish(self) -> dict[str, str]:
        """Close the files, check every tensor was written whole, write the index if sharded;
        returns the weight map (tensor name -> file)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        short = [p.spec.name for p in self.placed.values() if p.written != p.spec.nbytes]
        if short:
            raise RuntimeError(f"export wrote {len(short)} tensor(s) incompletely, first {short[0]}")
        weight_map = {name: placed.file for name, placed in self.placed.items()}
        if len(set(weight_map.values())) > 1:
            total = sum(p.spec.nbytes for p in self.placed.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
