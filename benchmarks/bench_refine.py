"""Cost of ``autoq refine``: seconds to build the switchable model, per trial and in total.

Appends one row to ``reports/benchmarks/bench_refine.csv`` per run. Two set-ups:

* an existing search run (CPU, e.g. SmolLM2-135M): refine runs in a scratch copy of the run
  directory, so the run's own study is untouched::

    python benchmarks/bench_refine.py --run runs/smollm2 --bits 4.5 --trials 10 --eval-samples 8

* a refine that already ran (``autoq refine RUN --bits 4.5``), its own timings summarized::

    python benchmarks/bench_refine.py --summarize runs/smollm2 --bits 4.5 --label "2 shared CPU cores"

* a random Llama with Llama-3.2-1B shapes (vocab 128256) on CUDA, searched first (H100: under
  3 minutes in all; ``--modelopt-eager`` skips compiling ModelOpt's CUDA extensions)::

    python benchmarks/bench_refine.py --random-1b --trials 30 --modelopt-eager

Trial time is wall time per measured trial (switch the layers' formats, one forward pass per
held-out batch, KL to the cached BF16 log-probs), with ``torch.cuda.synchronize`` implied by
``.item()``; trials that repeat a measured plan or are pruned are left out of the mean.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

OUT = Path("reports/benchmarks/bench_refine.csv")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)  # fmt: skip


def write_random_1b(path: Path, device: str) -> Path:
    """Random-init Llama-3.2-1B-shaped model (bf16, tied embeddings) with autoq's synthetic tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from autoq.default_model import SYNTHETIC_MARKER, train_tokenizer

    if (path / SYNTHETIC_MARKER).is_file():
        return path
    tokenizer = train_tokenizer()
    config = LlamaConfig(**LLAMA_1B, architectures=["LlamaForCausalLM"], bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.2B weights on the GPU takes seconds, not minutes
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / SYNTHETIC_MARKER).write_text(json.dumps({"architecture": "llama", "seed": 0, **LLAMA_1B}))
    return path


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="an `autoq search` directory")
    source.add_argument("--random-1b", action="store_true", help="random Llama-3.2-1B shapes, searched here first")
    source.add_argument("--summarize", type=Path, help="a run directory where `autoq refine --bits BITS` ran: no new work")
    parser.add_argument("--bits", type=float, default=4.5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512, help="for --random-1b")
    parser.add_argument("--calib-samples", type=int, default=16, help="for --random-1b")
    parser.add_argument("--device", default=None)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-refine"), help="scratch directory")
    parser.add_argument("--label", default="", help="free text for the CSV row (machine, notes)")
    parser.add_argument("--modelopt-eager", action="store_true", help="ModelOpt's PyTorch fallbacks instead of its CUDA extensions")
    args = parser.parse_args()
    if args.modelopt_eager:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext.extension = None
        extensions.get_cuda_ext_fp8.extension = None
    from autoq.cli import main as autoq
    from autoq.refine import refine
    from autoq.workspace import ModelSettings

    if args.summarize is not None:
        out = args.summarize / f"refine-{args.bits:g}bits-kl"
        summary = json.loads((out / "summary.json").read_text())
        record(benchmark_row(summary, pd.read_csv(out / "trials.csv"), args, summary["device"], None, None))
        return
    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))
    search_seconds = None
    if args.random_1b:
        model = write_random_1b(args.work / "random-llama-1b", device)
        search_start = time.perf_counter()
        code = autoq(["search", "--model", str(model), "--bits", f"{args.bits:g}", "--out", str(scratch / "run"), "--device", device,
                      "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), "--no-progress"])  # fmt: skip
        if code != 0:
            raise SystemExit(code)
        search_seconds = time.perf_counter() - search_start
    else:
        shutil.copytree(args.run, scratch / "run", ignore=shutil.ignore_patterns("refine.db", "refine-*", "plan-refined-*"))
    settings = ModelSettings(eval_samples=args.eval_samples, device=device, progress=False)
    result = refine(scratch / "run", args.bits, trials=args.trials, groups=args.groups, settings=settings, restart=True)
    row = benchmark_row(result.summary, result.trials, args, device, search_seconds, time.perf_counter() - start)
    shutil.rmtree(scratch, ignore_errors=True)
    record(row)


def benchmark_row(s: dict, trials: pd.DataFrame, args: argparse.Namespace, device: str, search_s: float | None, total_s: float | None) -> dict:
    measured = trials[(trials.state == "COMPLETE") & trials.duplicate_of.isna()]
    cpu = measured.cpu_seconds.mean() if "cpu_seconds" in measured else None
    return {
        "label": args.label, "device": device_name(device), "model": s["model"]["id"], "synthetic": s["model"].get("synthetic"),
        "params": s["model"]["total_params"], "budget_bits": s["budget_bits"], "groups": len(s["searched_groups"]),
        "trials": len(trials), "measured_trials": len(measured),
        "heldout_tokens": s["search_slice"]["samples"] * s["search_slice"]["seq_len"], "search_s": search_s,
        "build_s": s["seconds"]["build"], "trial_mean_s": measured.seconds.mean(), "trial_median_s": measured.seconds.median(),
        "trial_max_s": measured.seconds.max(), "trial_mean_cpu_s": cpu, "trials_total_s": s["seconds"]["trials_this_run"],
        "total_s": total_s, "kl_trial0": s["trial0"]["kl"], "kl_best": s["best"]["kl"],
        "kl_unseen_ilp": s["unseen"]["ilp"]["kl"], "kl_unseen_refined": s["unseen"]["refined"]["kl"],
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "torch": torch.__version__,
    }  # fmt: skip


def record(row: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([pd.read_csv(OUT), pd.DataFrame([row])]) if OUT.is_file() else pd.DataFrame([row])
    table.to_csv(OUT, index=False)
    print(pd.DataFrame([row]).T.to_string(header=False))


if __name__ == "__main__":
    main()
