"""How stable is the plan as the calibration shrinks? Evidence for the CPU calibration default.

On the default model (SmolLM2-135M-Instruct, bf16 dequantized from its Q4_1 GGUF), the default
search space and the bundled calibration text, every calibration size ``SxL`` (S sequences of L
tokens) is scored on the CPU and solved at each budget. Against the plan from the reference size
(64 x 512, the GPU default) it reports the share of searched layers (and of their weights) given
the same format, and, at the first budget, the measured KL to BF16 of both plans: each plan applied
with ModelOpt (same apply calibration for all: the first ``--apply-samples`` reference sequences)
and measured on ``--heldout-samples`` sequences of 512 tokens right after the reference slice,
which no calibration size reads. Scores are cached (``--cache-dir``): a rerun only adds sizes.

    python benchmarks/cpu_calibration_study.py --out reports/benchmarks/cpu_calibration_stability.csv
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the autoq CLI does: see autoq.cli

import pandas as pd
import torch


def search(spec: str, budgets: list[float], cache_dir: Path) -> dict:
    from autoq import pipeline
    from autoq.sensitivity import ScoringOptions

    samples, seq_len = (int(v) for v in spec.split("x"))
    work = pipeline.prepare(None, "default", "default", samples, seq_len)
    scores = pipeline.score(work, ScoringOptions(device="cpu", progress=False), cache_dir=cache_dir)
    plans, _ = pipeline.make_plans(work, scores, budgets, "fisher")
    params = {c.name: c.params for c in work.choices}
    return {"work": work, "params": params, "plans": {b: plan.formats() for b, plan in zip(budgets, plans)}}


def agreement(plan: dict[str, str], reference: dict[str, str], params: dict[str, int]) -> tuple[float, float]:
    """Share of searched layers, and of their weights, with the reference plan's format (BF16 if unplanned)."""
    same = [name for name in params if plan.get(name, "BF16") == reference.get(name, "BF16")]
    return len(same) / len(params), sum(params[n] for n in same) / sum(params.values())


def measured_kl(work, formats: dict[str, str], apply_samples: int, heldout_samples: int) -> float:
    from autoq.apply import apply_plan
    from autoq.evaluate import heldout_tokens, mean_kl
    from autoq.model import load_model

    heldout = heldout_tokens(work.calibration, work.tokenizer, heldout_samples).batches(4)
    apply_batches = work.calibration.tokens[:apply_samples].split(4)
    reference = load_model(work.source, device="cpu")
    model = apply_plan(load_model(work.source, device="cpu"), formats, list(apply_batches), progress=False)
    return mean_kl(reference, model, heldout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="64x512")
    parser.add_argument("--sizes", default="4x512,8x512,16x512,8x256,16x256,32x256,8x128,16x128,32x128")
    parser.add_argument("--budgets", default="4.8,6")
    parser.add_argument("--apply-samples", type=int, default=8)
    parser.add_argument("--heldout-samples", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=None, help="score cache (default: $AUTOQ_CACHE)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/cpu_calibration_stability.csv"))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    reference = search(args.reference, budgets, args.cache_dir)
    ref_work, kl_budget = reference["work"], budgets[0]
    kls = {}  # plan -> measured KL, each distinct plan applied once

    def kl_of(formats: dict[str, str]) -> float:
        key = tuple(sorted(formats.items()))
        if key not in kls:
            kls[key] = measured_kl(ref_work, formats, args.apply_samples, args.heldout_samples)
        return kls[key]

    rows = []
    for spec in [args.reference, *args.sizes.split(",")]:
        result = reference if spec == args.reference else search(spec, budgets, args.cache_dir)
        samples, seq_len = (int(v) for v in spec.split("x"))
        for budget in budgets:
            plan, ref_plan = result["plans"][budget], reference["plans"][budget]
            layers, weights = agreement(plan, ref_plan, reference["params"])
            row = {
                "calibration": spec, "tokens": samples * seq_len, "budget_bits": budget,
                "same_format_layers": round(layers, 4), "same_format_weights": round(weights, 4),
            }  # fmt: skip
            if budget == kl_budget:
                row |= {"kl": kl_of(plan), "reference_kl": kl_of(ref_plan)}
            rows.append(row)
            print(row, flush=True)
        table = pd.DataFrame(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    (args.out.with_suffix(".txt")).write_text(
        f"model: {ref_work.source.name} ({ref_work.source.weights_from}); data: bundled corpus; space: default; "
        f"objective: fisher; KL at {kl_budget:g} bits on {args.heldout_samples} x {ref_work.calibration.tokens.shape[1]} held-out tokens "
        f"after the {args.reference} reference slice, plans applied with ModelOpt calibrated on the first "
        f"{args.apply_samples} reference sequences; machine: {machine}\n"
    )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
