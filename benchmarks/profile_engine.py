"""Where autoq's scoring time and GPU memory go: one model, several engine settings.

For each setting (``ScoringOptions`` overrides) it prints wall time (and the floor of
``bench_search.py``), peak GPU memory overall and per stage (calibration with AWQ search / scoring), then a ``torch.profiler`` table of the
default setting, whose ``autoq.*`` rows are the engine's stages (calibrate, awq_search,
score_forward, score_head, score_backward).

    python benchmarks/profile_engine.py --size 1b --out reports/benchmarks
    python benchmarks/profile_engine.py --kernels --variants '' --no-profile --out reports/benchmarks   # quantizers before/after
"""

from __future__ import annotations

import argparse
import functools
import json
import os
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


def _nvfp4_before(x: torch.Tensor, global_amax: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """NVFP4 as the engine computed it before the CPU speed work (float8 casts for the scales, a
    7-level ``torch.where`` for E2M1, sign restored after): the "before" of ``kernel_check``."""
    blocks = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    global_scale = global_amax.float() / (6.0 * 448.0)
    global_scale = torch.where(global_scale > 0, global_scale, torch.full_like(global_scale, 1e-12))
    in_fp8_range = (blocks.abs().amax(dim=-1, keepdim=True) / (6.0 * global_scale)).clamp(max=448.0)
    scales = in_fp8_range.to(torch.float8_e4m3fn).to(torch.float32) * global_scale
    scales = torch.where(scales >= 1e-5, scales, torch.ones_like(scales))
    m = blocks.abs() / scales
    e2m1 = torch.where(m <= 0.25, 0.0, torch.where(m < 0.75, 0.5, torch.where(m <= 1.25, 1.0, torch.where(m < 1.75, 1.5,
           torch.where(m <= 2.5, 2.0, torch.where(m < 3.5, 3.0, torch.where(m <= 5.0, 4.0, 6.0)))))))  # fmt: skip
    magnitude = e2m1 * scales
    return torch.where(blocks >= 0, magnitude, -magnitude).reshape(x.shape).to(x.dtype)


def _fp8_before(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 through a float8 cast, as before (the "before" of ``kernel_check``)."""
    amax = amax.float()
    scale = 448.0 / torch.where(amax <= 1.0 / (1 << 24), torch.ones_like(amax), amax)
    scaled = (x.to(torch.float32) * scale).clamp(-448.0, 448.0)
    return (scaled.to(torch.float8_e4m3fn).to(torch.float32) * (1.0 / scale)).to(x.dtype)


def kernel_check(tokens: int = 16384, features: int = 4096, iterations: int = 20) -> list[dict]:
    """Before/after of the activation quantizers on one ``[tokens, features]`` bf16 input: seconds
    per call (compiled on CUDA, as the engine runs them; eager on a CPU) and bit-equality."""
    from autoq import fakequant

    x = (torch.randn(tokens, features, device=DEVICE) * torch.rand(features, device=DEVICE) * 4).to(torch.bfloat16)
    amax = x.float().abs().amax()
    compile_ = torch.compile if DEVICE == "cuda" else (lambda fn: fn)
    pairs = {"NVFP4": (compile_(_nvfp4_before), fakequant.nvfp4), "FP8": (compile_(_fp8_before), fakequant.fp8_e4m3)}
    rows = []
    for name, (before, after) in pairs.items():
        timings = {}
        for label, fn in (("before", before), ("after", after)):
            fn(x, amax)  # compile / warm up
            start = synced()
            for _ in range(iterations):
                out = fn(x, amax)
            timings[label] = (synced() - start) / iterations
            timings[f"{label}_out"] = out
        rows.append({"kernel": name, "shape": f"{tokens}x{features}", "device": DEVICE, "before_s": timings["before"],
                     "after_s": timings["after"], "speedup": timings["before"] / timings["after"],
                     "bit_identical": torch.equal(timings["before_out"], timings["after_out"])})  # fmt: skip
    return rows


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
    parser.add_argument("--kernels", action="store_true", help="also time the activation quantizers before/after (kernels_<device>.csv)")
    parser.add_argument("--kernel-shape", default="16384x4096", help="TOKENSxFEATURES of the --kernels input")
    parser.add_argument("--kernel-iterations", type=int, default=20)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler table")
    args = parser.parse_args()
    if args.kernels:
        tokens_, features = (int(v) for v in args.kernel_shape.split("x"))
        load = os.getloadavg()[0]  # a shared CPU's timings grow with the load
        kernels = pd.DataFrame(kernel_check(tokens_, features, args.kernel_iterations)).assign(load_avg_1min=load)
        print(kernels.to_string(index=False), flush=True)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            kernels.to_csv(args.out / f"kernels_{DEVICE}.csv", index=False)
    if args.host_transfers and DEVICE == "cuda":
        print(host_transfer_check(), flush=True)
    variants = [v for v in args.variants.split(",") if v]
    if not variants and args.no_profile:
        return
    formats = args.formats.split(",")
    calib = tokens(args.batches * 4, args.seq_len, 0, DEVICE)
    for stream in (False, True):  # warm-up: kernel compilation stays out of the numbers
        run("tiny", calib[:2], formats, {"stream_blocks": stream})

    rows = []
    if variants:
        model = build(args.size)
        floor = floor_seconds(model, calib, formats)
        del model
        for name in variants:
            rows.append({"size": args.size, "variant": name, "options": json.dumps(VARIANTS[name]),
                         **run(args.size, calib, formats, VARIANTS[name]), "floor_s": floor})  # fmt: skip
            print(rows[-1], flush=True)
    profile_table = None
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
        with profile(activities=activities) as prof:
            run(args.size, calib, formats, {})
        sort = "device_time_total" if DEVICE == "cuda" else "cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
        print(profile_table)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 250)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if rows:
            table.to_csv(args.out / f"profile_{args.size}.csv", index=False)
        if profile_table:
            (args.out / f"profile_{args.size}.txt").write_text(profile_table)


if __name__ == "__main__":
    main()
