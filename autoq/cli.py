"""``autoq`` command line: thin wrappers over the pipeline functions.

Every user error prints one line ``autoq: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from autoq import __version__
from autoq.errors import AutoqError

DEFAULT_OUT = "runs/search"
# ``search`` calibration without --calib-samples / --seq-len: (sequences, tokens each) per device.
# A GPU scores 64 x 512 tokens in seconds; two CPU cores need minutes per 2k tokens, and a CPU
# plan from fewer tokens stays close to the 64 x 512 one (README "Calibration size on a CPU").
DEFAULT_CALIBRATION = {"cuda": (64, 512), "cpu": (8, 256)}


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("bits must be positive")
    return values


def _add_workload_args(parser: argparse.ArgumentParser, calibration_per_device: bool = False) -> None:
    parser.add_argument("--model", help="HF model directory, hub id, .gguf file, or 'synthetic' (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--space", default="default", help="search space: built-in name or YAML path (default: default)")
    parser.add_argument("--calib", default="default", help="calibration text: default | FILE.txt | FILE.jsonl | DATASET_DIR | HUB_NAME[:CONFIG]")
    if calibration_per_device:  # resolved from DEFAULT_CALIBRATION once the device is known
        gpu, cpu = DEFAULT_CALIBRATION["cuda"], DEFAULT_CALIBRATION["cpu"]
        parser.add_argument("--calib-samples", type=int, default=None,
                            help=f"calibration sequences (default: {gpu[0]} on a GPU, {cpu[0]} on a CPU)")  # fmt: skip
        parser.add_argument("--seq-len", type=int, default=None,
                            help=f"tokens per calibration sequence (default: {gpu[1]} on a GPU, {cpu[1]} on a CPU)")  # fmt: skip
    else:
        parser.add_argument("--calib-samples", type=int, default=64, help="calibration sequences (default: 64)")
        parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default: 4)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")


def _add_scoring_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objective", choices=["fisher", "kl"], default="fisher",
                        help="fisher: LM loss on the calibration text; kl: label-free, tokens sampled from the model")  # fmt: skip
    parser.add_argument("--stream-blocks", action="store_true", help="keep decoder blocks on CPU, one at a time on the GPU")
    parser.add_argument("--chunk-steps", type=int, default=None,
                        help="steps (of about 8k tokens) per scoring pass, the unit of resume (default: from memory)")  # fmt: skip
    parser.add_argument("--cache-dir", type=Path, default=None, help="score cache (default: $AUTOQ_CACHE or ~/.cache/autoq)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoq", description="Mixed-precision quantization search for LLMs.")
    parser.add_argument("--version", action="version", version=f"autoq {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="score layers, solve for a bits budget, write plan(s) [and a checkpoint]")
    search.add_argument("--bits", type=_budgets, required=True, help="average effective bits budget(s), e.g. 4.8 or 4.5,4.8,6")
    _add_workload_args(search, calibration_per_device=True)
    _add_scoring_args(search)
    search.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default: {DEFAULT_OUT})")
    search.add_argument("--export", type=Path, default=None, help="also apply the plan and export a checkpoint here")
    search.add_argument("--overwrite", action="store_true", help="replace existing output directories")
    search.set_defaults(func=cmd_search)

    front = commands.add_parser("frontier", help="score/size trade-off for all budgets from a search's scores (no model work)")
    front.add_argument("run", type=Path, help="a directory written by `autoq search`")
    front.add_argument("--bits", type=_budgets, default=None, help="budgets to solve (default: a grid over the feasible range)")
    front.set_defaults(func=cmd_frontier)

    apply = commands.add_parser("apply", help="apply a plan with ModelOpt, calibrate, export a unified HF checkpoint")
    apply.add_argument("plan", type=Path, help="plan.json (from autoq search, or written by hand)")
    _add_workload_args(apply)
    apply.add_argument("--export", type=Path, required=True, help="checkpoint output directory")
    apply.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    apply.add_argument("--no-progress", action="store_true", help="no progress bars")
    apply.set_defaults(func=cmd_apply)

    evaluate = commands.add_parser("eval", help="evaluate a plan (or an exported checkpoint) against the BF16 model")
    source = evaluate.add_mutually_exclusive_group()
    source.add_argument("--plan", type=Path, help="plan.json to apply (ModelOpt, calibrated) before evaluating")
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
                       help="comma list of bf16, fp8, w4a8, nvfp4, modelopt (default: all)")  # fmt: skip
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


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", default="ppl,kl",
                        help="ppl, kl, wikitext2, lambada, arc_easy, piqa, mmlu, TASK:SHOTS (e.g. mmlu:5) or any lm-eval task (default: ppl,kl)")  # fmt: skip
    parser.add_argument("--eval-data", type=Path, default=None,
                        help="local data for wikitext2/lambada/arc_easy/piqa/mmlu (default: $AUTOQ_EVAL_DATA; neither: the hub)")  # fmt: skip
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for lm-eval tasks without :SHOTS")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval documents per task (per MMLU subject)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="lm-eval's longest input, e.g. WikiText's rolling window (default: the model's context)")  # fmt: skip
    parser.add_argument("--eval-samples", type=int, default=32, help="held-out sequences for ppl/kl (default: 32)")


def cmd_search(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.apply import apply_plan, export_checkpoint
    from autoq.sensitivity import ScoringOptions

    pipeline.preflight_outputs((args.out, args.overwrite), (args.export, args.overwrite))
    if args.export is not None:
        pipeline.require_single_budget(args.bits, "--export")
    work = pipeline.prepare(args.model, args.space, args.calib, *_calibration_size(args))
    if work.synthetic:
        pipeline.log(f"model {work.source.name} is SYNTHETIC (randomly initialised, not a trained LM): numbers are real "
                     "measurements of a random network, not of a language model")  # fmt: skip
    pipeline.log(f"{len(work.choices)} layers to search over {', '.join(work.space.formats)}; "
                 f"calibration: {work.calibration.tokens.shape[0]} x {work.calibration.tokens.shape[1]} tokens from {args.calib}")  # fmt: skip
    options = ScoringOptions(
        objective=args.objective, batch_size=args.batch_size, device=args.device, stream_blocks=args.stream_blocks,
        chunk_steps=args.chunk_steps, progress=not args.no_progress,
    )  # fmt: skip
    scores = pipeline.score(work, options, dtype=args.dtype, cache_dir=args.cache_dir)
    pipeline.log(("scores from cache " if scores.from_cache else "scored ") + f"in {scores.seconds:.1f} s "
                 f"(peak memory {_fmt_memory(scores.peak_memory)}; cache {scores.cache.dir})")  # fmt: skip
    plans, curve = pipeline.make_plans(work, scores, args.bits, args.objective)
    summary = pipeline.run_summary(work, scores, options, plans)
    pipeline.write_search_outputs(args.out, args.overwrite, scores, plans, curve, summary)
    for plan in plans:
        a = plan.achieved
        shares = ", ".join(f"{fmt} {share:.0%}" for fmt, share in a["format_share"].items())
        pipeline.log(f"--bits {plan.budget['effective_bits']:g}: {a['searched_effective_bits']:.3f} bits on searched layers, "
                     f"{a['model_effective_bits']:.3f} on the whole model, total score {a['total_score']:.4g} ({shares})")  # fmt: skip
    pipeline.log(f"wrote {args.out}/ (scores, {len(plans)} plan(s), frontier.csv, search.json)")
    if args.export is not None:
        model = pipeline.ensure_model(work, args.dtype, options.device or _default_device())
        if args.stream_blocks:
            model.to("cpu")
        apply_plan(model, plans[0].formats(), work.calibration.batches(args.batch_size), progress=not args.no_progress)
        report = export_checkpoint(model, work.tokenizer, plans[0], args.export, overwrite=args.overwrite)
        pipeline.log(f"exported and verified {args.export}/ ({report.effective_bits:.3f} bits per searched weight as stored)")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from autoq.solver import Options, frontier

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
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.apply import apply_plan, export_checkpoint
    from autoq.data import load_tokens
    from autoq.default_model import default_model
    from autoq.model import load_model, load_tokenizer, resolve_model
    from autoq.plan import load_plan

    pipeline.preflight_outputs((args.export, args.overwrite))
    plan = load_plan(args.plan)
    source = resolve_model(args.model) if args.model else default_model()
    tokenizer = load_tokenizer(source)
    calibration = load_tokens(args.calib, tokenizer, args.calib_samples, args.seq_len)
    model = load_model(source, dtype=args.dtype, device=args.device or _default_device())
    apply_plan(model, plan.formats(), calibration.batches(args.batch_size), progress=not args.no_progress)
    report = export_checkpoint(model, tokenizer, plan, args.export, overwrite=args.overwrite)
    pipeline.log(f"exported and verified {args.export}/ ({len(plan.layers)} planned layers, "
                 f"{report.effective_bits:.3f} bits per planned weight as stored)")  # fmt: skip
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from autoq import pipeline
    from autoq.cache import _atomic_write
    from autoq.evaluate import EvalSpec, check_checkpoint_dir, evaluate_target

    spec = EvalSpec.parse(args.tasks, args.eval_data, default_shots=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                          max_length=args.max_length)  # fmt: skip
    if args.checkpoint is not None:
        check_checkpoint_dir(args.checkpoint)  # before resolving (maybe converting) the reference model
    work = pipeline.prepare(args.model, args.space, args.calib, args.calib_samples, args.seq_len)
    result = evaluate_target(work, spec, plan_path=args.plan, checkpoint=args.checkpoint, eval_samples=args.eval_samples,
                             dtype=args.dtype, device=args.device or _default_device(), progress=not args.no_progress)  # fmt: skip
    print(json.dumps(result["metrics"], indent=2))
    if args.out is not None:
        _atomic_write(args.out, lambda path: path.write_text(json.dumps(result, indent=2, default=str)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from autoq import pipeline
    from autoq.sensitivity import ScoringOptions
    from autoq.sweep import SweepConfig, run_sweep

    baselines = [b.strip().lower() for b in args.baselines.split(",") if b.strip()]
    unknown = set(baselines) - {"bf16", "fp8", "w4a8", "nvfp4", "modelopt"}
    if unknown:
        raise AutoqError(f"unknown baselines {sorted(unknown)}; choose from bf16, fp8, w4a8, nvfp4, modelopt")
    config = SweepConfig(
        budgets=args.bits, tasks=args.tasks.split(","), baselines=baselines, eval_samples=args.eval_samples,
        eval_data=str(args.eval_data) if args.eval_data else None, few_shot=args.num_fewshot, limit=args.limit,
        max_length=args.max_length, batch_size=args.batch_size, keep_checkpoints=args.keep_checkpoints,
    )  # fmt: skip
    config.eval_spec()  # unknown tasks or missing eval data: fail before any model work
    work = pipeline.prepare(args.model, args.space, args.calib, args.calib_samples, args.seq_len)
    if work.synthetic:
        pipeline.log(f"model {work.source.name} is SYNTHETIC (randomly initialised): results describe a random network")
    options = ScoringOptions(objective=args.objective, batch_size=args.batch_size, device=args.device,
                             stream_blocks=args.stream_blocks, chunk_steps=args.chunk_steps, progress=not args.no_progress)  # fmt: skip
    scores = pipeline.score(work, options, dtype=args.dtype, cache_dir=args.cache_dir)
    table = run_sweep(work, scores, config, args.out, args.dtype, options.device or _default_device(), args.objective, not args.no_progress)
    columns = [c for c in ["method", "budget_bits", "searched_bits", "size_bytes", "ppl", "kl", "mmlu_acc"] if c in table]
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


def _layer_table(plan):
    import pandas as pd

    rows = [{"layer": n, "format": l.format, "params": l.params, "bits": l.bits} for n, l in plan.layers.items()]
    return pd.DataFrame(rows)


def cmd_plan_show(args: argparse.Namespace) -> int:
    from autoq.plan import load_plan

    plan = load_plan(args.plan)
    table = _layer_table(plan)
    print(table.to_string(index=False))
    known = table.dropna(subset=["params", "bits"])
    if len(known):
        print(f"# {len(table)} layers, {int(known.params.sum())} params, {int(known.bits.sum())} bits: "
              f"{known.bits.sum() / known.params.sum():.4f} effective bits")  # fmt: skip
    print("# " + ", ".join(f"{fmt}: {count}" for fmt, count in table.format.value_counts().items()))
    return 0


def cmd_plan_diff(args: argparse.Namespace) -> int:
    from autoq.plan import load_plan

    a, b = load_plan(args.a), load_plan(args.b)
    rows = []
    for name in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layers.get(name), b.layers.get(name)
        if la is None or lb is None or la.format != lb.format:
            rows.append({"layer": name, "a": la.format if la else "-", "b": lb.format if lb else "-",
                         "bits_a": la.bits if la else None, "bits_b": lb.bits if lb else None})  # fmt: skip
    import pandas as pd

    print(pd.DataFrame(rows, columns=["layer", "a", "b", "bits_a", "bits_b"]).to_string(index=False) if rows else "# identical formats")
    for label, plan in (("a", a), ("b", b)):
        bits = plan.achieved.get("searched_effective_bits")
        print(f"# {label}: {len(plan.layers)} layers" + (f", {bits:.4f} effective bits" if bits is not None else ""))
    print(f"# {len(rows)} layer(s) differ")
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
        args.out.write_text(text + "\n")
    return 0


def cmd_plan_import(args: argparse.Namespace) -> int:
    from autoq.formats import FORMATS
    from autoq.interop.modelopt import plan_formats_from_checkpoint
    from autoq.plan import LayerPlan, Plan, creation_info
    from autoq.verify import logical_shape, read_headers

    formats = plan_formats_from_checkpoint(args.checkpoint)
    headers = read_headers(args.checkpoint)
    layers = {}
    for name, fmt in formats.items():
        shape = headers.get(f"{name}.weight")
        if shape is None:  # e.g. a tied lm_head stored only as the embedding
            continue
        out_f, in_f = logical_shape(FORMATS[fmt], shape.shape)
        layers[name] = LayerPlan(format=fmt, params=out_f * in_f, bits=FORMATS[fmt].storage_bits(out_f, in_f))
    plan = Plan(layers=layers, model={"id": str(args.checkpoint)}, created={**creation_info(), "imported_from": str(args.checkpoint)})
    if args.out is None:
        import json

        print(json.dumps(plan.to_json(), indent=2))
    else:
        plan.save(args.out)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from autoq.checkpoint import checkpoint_formats
    from autoq.verify import read_quant_config, reference_errors, verify_checkpoint

    formats = checkpoint_formats(args.checkpoint)
    report = verify_checkpoint(args.checkpoint, formats)
    problems = list(report.problems)
    if args.runtime == "vllm":
        from autoq.interop.vllm import vllm_problems

        config = json.loads((args.checkpoint / "config.json").read_text()) if (args.checkpoint / "config.json").is_file() else {}
        problems += [f"vllm: {p}" for p in vllm_problems(read_quant_config(args.checkpoint), config.get("quantization_config"))]
    errors = reference_errors(args.checkpoint, formats, args.model) if args.model else {}
    for name, fmt in formats.items():
        line = f"{name:60s} {fmt:9s} {report.layer_bits.get(name, 0) / max(1, report.layer_params.get(name, 1)):6.3f} bits"
        if name in errors:
            line += f"  rel.err {errors[name]:.4f}"
        print(line)
    print(f"# {len(formats)} quantized layers, {report.effective_bits:.4f} bits per weight as stored")
    for problem in problems:
        print(f"autoq: verify: {problem}", file=sys.stderr)
    if problems:
        print(f"autoq: verify: {len(problems)} problem(s) in {args.checkpoint}", file=sys.stderr)
        return 1
    print(f"# {args.checkpoint}: OK")
    return 0


def _calibration_size(args: argparse.Namespace) -> tuple[int, int]:
    """--calib-samples and --seq-len, or where not given, ``DEFAULT_CALIBRATION`` for the device."""
    samples, seq_len = DEFAULT_CALIBRATION["cuda" if (args.device or _default_device()).startswith("cuda") else "cpu"]
    return (samples if args.calib_samples is None else args.calib_samples, seq_len if args.seq_len is None else args.seq_len)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoqError as err:
        print(f"autoq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoq: interrupted; finished scoring chunks are cached, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
