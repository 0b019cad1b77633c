"""autoq vs ModelOpt ``mtq.auto_quantize`` on one GPU, in one process: time, memory, plan quality.

For each random-init Llama size (bf16), both tools get the same calibration batches (count,
batch size, sequence length) and the same formats. Measured per tool: scoring wall time, solve
time, total, peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each run; the
resident model counts for both); the floor (one plain forward+backward over the batches, plus
one extra matmul per format per linear layer: the per-format re-forwards); and plan quality at
each budget (mean token KL to BF16 and perplexity on held-out batches) with ModelOpt's plan
taken at the same *honest* bits as autoq's. Both tools are warmed up first (ModelOpt JIT-compiles
its CUDA extensions) and timed ``--repeats`` times.

autoq runs as each of ``--variants`` (``VARIANTS``: ``ScoringOptions`` overrides; ``today`` turns
every engine speed-up of issue 17 off, ``default`` is the engine as shipped), in memory and, for
``--stream-variants``, with blocks streamed. Each variant's scores are compared with ``today``'s
(relative differences, and whether the plans agree) in ``bench_search_variants.csv``. One model
is built per size and reused by every run (ModelOpt, which modifies it, runs last).
``--profile-sizes`` writes a ``torch.profiler`` stage table of the default variant
(``stages_<size>.csv``: the engine's ``autoq.*`` ranges, per-format hooks included).

    python benchmarks/bench_search.py --sizes 0.5b,1b,3b --repeats 2 --out reports/benchmarks
    python benchmarks/bench_search.py --sizes 8b --repeats 1 --no-quality --profile-sizes 8b --out reports/benchmarks/issue17-8b
    python benchmarks/bench_search.py --sizes tiny --repeats 1 --profile-sizes tiny --out /tmp/bench   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from autoq.devices import default_device

warnings.filterwarnings("ignore")

# Llama-3.2 / Qwen2.5-like shapes (tied embeddings), every in_features a multiple of 128.
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, vocab_size=128256),
    # Llama-3.1-8B shapes (tied here like the others: 7.5B parameters)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip

# autoq engine variants (``ScoringOptions`` overrides). ``today``: the engine before issue 17's
# speed-ups (fixed 2 GiB block-input store and 8k-token steps, AWQ grid one alpha at a time, one
# Fisher reduction per format); every other variant turns one of them off.
TODAY = {"store_budget_gib": 2.0, "tokens_per_step": 8192, "awq_batch_elements": 0, "fuse_formats": False}
VARIANTS = {
    "today": TODAY,
    "default": {},
    "store-2GiB": {"store_budget_gib": 2.0},
    "step-8k": {"tokens_per_step": 8192},
    "awq-per-alpha": {"awq_batch_elements": 0},
    "fisher-per-format": {"fuse_formats": False},
}


def build(size: str, seed: int = 0):
    """A random-init Llama of one of ``SIZES`` (bf16), or the HF model in directory ``size``."""
    if Path(size).is_dir():
        from autoq.model import ModelSource, load_model

        return load_model(ModelSource(Path(size), size), device=DEVICE)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval().requires_grad_(False)


DEVICE = default_device()  # CPU: a smoke test of this script only
STARTED = time.perf_counter()


def say(message: str) -> None:
    """Progress on stdout, with the seconds since the script started (to budget a time-limited call)."""
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", flush=True)


def synced() -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def fresh_peak() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def layer_choices(model, formats: list[str]):
    from autoq.decoder import DecoderStructure
    from autoq.search_space import parse_search_space, select_layers

    space = parse_search_space(f"formats: [{', '.join(formats)}, BF16]", "bench")
    return select_layers(model, space, DecoderStructure(model).lm_head_name), space


def run_autoq(model, batches, formats, budgets, stream: bool, overrides: dict | None = None) -> dict:
    """One autoq search on ``model`` (reused: in memory it is moved to the GPU first, streamed its
    blocks start in CPU memory, as if loaded there; neither move is timed)."""
    from autoq.sensitivity import ScoringOptions, SensitivityEngine
    from autoq.solver import Options, assign_groups, solve

    choices, space = layer_choices(model, formats)
    model.to(DEVICE)
    if stream:
        model.get_decoder().layers.to("cpu")
    fresh_peak()
    start = synced()
    options = ScoringOptions(progress=False, stream_blocks=stream, device=DEVICE, **(overrides or {}))
    table = SensitivityEngine(model, choices, options).run(batches)
    scored = synced()
    grouped = assign_groups(table, space)
    options = Options.from_table(grouped)
    choices_by_budget = {b: solve(options, b).choice for b in budgets}
    solved = synced()
    layers = grouped.drop_duplicates("layer")
    plans = {b: dict(zip(layers.layer, layers.group.map(choice))) for b, choice in choices_by_budget.items()}
    return {"score_s": scored - start, "solve_s": solved - scored, "peak_gib": peak_gib(), "plans": plans, "choices": choices,
            "table": table}  # fmt: skip


def score_differences(table, reference) -> dict[str, float]:
    """Relative differences of ``table``'s scores from ``reference``'s (same layers and formats)."""
    key = ["layer", "format"]
    a, b = reference.set_index(key).score, table.set_index(key).score.reindex(reference.set_index(key).index)
    quantized = a != 0
    rel = ((b - a).abs() / a.abs())[quantized]
    return {"max_rel_diff": float(rel.max()), "median_rel_diff": float(rel.median()), "identical_share": float((a == b).mean())}


def run_modelopt(model, batches, formats, budgets, choices) -> dict:
    from autoq.interop.modelopt import formats_at_honest_bits, run_auto_quantize

    if DEVICE != "cuda":  # ModelOpt's NVFP4 kernels need CUDA: the CPU smoke test runs the other formats
        formats = [f for f in formats if f != "NVFP4"]
    model.to(DEVICE)
    fresh_peak()
    start = synced()
    state, _ = run_auto_quantize(model, [c.name for c in choices], formats, batches, 16.0)
    scored = synced()
    shapes = {c.name: (c.out_features, c.in_features) for c in choices}
    plans = {b: formats_at_honest_bits(state, shapes, b)[0] for b in budgets}
    solved = synced()
    return {"score_s": scored - start, "solve_s": solved - scored, "peak_gib": peak_gib(), "plans": plans}


def floor_seconds(model, batches, formats) -> float:
    """The floor: one plain forward+backward (activation gradients) over the batches, plus each
    linear layer's re-forward in every format (quantize its input, matmul with the quantized
    weight, which is prepared once outside the timing)."""
    from torch import nn

    from autoq.formats import FORMATS

    emb = model.get_input_embeddings()
    start = synced()
    for ids in batches:
        x = emb(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids, use_cache=False).loss.backward()
    fwd_bwd = synced() - start
    fmts = [FORMATS[f] for f in formats if FORMATS[f].quantized]
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        qweights = {m: [f.quantize_weight(m.weight) for f in fmts] for m in linears}

    def re_forward(module: nn.Linear, args: tuple, _output) -> None:
        x = args[0]
        amax = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        for fmt, qweight in zip(fmts, qweights[module]):
            F.linear(fmt.quantize_input(x, amax), qweight)

    def forward(with_formats: bool) -> float:
        handles = [m.register_forward_hook(re_forward) for m in linears] if with_formats else []
        begin = synced()
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids, use_cache=False)
        elapsed = synced() - begin
        for h in handles:
            h.remove()
        return elapsed

    forward(True)  # warm-up (kernel compilation)
    plain = forward(False)
    return fwd_bwd + max(0.0, forward(True) - plain)


def quality(size, formats_by_plan: dict[str, dict[str, str]], calib, heldout) -> dict[str, dict]:
    from autoq.apply import apply_plan
    from autoq.evaluate import mean_kl, perplexity

    reference = build(size)
    results, measured = {}, {}  # measured: each distinct plan is applied once
    for label, formats in formats_by_plan.items():
        key = tuple(sorted(formats.items()))
        if key not in measured:
            model = apply_plan(build(size), formats, calib, progress=False)
            measured[key] = {"kl": mean_kl(reference, model, heldout), "ppl": perplexity(model, heldout)}
            del model
            fresh_peak()
        results[label] = measured[key]
    results["bf16"] = {"kl": 0.0, "ppl": perplexity(reference, heldout)}
    return results


def stream_check(fit: str, big: str, formats: list[str], calib: list[torch.Tensor], cap_fraction: float = 0.75) -> dict:
    """Streamed scores equal in-memory ones on ``fit``; ``big`` scores under a GPU memory cap
    smaller than its bf16 weights (``torch.cuda.set_per_process_memory_fraction``)."""
    from autoq.sensitivity import ScoringOptions, SensitivityEngine

    model = build(fit)
    choices, _ = layer_choices(model, formats)
    in_memory = SensitivityEngine(model, choices, ScoringOptions(progress=False, device=DEVICE)).run(calib)
    streamed = SensitivityEngine(model, choices, ScoringOptions(progress=False, device=DEVICE, stream_blocks=True)).run(calib)
    key = ["layer", "format"]
    a, b = in_memory.set_index(key).score, streamed.set_index(key).score
    rel = ((a - b).abs() / a.abs().clip(lower=1e-30)).max()
    del model
    fresh_peak()
    result = {"fit_model": fit, "streamed_vs_in_memory_max_rel_diff": float(rel)}
    if DEVICE != "cuda":
        return result
    model = build(big)
    weight_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    model.to("cpu")
    choices, _ = layer_choices(model, formats)
    fresh_peak()
    cap_gib = cap_fraction * weight_gib
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(cap_gib / total_gib)
    try:
        start = synced()
        # One batch per step and a small store: the GPU holds embeddings, one block and one step.
        options = ScoringOptions(progress=False, device=DEVICE, stream_blocks=True, tokens_per_step=1, store_budget_gib=0.25)
        SensitivityEngine(model, choices, options).run(calib[:2])
        seconds = synced() - start
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result | {"big_model": big, "big_weights_gib": weight_gib, "cap_gib": cap_gib, "big_peak_gib": peak_gib(), "big_seconds": seconds}


def tokens(samples: int, seq_len: int, skip: int, device: str, model_dir: str | None = None):
    """Batches of 4 rows from the bundled corpus, tokenized by the model's own tokenizer
    (a real model) or by autoq's default one (random models)."""
    from autoq.data import load_tokens
    from autoq.default_model import train_tokenizer
    from autoq.model import ModelSource, load_tokenizer

    tokenizer = load_tokenizer(ModelSource(Path(model_dir), model_dir)) if model_dir else train_tokenizer()
    data = load_tokens("default", tokenizer, samples, seq_len, skip_samples=skip)
    return [t.to(device) for t in data.tokens.split(4)]


