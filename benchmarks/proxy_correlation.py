"""Does the sensitivity proxy predict real loss? Predicted total score against measured KL, over plans.

For one search (or sweep) directory and one budget, this draws random feasible plans (the exact
solver on random per-group scores, so every plan sits at the budget), adds the ILP plan of each
objective and ModelOpt's plan where the sweep has one, and for every plan records

* its predicted total score under each objective's score table (``--run`` for fisher, ``--kl-run``
  for ``--objective kl``: the sum of its groups' scores in their chosen formats), and
* its measured mean token KL to the BF16 model on held-out tokens that neither calibration nor any
  search saw (the ``unseen`` slice of ``autoq refine``: after the calibration and searched slices).

Plans are measured with ``autoq.measure.SwitchableModel`` (each layer quantized once per format by
``apply_plan``; a plan only switches modules), which equals ``autoq eval --plan`` bit for bit.
It writes ``<out>/plans.csv``, ``<out>/summary.json`` (Spearman's rho per objective, the ILP plan's rank)
and ``<out>/scatter.png``.

    python benchmarks/proxy_correlation.py --run runs/sweep-smollm2 --kl-run runs/search-smollm2-kl \\
        --bits 4.8 --plans 30 --out reports/proxy-smollm2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from autoq.plan import load_plan
from autoq.solver import Options, solve
from autoq.workspace import ModelSettings, open_workspace, read_run


def predicted(options: Options, choice: dict[str, str]) -> float:
    """Total score of a group -> format choice under one score table."""
    return float(sum(s[f.index(choice[g])] for g, f, s in zip(options.groups, options.formats, options.scores)))


def random_choices(options: Options, budget: float, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct feasible plans at ``budget``: the exact solver on log-uniform random scores."""
    rng = np.random.default_rng(seed)
    plans: list[dict[str, str]] = []
    for _ in range(count * 20):
        scores = [np.exp(rng.uniform(-8, 0, size=len(s))) for s in options.scores]
        choice = solve(replace(options, scores=scores), budget).choice
        if choice not in plans:
            plans.append(choice)
        if len(plans) == count:
            break
    return plans


def choice_of_plan(path: Path, layer_group: dict[str, str]) -> dict[str, str]:
    """Group -> format of a plan file (every layer of a group shares one format)."""
    choice: dict[str, str] = {}
    for layer, entry in load_plan(path).layers.items():
        if layer in layer_group:
            choice[layer_group[layer]] = entry.format
    return choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="search or sweep directory scored with --objective fisher")
    parser.add_argument("--kl-run", type=Path, default=None, help="the same model and data scored with --objective kl")
    parser.add_argument("--bits", type=float, default=4.8)
    parser.add_argument("--plans", type=int, default=30, help="random feasible plans")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=None, help="size of the slice refine would search (skipped here)")
    parser.add_argument("--unseen-samples", type=int, default=16, help="held-out sequences every plan is measured on")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="what the model computes in (default: the run's)")
    parser.add_argument("--label", default=None, help="machine description for the summary")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    run = read_run(args.run)
    tables = {"fisher": run.options}
    if args.kl_run is not None:
        kl_run = read_run(args.kl_run)
        if kl_run.options.groups != run.options.groups:
            raise SystemExit(f"{args.kl_run} has other groups than {args.run}")
        tables["kl"] = kl_run.options
    settings = ModelSettings(eval_samples=args.eval_samples, unseen_samples=args.unseen_samples, batch_size=args.batch_size,
                             device=args.device, dtype=args.dtype, progress=False)  # fmt: skip
    space = open_workspace(run, settings)
    named: list[tuple[str, dict[str, str]]] = [(f"ILP ({objective})", solve(options, args.bits).choice) for objective, options in tables.items()]
    modelopt = args.run / "plans" / f"modelopt-{args.bits:g}.json"
    if modelopt.is_file():
        named.append(("ModelOpt auto_quantize", choice_of_plan(modelopt, space.layer_group)))
    named += [(f"random {i}", c) for i, c in enumerate(random_choices(run.options, args.bits, args.plans, args.seed))]

    rows = []
    for label, choice in named:
        start = time.perf_counter()
        measured = space.measure(choice, space.unseen)
        rows.append({
            "plan": label, "bits": space.bits(choice), **{f"predicted_{o}": predicted(t, choice) for o, t in tables.items()},
            "measured_kl": measured["kl"], "measured_ppl": measured["ppl"], "seconds": time.perf_counter() - start,
            "formats": json.dumps(choice, sort_keys=True),
        })  # fmt: skip
        print(f"{label:24s} bits {rows[-1]['bits']:.4f}  kl {measured['kl']:.5f}  ({rows[-1]['seconds']:.1f} s)", flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "plans.csv", index=False)

    from scipy.stats import spearmanr

    ranks = table.measured_kl.rank(method="min").astype(int)
    summary = {
        "run": str(args.run), "kl_run": str(args.kl_run) if args.kl_run else None, "budget_bits": args.bits,
        "model": space.model_info, "machine": args.label or f"{platform.node()} ({platform.processor() or platform.machine()})",
        "heldout": space.unseen.description, "plans": len(table), "random_plans": int(table.plan.str.startswith("random").sum()),
        "spearman": {o: float(spearmanr(table[f"predicted_{o}"], table.measured_kl).statistic) for o in tables},
        "rank_by_measured_kl": {label: int(r) for label, r in zip(table.plan, ranks) if not label.startswith("random")},
        "measured_kl": {label: float(k) for label, k in zip(table.plan, table.measured_kl) if not label.startswith("random")},
        "best_random_kl": float(table[table.plan.str.startswith("random")].measured_kl.min()),
        "build_seconds": space.build_seconds, "seconds_per_plan": float(table.seconds.mean()),
    }  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("spearman", "rank_by_measured_kl", "measured_kl", "best_random_kl")}, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.5), squeeze=False)
    for ax, objective in zip(axes[0], tables):
        random = table[table.plan.str.startswith("random")]
        ax.scatter(random[f"predicted_{objective}"], random.measured_kl, s=18, color="#999999", label="random feasible plans")
        for (label, row), marker in zip(table[~table.plan.str.startswith("random")].set_index("plan").iterrows(), "o*s^"):
            ax.scatter(row[f"predicted_{objective}"], row.measured_kl, s=80, marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted total score ({objective})")
        ax.set_ylabel("measured KL to BF16 (unseen held-out tokens)")
        ax.set_title(f"{objective}: Spearman rho = {summary['spearman'][objective]:.3f}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{space.title} @ {args.bits:g} bits", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out / "scatter.png", dpi=120)


if __name__ == "__main__":
    main()
