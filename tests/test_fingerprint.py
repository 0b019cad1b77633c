"""Model fingerprints hash whole files (score-cache keys), and remember them while files are unchanged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from autoq.model import directory_fingerprint


def _model_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    # 8 MiB of weights: far more than the 16 x 64 KiB the old fingerprint sampled.
    save_file({"w": torch.arange(4 << 20, dtype=torch.int32).to(torch.bfloat16)}, path / "model.safetensors")
    return path


def _flip_byte(file: Path, offset: int, keep_mtime: bool) -> None:
    stat = file.stat()
    with file.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_change_anywhere_changes_the_fingerprint(tmp_path: Path) -> None:
    base = _model_dir(tmp_path / "base")
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    assert directory_fingerprint(base) == directory_fingerprint(tuned)
    size = (tuned / "model.safetensors").stat().st_size
    _flip_byte(tuned / "model.safetensors", size // 2 + 12345, keep_mtime=False)  # between the old samples
    assert directory_fingerprint(base) != directory_fingerprint(tuned)


def test_unchanged_files_are_not_read_again(tmp_path: Path, isolated_cache: Path) -> None:
    model = _model_dir(tmp_path / "model")
    first = directory_fingerprint(model)
    assert len(list((isolated_cache / "file-sha256").iterdir())) == 1
    # Same path, size, mtime and inode: the remembered hash is used, the bytes are not read.
    _flip_byte(model / "model.safetensors", 1000, keep_mtime=True)
    assert directory_fingerprint(model) == first
    # A new modification time: read and hashed again.
    os.utime(model / "model.safetensors")
    assert directory_fingerprint(model) != first
