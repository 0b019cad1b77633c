"""What the whole-file model fingerprint costs: first hash (disk cold, page cache warm) and re-hash.

Writes a random bf16 checkpoint of about 1B parameters (two safetensors shards, Llama-3.2-1B's
size) to a temporary directory, fingerprints it with ``autoq.model.directory_fingerprint`` as the
score cache does, and deletes it. "cold" evicts the files' pages first (fsync +
``posix_fadvise(DONTNEED)``), so the bytes come from the disk; "warm" reads them from the page
cache; "cached" is every later run on unchanged files (the remembered hash, nothing read).

    python benchmarks/bench_fingerprint.py --params 1.0e9 --out reports/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CHUNK = 64 << 20


def write_random_checkpoint(path: Path, params: int, shards: int = 2) -> int:
    """Random bf16 tensors of 4096 x 4096 in ``shards`` safetensors files; returns the bytes written."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "note": "random bytes for a fingerprint benchmark"}))
    rng = np.random.default_rng(0)
    per_tensor = 4096 * 4096
    tensors = max(1, round(params / per_tensor))
    total = 0
    for shard in range(shards):
        names = range(shard * tensors // shards, (shard + 1) * tensors // shards)
        header = {f"w{i}": {"dtype": "BF16", "shape": [4096, 4096], "data_offsets": [k * per_tensor * 2, (k + 1) * per_tensor * 2]}
                  for k, i in enumerate(names)}  # fmt: skip
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        data_bytes = len(header) * per_tensor * 2
        with (path / f"model-{shard + 1:05d}-of-{shards:05d}.safetensors").open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for start in range(0, data_bytes, CHUNK):
                handle.write(rng.bytes(min(CHUNK, data_bytes - start)))
            handle.flush()
            os.fsync(handle.fileno())
        total += data_bytes
    return total


def evict(path: Path) -> None:
    for file in path.glob("*.safetensors"):
        with file.open("rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1.0e9)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="autoq-fingerprint-"))
    os.environ["AUTOQ_CACHE"] = str(work / "cache")
    from autoq.model import directory_fingerprint

    model = work / "model"
    try:
        written = write_random_checkpoint(model, int(args.params))
        rows = []
        for repeat in range(args.repeats):
            for case in ("cold", "warm", "cached"):
                if case != "cached":
                    shutil.rmtree(work / "cache", ignore_errors=True)
                if case == "cold":
                    evict(model)
                start = time.perf_counter()
                fingerprint = directory_fingerprint(model)
                seconds = time.perf_counter() - start
                rows.append({"case": case, "repeat": repeat, "seconds": round(seconds, 4), "bytes": written,
                             "gb_per_s": round(written / seconds / 1e9, 3), "params": written // 2, "fingerprint": fingerprint})  # fmt: skip
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = pd.DataFrame(rows)
    table["machine"] = f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    table["model"] = "random bf16 bytes, 2 safetensors shards (no real weights needed to time hashing)"
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "fingerprint.csv", index=False)
    print(table.groupby("case").seconds.min().to_string())


if __name__ == "__main__":
    main()
