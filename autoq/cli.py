"""``autoq`` command line: thin wrappers over the pipeline functions.

Every user error prints one line ``autoq: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from autoq import __version__
from autoq.errors import AutoqError

DEFAULT_OUT = "runs/search"
# ``search`` calibration without --calib-samples / --seq-len: (sequences, tokens each) per device.
# A GPU scores 64 x 512 tokens in seconds; two CPU cores need minutes per 2k tokens, and a CPU
# plan from fewer tokens stays close to the 64 x 512 one (README "Calibration size on a CPU").
DEFAULT_CALIBRATION = {"cuda": (64, 512), "cpu": (8, 256)}


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line, like every other autoq error (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"autoq: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected one or more comma-separated numbers, got none")
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("bits must be positive")
    return values


KV_CACHE_CHOICES = ["none", "fp8", "nvfp4"]


def _add_deployment_args(parser: argparse.ArgumentParser) -> None:
    """Switches that shape what is exported, not how layers are scored (search, sweep)."""
    parser.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="none",
                        help="quantize the KV cache too (calibrated k/v scales in the checkpoint; not part of scoring; default: none)")  # fmt: skip
    parser.add_argument("--protect", default=None, metavar="first=N,last=M[,format=F]",
                        help="pin the first N and last M decoder blocks to F (default BF16), over the space's own 'protect'")  # fmt: skip


def _add_workload_args(parser: argparse.ArgumentParser, calibration_per_device: bool = False) -> None:
    parser.add_argument("--model", help="HF model directory, hub id, .gguf file, or 'synthetic' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--space", default="default", help="search space: built-in name or YAML path (default: default)")
    parser.add_argument("--calib", default="default", help="calibration text: default | FILE.txt | FILE.jsonl | DATASET_DIR | HUB_NAME[:CONFIG]")
    if calibration_per_device:  # resolved from DEFAULT_CALIBRATION once the device is known
        gpu, cpu = DEFAULT_CALIBRATION["cuda"], DEFAULT_CALIBRATION["cpu"]
        parser.add_argument("--calib-samples", type=_positive_int, default=None,
                            help=f"calibration sequences (default: {gpu[0]} on a GPU, {cpu[0]} on a CPU)")  # fmt: skip
        parser.add_argument("--seq-len", type=_positive_int, default=None,
                            help=f"tokens per calibration sequence (default: {gpu[1]} on a GPU, {cpu[1]} on a CPU)")  # fmt: skip
    else:
        parser.add_argument("--calib-samples", type=_positive_int, default=64, help="calibration sequences (default: 64)")
        parser.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per calibration sequence (default: 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    _add_trust_arg(parser)


def _add_trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model ships (its config's auto_map); never without this flag")  # fmt: skip


def _add_scoring_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objective", choices=["fisher", "kl"], default="fisher",
                        help="fisher: LM loss on the calibration text; kl: label-free, tokens sampled from the model")  # fmt: skip
    parser.add_argument("--stream-blocks", action="store_true",
                        help="read decoder blocks from the safetensors files one at a time (memory-mapped) instead of holding the model")  # fmt: skip
    parser.add_argument("--chunk-steps", type=_positive_int, default=None,
                        help="steps (of about 8k tokens) per scoring pass, the unit of resume (default: from memory)")  # fmt: skip
    parser.add_argument("--tokens-per-step", type=_positive_int, default=None,
                        help="calibration tokens run together, the unit of work shared out to --gpus processes (default: 8192)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=None, help="score cache (default: $AUTOQ_CACHE or ~/.cache/autoq)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autoq", description="Mixed-precision quantization search for LLMs.")
    parser.add_argument("--version", action="version", version=f"autoq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="score layers, solve for a bits budget, write plan(s) [and a checkpoint]")
    search.add_argument("--bits", type=_budgets, required=True, help="average effective bits budget(s), e.g. 4.8 or 4.5,4.8,6")
    _add_workload_args(search, calibration_per_device=True)
    _add_scoring_args(search)
    search.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default: {DEFAULT_OUT})")
    search.add_argument("--export", type=Path, default=None, help="also apply the plan and export a checkpoint here")
    _add_engine_arg(search)
    search.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    search.add_argument("--gpus", type=_positive_int, default=None,
                        help="score on N GPUs of this host, one process each (torchrun); with --device cpu, N CPU processes")  # fmt: skip
    _add_deployment_args(search)
    search.set_defaults(func=cmd_search)

    front = commands.add_parser("frontier", help="score/size trade-off for all budgets from a search's scores (no model work)")
    front.add_argument("run", type=Path, help="a directory written by `autoq search`")
    front.add_argument("--bits", type=_budgets, default=None, help="budgets to solve (default: a grid over the feasible range)")
    front.add_argument("--measured", action="store_true",
                       help="also measure: an optuna multi-objective study over (bits, measured metric), plotted beside the proxy")  # fmt: skip
    _add_study_args(front, trials=60)
    front.set_defaults(func=cmd_frontier)

    refine = commands.add_parser("refine", help="refine a plan by measured loss: an optuna study seeded with the ILP plan (resumable)")
    refine.add_argument("run", type=Path, help="a directory written by `autoq search` or `autoq sweep`")
    refine.add_argument("--bits", type=_budgets, default=None, help="budget(s) to refine, one model build for all (default: the run's only budget)")
    refine.add_argument("--groups", type=int, default=12, help="groups searched: the K least certain ones (default: 12)")
    refine.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    _add_study_args(refine, trials=100)
    refine.set_defaults(func=cmd_refine)

    apply = commands.add_parser("apply", help="apply a plan and export a unified HF checkpoint (streamed file to file, or with ModelOpt)")
    apply.add_argument("plan", type=Path, help="plan.json (from autoq search, or written by hand)")
    _add_workload_args(apply)
    apply.add_argument("--export", type=Path, required=True, help="checkpoint output directory")
    _add_engine_arg(apply)
    apply.add_argument("--cache-dir", type=Path, default=None,
                       help="score cache holding the search's calibration state (default: $AUTOQ_CACHE or ~/.cache/autoq)")  # fmt: skip
    apply.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default=None,
                       help="quantize the KV cache too (default: the plan's kv_cache, else none)")  # fmt: skip
    apply.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    apply.add_argument("--no-progress", action="store_true", help="no progress bars")
    apply.set_defaults(func=cmd_apply)

    evaluate = commands.add_parser("eval", help="evaluate a plan (or an exported checkpoint) against the BF16 model")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--plan", type=Path, action="append", default=[],
                        help="plan.json to apply (ModelOpt, calibrated) before evaluating; repeat to compare plans "
                             "(each format is calibrated once for all of them)")  # fmt: skip
    source.add_argument("--checkpoint", type=Path, help="an exported checkpoint, run as a runtime would (dequantized)")
    _add_workload_args(evaluate)
    _add_eval_args(evaluate)
    evaluate.add_argument("--out", type=Path, default=None, help="write the results (JSON) here")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_eval)

    sweep = commands.add_parser("sweep", help="plans at several budgets plus baselines, all evaluated (resumable)")
    sweep.add_argument("--bits", type=_budgets, required=True, help="budgets for autoq (and matched ModelOpt) rows")
    _add_workload_args(sweep)
    _add_scoring_args(sweep)
    _add_eval_args(sweep)
    sweep.add_argument("--baselines", default="bf16,fp8,w4a8,nvfp4,modelopt",
                       help="comma list of bf16, modelopt and uniform formats (fp8, w4a8, nvfp4, mxfp8, w4a16_nvfp4, int8_sq, int4_awq) "
                            "(default: bf16,fp8,w4a8,nvfp4,modelopt)")  # fmt: skip
    _add_deployment_args(sweep)
    _add_engine_arg(sweep)
    sweep.add_argument("--keep-checkpoints", action="store_true", help="keep every row's exported checkpoint")
    sweep.add_argument("--out", type=Path, default=Path("runs/sweep"), help="sweep directory (default: runs/sweep)")
    sweep.set_defaults(func=cmd_sweep)

    report = commands.add_parser("report", help="plots, report.md and report.html from a sweep directory")
    report.add_argument("sweep", type=Path, help="a directory written by `autoq sweep`")
    report.add_argument("--out", type=Path, default=None, help="report directory (default: reports/<sweep name>)")
    report.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    report.set_defaults(func=cmd_report)

    plan = commands.add_parser("plan", help="inspect, compare, convert and import plans")
    plan_commands = plan.add_subparsers(dest="plan_command", required=True)
    show = plan_commands.add_parser("show", help="table of layers, formats, params and bits, with totals")
    show.add_argument("plan", type=Path)
    show.set_defaults(func=cmd_plan_show)
    diff = plan_commands.add_parser("diff", help="layers whose format differs between two plans")
    diff.add_argument("a", type=Path)
    diff.add_argument("b", type=Path)
    diff.set_defaults(func=cmd_plan_diff)
    convert = plan_commands.add_parser("convert", help="the plan as another tool's config (stdout, or --out)")
    convert.add_argument("plan", type=Path)
    convert.add_argument("--to", required=True, choices=["modelopt", "llmcompressor", "quark"])
    convert.add_argument("--out", type=Path, default=None)
    convert.set_defaults(func=cmd_plan_convert)
    imp = plan_commands.add_parser("import", help="a plan from a ModelOpt checkpoint (hf_quant_config.json / config.json)")
    imp.add_argument("checkpoint", type=Path)
    imp.add_argument("--out", type=Path, default=None, help="write plan.json here (default: stdout)")
    imp.set_defaults(func=cmd_plan_import)

    verify = commands.add_parser("verify", help="check a checkpoint's tensors, scales and config (exit 1 on problems)")
    verify.add_argument("checkpoint", type=Path)
    verify.add_argument("--model", type=Path, default=None, help="BF16 model directory: report per-layer relative error")
    verify.add_argument("--runtime", choices=["vllm"], default=None, help="also check a runtime's loader accepts it")
    verify.set_defaults(func=cmd_verify)
    return parser


def _add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["auto", "stream", "modelopt"], default="auto",
                        help="stream: read, quantize and write the checkpoint shard by shard from the search's calibration "
                             "state (bounded memory); modelopt: load the model, calibrate with ModelOpt, export_hf_checkpoint; "
                             "auto (default): stream wherever it applies (dense models), else modelopt")  # fmt: skip


def _add_study_args(parser: argparse.ArgumentParser, trials: int) -> None:
    """Options of the measuring studies (refine, frontier --measured); model and data default to the run's."""
    parser.add_argument("--trials", type=int, default=trials, help=f"finished trials in total, earlier runs included (default: {trials})")
    parser.add_argument("--metric", choices=["kl", "ppl"], default="kl", help="measured on held-out tokens (default: kl)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--restart", action="store_true", help="replace the study in RUN/refine.db instead of resuming it")
    parser.add_argument("--model", default=None, help="model (default: the run's)")
    parser.add_argument("--calib", default=None, help="calibration source (default: the run's)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: the run's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's)")
    parser.add_argument("--eval-samples", type=int, default=None,
                        help="held-out sequences measured per trial, right after the calibration ones (default: a sweep's, else 32 as autoq eval)")  # fmt: skip
    parser.add_argument("--unseen-samples", type=int, default=None, help="sequences of the final, never-searched slice (default: --eval-samples)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="(default: the dtype the run computed in, else bfloat16)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    _add_trust_arg(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _model_settings(args: argparse.Namespace):
    from autoq.workspace import ModelSettings

    return ModelSettings(
        model=args.model, calib=args.calib, calib_samples=args.calib_samples, seq_len=args.seq_len,
        eval_samples=args.eval_samples, unseen_samples=args.unseen_samples, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, progress=not args.no_progress, trust_remote_code=args.trust_remote_code,
    )  # fmt: skip


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="ppl,kl",
                        help="ppl, kl, wikitext2, lambada, arc_easy, piqa, mmlu, TASK:SHOTS (e.g. mmlu:5), TASK@LIMIT (e.g. arc_easy@300) or any lm-eval task (default: ppl,kl)")  # fmt: skip
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="local data for wikitext2/lambada/arc_easy/piqa/mmlu (default: $AUTOQ_EVAL_DATA; neither: the hub)")  # fmt: skip
    parser.add_argument("--num-fewshot", type=_non_negative_int, default=None, help="few-shot examples for lm-eval tasks without :SHOTS")
    parser.add_argument("--limit", type=_positive_int, default=None, help="lm-eval documents per task (per MMLU subject)")
    parser.add_argument("--max-length", type=_positive_int, default=None,
                        help="lm-eval's longest input, e.g. WikiText's rolling window (default: the model's context)")  # fmt: skip
    parser.add_argument("--eval-samples", type=_positive_int, default=32, help="held-out sequences for ppl/kl (default: 32)")


