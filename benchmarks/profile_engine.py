"""Where autoq's scoring time and GPU memory go: one model, several engine settings.

For each setting (``ScoringOptions`` overrides) it prints wall time (and the floor of
``bench_search.py``), peak GPU memory overall and per stage (calibration with AWQ search / scoring), then a ``torch.profiler`` table of the
default setting, whose ``autoq.*`` rows are the engine's stages (calibrate, awq_search,
score_forward, score_head, score_backward).

    python benchmarks/profile_engine.py --size 1b --out reports/benchmarks
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import pandas as pd
import torch
from bench_search import DEVICE, TODAY, build, floor_seconds, fresh_peak, layer_choices, peak_gib, synced, tokens

VARIANTS = {
    "today": TODAY,  # before issue 17's speed-ups (see bench_search.VARIANTS)
    "default": {},
    "stream": {"stream_blocks": True},
    "store-1GiB": {"store_budget_gib": 1.0},
    "store-0.5GiB": {"store_budget_gib": 0.5},
    "step-4k": {"tokens_per_step": 4096},
    "step-16k": {"tokens_per_step": 16384},
    "stream-store-0.5GiB": {"stream_blocks": True, "store_budget_gib": 0.5},
}


def stage_peaks(engine) -> dict[str, float]:
    """Wrap the engine's two passes so each records its own peak memory."""
    peaks: dict[str, float] = {}

    def measured(name: str, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            torch.cuda.reset_peak_memory_stats()
            result = method(*args, **kwargs)
            peaks[name] = max(peaks.get(name, 0.0), peak_gib())
            return result

        return wrapper

    if DEVICE == "cuda":
        engine._calibrate = measured("calibrate_gib", engine._calibrate)
        engine._score_chunk = measured("score_gib", engine._score_chunk)
    return peaks


def run(size: str, batches, formats, overrides: dict) -> dict:
    from autoq.sensitivity import ScoringOptions, SensitivityEngine

    model = build(size)
    choices, _ = layer_choices(model, formats)
    if overrides.get("stream_blocks"):
        model.get_decoder().layers.to("cpu")
    fresh_peak()
    engine = SensitivityEngine(model, choices, ScoringOptions(progress=False, device=DEVICE, **overrides))
    peaks = stage_peaks(engine)
    start = synced()
    engine.run(batches)
    seconds = synced() - start
    return {"seconds": seconds, "peak_gib": max([peak_gib(), *peaks.values()]), **peaks}


def host_transfer_check(gib: float = 2.0) -> dict[str, float]:
    """Seconds per GiB to make CPU memory pinned (a pinned copy, or registering it in place) and
    to copy it to the GPU from pageable or pinned memory: the costs of streaming blocks."""
    size = int(gib * 2**30) // 2
    pageable = torch.randn(size, dtype=torch.float32).to(torch.bfloat16)
    result = {}
    start = synced()
    pinned = pageable.pin_memory()
    result["pin_copy_s_per_gib"] = (synced() - start) / gib
    start = synced()
    pageable.to(DEVICE)
    result["h2d_pageable_s_per_gib"] = (synced() - start) / gib
    start = synced()
    pinned.to(DEVICE, non_blocking=True)
    result["h2d_pinned_s_per_gib"] = (synced() - start) / gib
    other = torch.randn(size, dtype=torch.float32).to(torch.bfloat16)
    cudart = torch.cuda.cudart()
    start = synced()
    code = cudart.cudaHostRegister(other.data_ptr(), other.numel() * other.element_size(), 0)
    result["register_s_per_gib"] = (synced() - start) / gib
    result["register_ok"] = int(code) == 0 and other.is_pinned()
    start = synced()
    other.to(DEVICE, non_blocking=True)
    result["h2d_registered_s_per_gib"] = (synced() - start) / gib
    cudart.cudaHostUnregister(other.data_ptr())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b")
    parser.add_argument("--formats", default="NVFP4,FP8,W4A8")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="write profile_<size>.csv / .txt here")
    parser.add_argument("--host-transfers", action="store_true", help="also time pinning and host-to-GPU copies")
    args = parser.parse_args()
    if args.host_transfers and DEVICE == "cuda":
        print(host_transfer_check(), flush=True)
    formats = args.formats.split(",")
    calib = tokens(args.batches * 4, args.seq_len, 0, DEVICE)
    for stream in (False, True):  # warm-up: kernel compilation stays out of the numbers
        run("tiny", calib[:2], formats, {"stream_blocks": stream})

    model = build(args.size)
    floor = floor_seconds(model, calib, formats)
    del model
    rows = []
    for name in args.variants.split(","):
        rows.append({"size": args.size, "variant": name, "options": json.dumps(VARIANTS[name]),
                     **run(args.size, calib, formats, VARIANTS[name]), "floor_s": floor})  # fmt: skip
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        run(args.size, calib, formats, {})
    sort = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
    profile_table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    print(profile_table)
    pd.set_option("display.width", 250)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / f"profile_{args.size}.csv", index=False)
        (args.out / f"profile_{args.size}.txt").write_text(profile_table)


if __name__ == "__main__":
    main()
