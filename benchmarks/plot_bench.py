"""Plot time and peak GPU memory vs model size from ``bench_search_runs.csv``.

    python benchmarks/plot_bench.py reports/benchmarks/bench_search_runs.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

LABELS = {"modelopt": "ModelOpt auto_quantize", "autoq": "autoq (in memory)", "autoq-stream": "autoq (blocks streamed)"}


def main(path: Path) -> Path:
    runs = pd.read_csv(path)
    best = runs.groupby(["tool", "params"], as_index=False).agg(total_s=("total_s", "min"), peak_gib=("peak_gib", "max"), floor_s=("floor_s", "first"))
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tool, part in best.groupby("tool"):
        part = part.sort_values("params")
        time_ax.plot(part.params / 1e9, part.total_s, marker="o", label=LABELS.get(tool, tool))
        mem_ax.plot(part.params / 1e9, part.peak_gib, marker="o", label=LABELS.get(tool, tool))
    floor = best.drop_duplicates("params").sort_values("params")
    time_ax.plot(floor.params / 1e9, floor.floor_s, linestyle="--", color="gray", label="floor (fwd+bwd + per-format re-forwards)")
    time_ax.set(xlabel="parameters (billions)", ylabel="search wall time (s)", title="time: scoring + solving", yscale="log")
    mem_ax.set(xlabel="parameters (billions)", ylabel="peak GPU memory (GiB)", title="peak torch.cuda.max_memory_allocated")
    for ax in (time_ax, mem_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("autoq vs ModelOpt auto_quantize on one H100 (random Llama, bf16; NVFP4 + FP8 + W4A8; 16 x 4 x 512 tokens)", fontsize=9)
    fig.tight_layout()
    out = path.with_name("bench_search.png")
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "reports/benchmarks/bench_search_runs.csv")))