def cmd_search(args: argparse.Namespace) -> int:
    from autoq import distributed, pipeline
    from autoq.errors import atomic_output_dirs

    device = _device(args.device)  # an unavailable device is the first error, before any work
    outputs = [(args.out, args.overwrite)] + ([(args.export, args.overwrite)] if args.export is not None else [])
    pipeline.preflight_outputs(*outputs)
    if args.export is not None:
        pipeline.require_single_budget(args.bits, "--export")
    if args.gpus is not None and args.gpus > 1 and _processes() == 1:
        distributed.check_launch(args.gpus, args.device)
        return distributed.launch(args.gpus, args.argv)  # torchrun's machinery runs this command in each process
    # Under torchrun: every rank scores its share of the steps; rank 0 alone goes on from there.
    with distributed.process_group(device, args.gpus) as (parallel, device):  # each rank: its own device
        work = pipeline.prepare(args.model, args.space, args.calib, *_calibration_size(args, device),
                                trust_remote_code=args.trust_remote_code, protect=args.protect, kv_cache=args.kv_cache)  # fmt: skip
        pipeline.check_outputs_apart(work.source, args.out, args.export)
        if work.synthetic:
            pipeline.log(f"model {work.source.name} is SYNTHETIC (randomly initialised, not a trained LM): numbers are real "
                         "measurements of a random network, not of a language model")  # fmt: skip
        pipeline.log(f"{len(work.choices)} layers to search over {', '.join(work.space.formats)}; calibration: "
                     f"{work.calibration.tokens.shape[0]} x {work.calibration.tokens.shape[1]} tokens from {args.calib}"
                     + (f"; {parallel.world} processes" if parallel.world > 1 else ""))  # fmt: skip
        options = _scoring_options(args, device, progress=not args.no_progress and parallel.is_main)
        scores = pipeline.score(work, options, dtype=args.dtype, cache_dir=args.cache_dir)
    if not parallel.is_main:
        return 0
    pipeline.log(("scores from cache " if scores.from_cache else "scored ") + f"in {scores.seconds:.1f} s "
                 f"(peak memory {_fmt_memory(scores.peak_memory)}; cache {scores.cache.dir})")  # fmt: skip
    plans, curve = pipeline.make_plans(work, scores, args.bits, args.objective)
    summary = pipeline.run_summary(work, scores, options, plans)
    for plan in plans:
        a = plan.achieved
        shares = ", ".join(f"{fmt} {share:.0%}" for fmt, share in a["format_share"].items())
        pipeline.log(f"--bits {plan.budget['effective_bits']:g}: {a['searched_effective_bits']:.3f} bits on searched layers, "
                     f"{a['model_effective_bits']:.3f} on the whole model, total score {a['total_score']:.4g} ({shares})"
                     + _kv_note(plan.kv_cache))  # fmt: skip
    # --out and --export appear together, or (on any failure) neither does.
    with atomic_output_dirs(*outputs) as staged:
        pipeline.write_search_outputs(staged[0], scores, plans, curve, summary)
        if args.export is not None:
            report = pipeline.export_plan(work, plans[0], args.dtype, device, args.stream_blocks, args.batch_size, staged[1],
                                          progress=not args.no_progress, engine=args.engine, cache_dir=args.cache_dir)  # fmt: skip
    pipeline.log(f"wrote {args.out}/ (scores, {len(plans)} plan(s), frontier.csv, search.json)")
    if args.export is not None:
        pipeline.log(f"exported and verified {args.export}/ ({report.effective_bits:.3f} bits per searched weight as stored)")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from autoq.solver import Options, frontier

    if args.measured:
        from autoq.refine import check_study_args

        check_study_args(args.trials, args.metric)
    scores_path = args.run / "scores.parquet"
    if not scores_path.is_file():
        raise AutoqError(f"{args.run} has no scores.parquet (run `autoq search` first)")
    options = Options.from_table(pd.read_parquet(scores_path))
    if args.bits is None:
        low, high = options.min_bits(), options.max_bits()
        budgets = [low + (high - low) * k / 20 for k in range(21)]
    else:
        budgets = args.bits
    table = frontier(options, budgets)
    summary = json.loads((args.run / "search.json").read_text()) if (args.run / "search.json").is_file() else {}
    print(f"# {summary.get('model', {}).get('id', args.run)}: minimum {options.min_bits():.4f} bits, maximum {options.max_bits():.4f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.measured:
        from autoq import pipeline
        from autoq.measured_frontier import measured_frontier

        result = measured_frontier(args.run, args.trials, args.metric, args.bits, args.seed, _model_settings(args), args.restart)
        print(result.front.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        pipeline.log(f"wrote {result.csv_path} and {result.plot_path} ({len(result.trials)} trials, {len(result.front)} on the measured front)")
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.refine import check_budgets, check_study_args, refine

    check_study_args(args.trials, args.metric)
    workspace = None
    for budget in check_budgets(args.run, args.bits):
        result = refine(args.run, budget, trials=args.trials, metric=args.metric, timeout=args.timeout, groups=args.groups,
                        seed=args.seed, settings=_model_settings(args), restart=args.restart, workspace=workspace)  # fmt: skip
        workspace = result.workspace
        s = result.summary
        metric = s["metric"]
        pipeline.log(f"--bits {budget:g}: trial 0 (ILP plan) {metric} {s['trial0'][metric]:.5g} at {s['trial0']['bits']:.4f} bits; "
                     f"best trial {s['best']['number']}: {metric} {s['best'][metric]:.5g} at {s['best']['bits']:.4f} bits "
                     f"({s['best']['changed_groups']} group(s) changed)")  # fmt: skip
        unseen = s["unseen"]
        pipeline.log(f"--bits {budget:g}: unseen slice kl {unseen['ilp']['kl']:.5g} (ILP) -> {unseen['refined']['kl']:.5g} (refined), "
                     f"ppl {unseen['ilp']['ppl']:.5g} -> {unseen['refined']['ppl']:.5g}")  # fmt: skip
        pipeline.log(f"wrote {result.plan_path} and {result.out_dir}/ (trials.csv, history.png, summary.json); "
                     f"dashboard: optuna-dashboard sqlite:///{args.run}/refine.db")  # fmt: skip
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.plan import load_plan

    device = _device(args.device)
    pipeline.preflight_outputs((args.export, args.overwrite))
    plan = load_plan(args.plan)
    if args.kv_cache is not None:
        from autoq.formats import get_kv_cache_format

        kv_format = get_kv_cache_format(args.kv_cache)
        plan.kv_cache = None if kv_format is None else kv_format.name
    report = pipeline.apply_and_export(plan, args.model, args.calib, args.calib_samples, args.seq_len, args.dtype, device,
                                       args.batch_size, args.export, args.overwrite, progress=not args.no_progress,
                                       engine=args.engine, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code)  # fmt: skip
    pipeline.log(f"exported and verified {args.export}/ ({len(plan.layers)} planned layers, "
                 f"{report.effective_bits:.3f} bits per planned weight as stored{_kv_note(plan.kv_cache)})")  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from autoq import pipeline
    from autoq.cache import _atomic_write
    from autoq.evaluate import EvalSpec, check_checkpoint_dir, evaluate_target

    device = _device(args.device)  # an unavailable device is the first error, before any work
    spec = EvalSpec.parse(args.tasks, args.eval_data, default_shots=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          max_length=args.max_length)  # fmt: skip
    if args.checkpoint is not None:
        check_checkpoint_dir(args.checkpoint)  # before resolving (maybe converting) the reference model
    work = pipeline.prepare(args.model, args.space, args.calib, args.calib_samples, args.seq_len, args.trust_remote_code)
    pipeline.check_outputs_apart(work.source, args.out)
    results = evaluate_target(work, spec, plan_paths=args.plan, checkpoint=args.checkpoint, eval_samples=args.eval_samples,
                              dtype=args.dtype, device=device, progress=not args.no_progress)  # fmt: skip
    # One plan (or none): its record, as always. Several: a list of records, one per plan, in order.
    shown = results[0]["metrics"] if len(results) == 1 else {r["plan"]: r["metrics"] for r in results}
    print(json.dumps(shown, indent=2))
    if args.out is not None:
        written = results[0] if len(results) == 1 else results
        _atomic_write(args.out, lambda path: path.write_text(json.dumps(written, indent=2, default=str)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.sweep import SweepConfig, baseline_names, run_sweep

    device = _device(args.device)
    baselines = [b.strip().lower() for b in args.baselines.split(",") if b.strip()]
    unknown = set(baselines) - set(baseline_names())
    if unknown:
        raise AutoqError(f"unknown baselines {sorted(unknown)}; choose from {', '.join(baseline_names())}")
    config = SweepConfig(
        budgets=args.bits, tasks=args.tasks.split(","), baselines=baselines, eval_samples=args.eval_samples,
        eval_data=str(args.eval_data) if args.eval_data else None, few_shot=args.num_fewshot, limit=args.limit,
        max_length=args.max_length, batch_size=args.batch_size, keep_checkpoints=args.keep_checkpoints, engine=args.engine,
    )  # fmt: skip
    config.eval_spec()  # unknown tasks or missing eval data: fail before any model work
    work = pipeline.prepare(args.model, args.space, args.calib, args.calib_samples, args.seq_len,
                            trust_remote_code=args.trust_remote_code, protect=args.protect, kv_cache=args.kv_cache)  # fmt: skip
    pipeline.check_outputs_apart(work.source, args.out)
    if work.synthetic:
        pipeline.log(f"model {work.source.name} is SYNTHETIC (randomly initialised): results describe a random network")
    options = _scoring_options(args, device, progress=not args.no_progress)
    scores = pipeline.score(work, options, dtype=args.dtype, cache_dir=args.cache_dir)
    table = run_sweep(work, scores, config, args.out, args.dtype, device, args.objective, not args.no_progress, args.stream_blocks)
    columns = [c for c in ["method", "budget_bits", "searched_bits", "kv_cache", "size_bytes", "ppl", "kl", "mmlu_acc"] if c in table]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.5g}"))
    pipeline.log(f"wrote {args.out}/ (results.csv, results.parquet, plans/, rows/)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.report import write_report

    out = args.out or Path("reports") / args.sweep.resolve().name
    write_report(args.sweep, out, overwrite=args.overwrite)
    pipeline.log(f"wrote {out}/ (report.md, report.html, plots)")
    return 0


def cmd_plan_show(args: argparse.Namespace) -> int:
    from autoq.plan import describe_plan, load_plan

    print(describe_plan(load_plan(args.plan)))
    return 0


def cmd_plan_diff(args: argparse.Namespace) -> int:
    from autoq.plan import describe_diff, load_plan

    print(describe_diff(load_plan(args.a), load_plan(args.b)))
    return 0


def cmd_plan_convert(args: argparse.Namespace) -> int:
    import json

    from autoq.plan import load_plan

    formats = load_plan(args.plan).formats()
    if args.to == "modelopt":
        from autoq.interop.modelopt import to_modelopt

        text = json.dumps(to_modelopt(formats), indent=2)
    elif args.to == "llmcompressor":
        from autoq.interop.llmcompressor import to_llmcompressor

        text = to_llmcompressor(formats)
    else:
        from autoq.interop.quark import to_quark

        text = json.dumps(to_quark(formats), indent=2)
    if args.out is None:
        print(text)
    else:
        _write_text(args.out, text + "\n")
    return 0


def cmd_plan_import(args: argparse.Namespace) -> int:
    import json

    from autoq.interop.modelopt import plan_from_checkpoint

    plan = plan_from_checkpoint(args.checkpoint)
    if args.out is None:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        _write_text(args.out, json.dumps(plan.to_json(), indent=2) + "\n")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from autoq.checkpoint import checkpoint_formats, read_quant_config
    from autoq.verify import reference_errors, verify_checkpoint

    formats = checkpoint_formats(args.checkpoint)
    report = verify_checkpoint(args.checkpoint, formats)
    problems = list(report.problems)
    if args.runtime == "vllm":
        from autoq.interop.vllm import vllm_problems

        config = json.loads((args.checkpoint / "config.json").read_text()) if (args.checkpoint / "config.json").is_file() else {}
        tied = bool(config.get("tie_word_embeddings", False))
        problems += [f"vllm: {p}" for p in vllm_problems(read_quant_config(args.checkpoint), config.get("quantization_config"), tied)]
    errors = reference_errors(args.checkpoint, formats, args.model) if args.model else {}
    for name, fmt in formats.items():
        line = f"{name:60s} {fmt:9s} {report.layer_bits.get(name, 0) / max(1, report.layer_params.get(name, 1)):6.3f} bits"
        if name in errors:
            line += f"  rel.err {errors[name]:.4f}"
        print(line)
    print(f"# {len(formats)} quantized layers, {report.effective_bits:.4f} bits per weight as stored")
    if not report.hashed:
        print("# no autoq_manifest.json (not exported by autoq): file contents not checked against hashes")
    if report.kv_cache is not None:
        print(f"# KV cache {report.kv_cache}: {report.kv_bits_per_element:g} bits per cached element, "
              f"k/v scales for {report.kv_layers} attention layers (not in the weight bits)")  # fmt: skip
    for problem in problems:
        print(f"autoq: verify: {problem}", file=sys.stderr)
    if problems:
        print(f"autoq: verify: {len(problems)} problem(s) in {args.checkpoint}", file=sys.stderr)
        return 1
    print(f"# {args.checkpoint}: OK")
    return 0


def _calibration_size(args: argparse.Namespace, device: str) -> tuple[int, int]:
    """--calib-samples and --seq-len, or where not given, ``DEFAULT_CALIBRATION`` for the device."""
    samples, seq_len = DEFAULT_CALIBRATION["cuda" if device.startswith("cuda") else "cpu"]
    return (samples if args.calib_samples is None else args.calib_samples, seq_len if args.seq_len is None else args.seq_len)


def _kv_note(kv_cache: str | None) -> str:
    """The KV cache beside the weight bits, never in them."""
    from autoq.formats import KV_CACHE_FORMATS

    return "" if kv_cache is None else f"; KV cache {kv_cache}: {KV_CACHE_FORMATS[kv_cache].bits_per_element:g} bits per cached element"


def _scoring_options(args: argparse.Namespace, device: str | None, progress: bool):
    from autoq.sensitivity import ScoringOptions

    return ScoringOptions(
        objective=args.objective, batch_size=args.batch_size, device=device, stream_blocks=args.stream_blocks,
        chunk_steps=args.chunk_steps, tokens_per_step=args.tokens_per_step or ScoringOptions.tokens_per_step, progress=progress,
    )  # fmt: skip


def _device(requested: str | None) -> str:
    from autoq.devices import resolve_device

    return resolve_device(requested)


def _write_text(path: Path, text: str) -> None:
    """A result file, written whole or not at all; an unwritable path is a user error."""
    from autoq.errors import atomic_write

    if not path.parent.is_dir():
        raise AutoqError(f"cannot write {path}: {path.parent} is not a directory")
    try:
        atomic_write(path, lambda tmp: tmp.write_text(text))
    except OSError as err:
        raise AutoqError(f"cannot write {path} ({err.strerror or type(err).__name__})") from None


def _fmt_memory(peak: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('_gib', '')} {v:.2f} GiB" for k, v in peak.items())


def _cpu_threads_yield() -> None:
    """OpenMP threads that wait for work sleep instead of spinning. On a CPU shared with other
    jobs a spinning thread takes the core its partner needs, and every parallel op then waits for
    the scheduler: measured on 2 shared cores, the default search ran 3x faster this way. Read by
    OpenMP when torch loads, so it is set before torch is imported; the user's setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", module="modelopt")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def main(argv: list[str] | None = None) -> int:
    _cpu_threads_yield()
    _quiet_libraries()
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit (ulimit -f), writes fail with EFBIG instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # usage errors (2, one line), --help and --version (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --gpus runs in each process
    try:
        if args.command != "search" and _processes() > 1:
            raise AutoqError(f"only `autoq search` runs in several processes (torchrun started {_processes()} for `autoq {args.command}`)")
        return args.func(args)
    except AutoqError as err:
        return _user_error(err, str(err))
    except KeyboardInterrupt:
        if _prints_errors():
            print("autoq: interrupted; finished scoring chunks are cached, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        from autoq.errors import disk_full

        if (full := disk_full(err)) is not None:  # outputs are staged, so none was left; the cache holds finished work
            return _user_error(err, f"the disk is full or a file-size limit was reached ({full}); no output was written, "
                                    "finished scoring chunks are cached: free space and rerun the same command")  # fmt: skip
        if isinstance(err, OSError) and err.errno is not None:  # the environment (permissions, a vanished file), not a bug
            where = f": {err.filename}" if err.filename else ""
            return _user_error(err, f"{err.strerror or os.strerror(err.errno)}{where}")
        _prints_errors(err)
        raise


def _user_error(err: BaseException, message: str) -> int:
    """Print ``message`` as one line (control characters escaped) and return exit status 2."""
    if _prints_errors(err):
        line = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)
        print(f"autoq: error: {line}", file=sys.stderr)
    return 2


def _processes() -> int:
    """How many processes torchrun started for this command (1: not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _prints_errors(err: BaseException | None = None) -> bool:
    """Whether this process prints errors: yes alone; under torchrun only rank 0 (and none under
    ``--gpus``, whose launcher prints the root cause). ``err`` is recorded for torchrun's report."""
    if _processes() == 1:
        return True
    from autoq import distributed

    if err is not None:
        distributed.record_error(err)
    return distributed.prints_errors()


if __name__ == "__main__":
    sys.exit(main())