def stage_table(model, batches, formats, budgets, overrides: dict) -> tuple:
    """A ``torch.profiler`` run of one in-memory autoq search: its ``autoq.*`` ranges (the engine's
    stages and per-format score hooks) and the full table of its top operations."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        run_autoq(model, batches, formats, budgets, False, overrides)
    averages = prof.key_averages()
    stages = pd.DataFrame([
        {"range": e.key, "calls": e.count, "cpu_total_s": e.cpu_time_total / 1e6, "device_total_s": e.device_time_total / 1e6}
        for e in averages if e.key.startswith("autoq.")
    ]).sort_values("range")  # fmt: skip
    sort = "device_time_total" if DEVICE == "cuda" else "cpu_time_total"
    return stages, averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5b,1b,3b", help=f"comma-separated: {', '.join(SIZES)} or HF model directories")
    parser.add_argument("--formats", default="NVFP4,FP8,W4A8")
    parser.add_argument("--budgets", default="4.8,6")
    parser.add_argument("--batches", type=int, default=16, help="calibration = scoring batches (4 x seq-len tokens each)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"autoq variants in memory: {', '.join(VARIANTS)}")
    parser.add_argument("--stream-variants", default="today,default", help="autoq variants with blocks streamed ('' for none)")
    parser.add_argument("--no-modelopt", action="store_true", help="skip ModelOpt (no time or memory ratios)")
    parser.add_argument("--no-quality", action="store_true")
    parser.add_argument("--quality-sizes", default=None, help="comma-separated sizes to measure plan quality on (default: all)")
    parser.add_argument("--profile-sizes", default="", help="comma-separated sizes to write a stage table for")
    parser.add_argument("--stream-check", default=None, help="FIT,BIG: streamed == in-memory scores on FIT; BIG under a memory cap")
    parser.add_argument("--run", default="", help="label of this run (a column of every CSV)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    args = parser.parse_args()
    import modelopt

    from autoq.sweep import searched_bits

    args.out.mkdir(parents=True, exist_ok=True)
    formats = args.formats.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    sizes = [s for s in args.sizes.split(",") if s]
    modes = [(v, False) for v in args.variants.split(",") if v] + [(v, True) for v in args.stream_variants.split(",") if v]
    import autoq

    info = {  # written first: a run cut short by a time limit still says what it was
        "run": args.run, "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
        "autoq": autoq.__version__, "modelopt": modelopt.__version__, "formats": formats, "budgets": budgets,
        "batches": args.batches, "batch_size": 4, "seq_len": args.seq_len, "heldout_batches": args.heldout_batches,
        "repeats": args.repeats, "sizes": sizes, "quality_sizes": [] if args.no_quality else (args.quality_sizes or args.sizes).split(","),
        "modelopt_baseline": not args.no_modelopt, "variants": {name: VARIANTS[name] for name in dict.fromkeys(v for v, _ in modes)},
        "streamed_variants": [v for v, streamed in modes if streamed],
    }  # fmt: skip
    (args.out / "bench_search.json").write_text(json.dumps(info, indent=2))
    calib = tokens(args.batches * 4, args.seq_len, 0, DEVICE)
    heldout = tokens(args.heldout_batches * 4, args.seq_len, args.batches * 4, DEVICE)
    tool = {mode: ("autoq-stream" if mode[1] else "autoq") + ("" if mode[0] == "default" else f":{mode[0]}") for mode in modes}
    reference_mode = ("today", False) if ("today", False) in modes else modes[0]

    if sizes:  # warm-up: ModelOpt's CUDA extensions compile on first use; autoq's kernels (every variant's) too
        warm = build("tiny")
        warm_choices, _ = layer_choices(warm, formats)
        for variant, stream in modes:
            run_autoq(warm, calib[:2], formats, budgets[:1], stream, VARIANTS[variant])
        if not args.no_modelopt:
            run_modelopt(warm, calib[:2], formats, budgets[:1], warm_choices)
        del warm
        say("warmed up")

    rows, runs, variant_rows = [], [], []
    for size in sizes:
        if Path(size).is_dir():  # a real model reads text through its own tokenizer
            calib = tokens(args.batches * 4, args.seq_len, 0, DEVICE, size)
            heldout = tokens(args.heldout_batches * 4, args.seq_len, args.batches * 4, DEVICE, size)
        model = build(size)
        params = sum(p.numel() for p in model.parameters())
        floor = floor_seconds(model, calib, formats)
        say(f"{size}: floor {floor:.2f} s")
        timings: dict[str, list[dict]] = {tool[mode]: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                result = run_autoq(model, calib, formats, budgets, mode[1], VARIANTS[mode[0]])
                timings[tool[mode]].append(result)
                say(f"{size} {tool[mode]}: {result['score_s'] + result['solve_s']:.2f} s, {result['peak_gib']:.2f} GiB")
        choices = timings[tool[modes[0]]][0]["choices"]
        if size in args.profile_sizes.split(","):
            stages, profile_text = stage_table(model, calib, formats, budgets, VARIANTS["default"])
            stages.assign(run=args.run, model=size).to_csv(args.out / f"stages_{Path(size).name}.csv", index=False)
            (args.out / f"profile_{Path(size).name}.txt").write_text(profile_text)
            print(stages.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
        plans = {tool[mode]: timings[tool[mode]][-1]["plans"] for mode in modes}
        if not args.no_modelopt:
            timings["modelopt"] = []
            for repeat in range(args.repeats):  # ModelOpt quantizes the model it is given: a fresh one each time
                result = run_modelopt(model if repeat == 0 else build(size), calib, formats, budgets, choices)
                timings["modelopt"].append(result)
                say(f"{size} modelopt: {result['score_s'] + result['solve_s']:.2f} s, {result['peak_gib']:.2f} GiB")
            plans["modelopt"] = result["plans"]
        del model
        fresh_peak()
        for name, results in timings.items():
            for repeat, r in enumerate(results):
                runs.append({"run": args.run, "model": size, "params": params, "tool": name, "repeat": repeat,
                             "score_s": r["score_s"], "solve_s": r["solve_s"], "total_s": r["score_s"] + r["solve_s"],
                             "peak_gib": r["peak_gib"], "floor_s": floor})  # fmt: skip

        def best(name: str, timings: dict[str, list[dict]] = timings) -> float:
            return min(r["score_s"] + r["solve_s"] for r in timings[name])

        reference = timings[tool[reference_mode]][-1]["table"]
        for mode in modes:
            name = tool[mode]
            ours = timings[name]
            variant_rows.append({
                "run": args.run, "model": size, "params": params, "variant": mode[0], "streamed": mode[1], "tool": name,
                "total_s": best(name), "peak_gib": max(r["peak_gib"] for r in ours), "floor_s": floor,
                "floor_ratio": best(name) / floor, "vs_today": best(name) / best(tool[reference_mode]),
                "modelopt_time_ratio": best(name) / best("modelopt") if "modelopt" in timings else None,
                "modelopt_mem_ratio": max(r["peak_gib"] for r in ours) / max(r["peak_gib"] for r in timings["modelopt"])
                if "modelopt" in timings else None,
                **score_differences(ours[-1]["table"], reference),
                **{f"same_plan_{b:g}": ours[-1]["plans"][b] == timings[tool[reference_mode]][-1]["plans"][b] for b in budgets},
            })  # fmt: skip
        qual = {}
        if not args.no_quality and (args.quality_sizes is None or size in args.quality_sizes.split(",")):
            compared = [t for t in ("autoq", tool[reference_mode], "modelopt") if t in plans]
            qual = quality(size, {f"{t}@{b:g}": plans[t][b] for t in dict.fromkeys(compared) for b in budgets}, calib, heldout)
            say(f"{size}: plan quality measured")
            for row in variant_rows:
                if row["model"] == size and row["tool"] in compared:
                    row |= {f"kl_{b:g}": qual[f"{row['tool']}@{b:g}"]["kl"] for b in budgets}
        for name in [t for t in timings if t != "modelopt" and ":" not in t]:  # the engine as shipped, vs ModelOpt
            ours = timings[name]
            for budget in budgets:
                row = {"run": args.run, "model": size, "params": params, "autoq_mode": name, "budget_bits": budget,
                       "autoq_total_s": best(name), "autoq_total_s_max": max(r["score_s"] + r["solve_s"] for r in ours),
                       "autoq_peak_gib": max(r["peak_gib"] for r in ours), "floor_s": floor, "floor_ratio": best(name) / floor,
                       "autoq_bits": searched_bits(plans[name][budget], choices),
                       "autoq_kl": qual.get(f"{name}@{budget:g}", {}).get("kl"),
                       "autoq_ppl": qual.get(f"{name}@{budget:g}", {}).get("ppl"), "bf16_ppl": qual.get("bf16", {}).get("ppl")}  # fmt: skip
                if "modelopt" in timings:
                    mo = timings["modelopt"]
                    row |= {
                        "modelopt_total_s": best("modelopt"), "modelopt_total_s_max": max(r["score_s"] + r["solve_s"] for r in mo),
                        "modelopt_peak_gib": max(r["peak_gib"] for r in mo), "time_ratio": best(name) / best("modelopt"),
                        "mem_ratio": max(r["peak_gib"] for r in ours) / max(r["peak_gib"] for r in mo),
                        "modelopt_bits": searched_bits(plans["modelopt"][budget], choices),
                        "modelopt_kl": qual.get(f"modelopt@{budget:g}", {}).get("kl"),
                        "modelopt_ppl": qual.get(f"modelopt@{budget:g}", {}).get("ppl"),
                    }  # fmt: skip
                rows.append(row)
        pd.DataFrame(rows).to_csv(args.out / "bench_search.csv", index=False)
        pd.DataFrame(runs).to_csv(args.out / "bench_search_runs.csv", index=False)
        pd.DataFrame(variant_rows).to_csv(args.out / "bench_search_variants.csv", index=False)

    if args.stream_check:
        fit, big = args.stream_check.split(",")
        check = stream_check(fit, big, formats, calib)
        (args.out / "stream_check.json").write_text(json.dumps(check, indent=2))
        print(json.dumps(check, indent=2))

    pd.set_option("display.width", 250)
    if variant_rows:
        print(pd.DataFrame(variant_rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if rows:
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
