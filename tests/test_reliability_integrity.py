"""Content hashes: a damaged score-cache file is found, reported in one line, removed and recomputed
to the same scores; a byte flipped in an exported checkpoint's scale tensor is found by ``autoq
verify``, which names the layer."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pandas as pd
import pytest

from autoq.cli import main

SPACE = "name: fp8\nformats: [FP8, BF16]\n"
ARGS = ["--bits", "10", "--calib-samples", "16", "--seq-len", "32", "--batch-size", "1", "--no-progress",
        "--chunk-steps", "4", "--tokens-per-step", "32"]  # fmt: skip  (4 chunks of 4 steps)


@pytest.fixture(scope="module")
def scored(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, pd.DataFrame]:
    """A finished search: its space, its score-cache entry (table, statistics, chunks) and scores."""
    root = tmp_path_factory.mktemp("scored")
    space = root / "fp8.yaml"
    space.write_text(SPACE)
    assert main(["search", "--model", str(tiny_llama), "--space", str(space), "--out", str(root / "run"),
                 "--cache-dir", str(root / "cache"), *ARGS]) == 0  # fmt: skip
    (entry,) = (p for p in (root / "cache" / "scores").iterdir() if p.is_dir())
    return space, entry, pd.read_parquet(root / "run" / "scores.parquet")


def _flip(path: Path, offset: int | None = None, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


# (file damaged, how, what the run must say). "table gone": only the statistics and chunks are
# left, as after a killed run, so the damaged partial files are the ones read.
DAMAGE = {
    "table flipped": ("scores.parquet", "flip", "scores.parquet is damaged: its bytes do not match its sha256 checksum"),
    "table truncated": ("scores.parquet", "truncate", "scores.parquet is damaged: its bytes do not match its sha256 checksum"),
    "table checksum missing": ("scores.parquet.sha256", "delete", "scores.parquet is damaged: it has no checksum"),
    "chunk flipped": ("chunk_00004-00008.json", "flip", "chunk_00004-00008.json is damaged"),
    "statistics truncated": ("stats.safetensors", "truncate", "stats.safetensors is damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_cache_file_is_reported_removed_and_recomputed(
    case: str, scored, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space, entry, reference = scored
    cache = tmp_path / "cache"
    shutil.copytree(entry, cache / "scores" / entry.name)
    copy = cache / "scores" / entry.name
    name, how, message = DAMAGE[case]
    if not name.startswith("scores.parquet"):  # as after a killed run: no table, the partial files are read
        for table_file in ("scores.parquet", "scores.parquet.sha256"):
            (copy / table_file).unlink()
    target = copy / name
    if how == "flip":
        _flip(target)
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    capsys.readouterr()
    assert main(["search", "--model", str(tiny_llama), "--space", str(space), "--out", str(tmp_path / "run"), "--cache-dir", str(cache),
                 *ARGS]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert message in err and "removed" in err and "recomputing" in err, err
    if name.startswith("chunk"):  # the other three chunks are reused
        assert "resuming from the score cache: 12 of 16 steps already scored" in err, err
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "scores.parquet"), reference, check_exact=True)
    # The recomputed entry is whole again: the next run reads it without a word of damage.
    capsys.readouterr()
    assert main(["search", "--model", str(tiny_llama), "--space", str(space), "--out", str(tmp_path / "again"), "--cache-dir", str(cache),
                 *ARGS]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "scores from cache" in err and "is damaged" not in err, err


def _tensor_offset(path: Path, name: str) -> tuple[int, str]:
    """Where tensor ``name``'s bytes start in a safetensors file, and its dtype."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    info = json.loads(data[8 : 8 + size])[name]
    return 8 + size + info["data_offsets"][0], info["dtype"]


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exported")
    plan = root / "plan.json"
    layers = {f"model.layers.{i}.{p}": {"format": "FP8"} for i in (0, 1) for p in ("self_attn.o_proj", "mlp.down_proj")}
    plan.write_text(json.dumps({"schema": "autoq.plan", "version": 1, "layers": layers}))
    assert main(["apply", str(plan), "--model", str(tiny_llama), "--export", str(root / "export"), "--calib-samples", "8", "--seq-len", "32",
                 "--no-progress"]) == 0  # fmt: skip
    return root / "export"


def test_verify_names_the_layer_of_a_flipped_scale_byte(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The lowest mantissa bit of one scale value: the scale stays finite and positive (no range
    check could see it), yet verify fails and names that layer and tensor, and no other."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(exported, checkpoint)
    tensor = "model.layers.1.self_attn.o_proj.weight_scale"
    offset, dtype = _tensor_offset(checkpoint / "model.safetensors", tensor)
    assert dtype in ("F32", "BF16", "F16")
    _flip(checkpoint / "model.safetensors", offset)  # little-endian: byte 0 holds the lowest mantissa bits
    capsys.readouterr()
    assert main(["verify", str(exported)]) == 0
    assert "not checked against hashes" not in capsys.readouterr().out
    assert main(["verify", str(checkpoint)]) == 1
    problems = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autoq: verify: model.")]
    assert len(problems) == 1 and problems[0].startswith(f"autoq: verify: model.layers.1.self_attn.o_proj: tensor {tensor} in model.safetensors"), problems


def test_verify_names_a_changed_config_and_says_when_there_is_no_manifest(exported: Path, tmp_path: Path, capsys) -> None:
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(exported, checkpoint)
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text().replace("\n", " \n", 1))
    capsys.readouterr()
    assert main(["verify", str(checkpoint)]) == 1
    assert "autoq: verify: config.json: contents differ from the export" in capsys.readouterr().err
    (checkpoint / "autoq_manifest.json").unlink()
    assert main(["verify", str(checkpoint)]) == 0
    assert "no autoq_manifest.json (not exported by autoq): file contents not checked against hashes" in capsys.readouterr().out
