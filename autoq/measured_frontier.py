"""``autoq frontier RUN --measured``: the accuracy / size trade-off as measured, not as estimated.

An optuna multi-objective study (NSGA-II, seeded) over every group with a choice, minimising
(stored bits per searched weight, measured metric on the searched held-out slice). Its first
generation is the ILP plans at a grid of budgets (the proxy's frontier), so the measured front
starts from the proxy's plans and the search then recombines and mutates them. Trials share
``RUN_DIR/refine.db`` (study ``frontier-<metric>``) and resume like ``autoq refine``.

Outputs in the run directory: ``frontier-measured-<metric>.csv`` (one row per trial, with
``pareto``) and ``frontier-measured-<metric>.png`` (measured front beside the proxy's frontier).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from autoq.cache import _atomic_write
from autoq.refine import check_study_args, enqueue_missing, open_study, run_trials, study_settings
from autoq.report import pareto_front
from autoq.solver import frontier, solve
from autoq.workspace import ModelSettings, open_workspace, read_run

GRID_POINTS = 12  # ILP budgets seeding the first generation when no --bits are given


@dataclass
class MeasuredFrontier:
    trials: pd.DataFrame
    front: pd.DataFrame
    csv_path: Path
    plot_path: Path


def measured_frontier(
    run_dir: Path,
    trials: int = 60,
    metric: str = "kl",
    budgets: list[float] | None = None,
    seed: int = 0,
    settings: ModelSettings | None = None,
    restart: bool = False,
) -> MeasuredFrontier:
    check_study_args(trials, metric)
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    options = run.options
    low, high = options.min_bits(), options.max_bits()
    budgets = sorted(budgets or [low + (high - low) * k / (GRID_POINTS - 1) for k in range(GRID_POINTS)])
    ilp = {b: solve(options, b).choice for b in budgets}  # fails for a budget below the minimum
    searchable = {g: f for g, f in zip(options.groups, options.formats) if len(f) > 1}
    fixed = {g: f[0] for g, f in zip(options.groups, options.formats) if len(f) == 1}

    settings = settings or ModelSettings()
    attrs = {"metric": metric, "seed": seed, "scores": run.fingerprint, **study_settings(run, settings)}
    study = open_study(run_dir, f"frontier-{metric}", ["minimize", "minimize"], attrs, restart)
    ws = open_workspace(run, settings)
    population = max(4, len(budgets))
    study.sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed + len(study.trials))
    enqueue_missing(study, [{g: ilp[b][g] for g in searchable} for b in budgets])
    seed_budget = {json.dumps({g: ilp[b][g] for g in searchable}, sort_keys=True): b for b in budgets}
    cache: dict[str, tuple[int, dict[str, float]]] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        cache.setdefault(json.dumps(trial.params, sort_keys=True), (trial.number, {m: trial.user_attrs[m] for m in ("kl", "ppl")}))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        start = time.perf_counter()
        choice = {g: trial.suggest_categorical(g, f) for g, f in searchable.items()}
        key = json.dumps(choice, sort_keys=True)
        if key in cache:
            trial.set_user_attr("duplicate_of", cache[key][0])
        else:
            cache[key] = (trial.number, ws.measure({**choice, **fixed}, ws.search))
        bits = ws.bits({**choice, **fixed})
        trial.set_user_attr("bits", bits)
        trial.set_user_attr("seconds", time.perf_counter() - start)
        for m, value in cache[key][1].items():
            trial.set_user_attr(m, value)
        if key in seed_budget:
            trial.set_user_attr("ilp_budget", seed_budget[key])
        return bits, cache[key][1][metric]

    run_trials(study, objective, trials, None, ws.settings.progress, "autoq frontier --measured")
    table = _trials_table(study)
    done = table[table.state == "COMPLETE"].reset_index(drop=True)
    done["pareto"] = False
    done.loc[pareto_front(done.bits.to_numpy(), done.value.to_numpy(), True), "pareto"] = True
    proxy = pd.read_csv(run_dir / "frontier.csv") if (run_dir / "frontier.csv").is_file() else frontier(options, budgets)
    csv_path, plot_path = run_dir / f"frontier-measured-{metric}.csv", run_dir / f"frontier-measured-{metric}.png"
    _atomic_write(csv_path, lambda p: done.to_csv(p, index=False))
    _atomic_write(plot_path, lambda p: plot_measured_frontier(done, proxy, metric, p, ws.title, ws.search.description))
    front = done[done.pareto].sort_values("bits")[["number", "bits", "value", "ilp_budget"]]
    return MeasuredFrontier(done, front, csv_path, plot_path)


def _trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        rows.append({
            "number": trial.number, "state": trial.state.name, "bits": trial.values[0], "value": trial.values[1],
            "kl": attrs.get("kl"), "ppl": attrs.get("ppl"), "seconds": attrs.get("seconds"),
            "ilp_budget": attrs.get("ilp_budget"), "duplicate_of": attrs.get("duplicate_of"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["number", "state", "bits", "value", "kl", "ppl", "seconds", "ilp_budget", "duplicate_of"])


def plot_measured_frontier(trials: pd.DataFrame, proxy: pd.DataFrame, metric: str, path: Path, title: str, heldout: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (measured, estimated) = plt.subplots(1, 2, figsize=(12, 4.6))
    measured.scatter(trials.bits, trials.value, s=12, color="#bbbbbb", label="trial")
    seeds = trials.dropna(subset=["ilp_budget"]).sort_values("bits")
    measured.plot(seeds.bits, seeds.value, "o-", color="#c44e52", label="ILP plans (proxy frontier), measured")
    front = trials[trials.pareto].sort_values("bits")
    measured.step(front.bits, front.value, where="post", color="black", linewidth=1.5, label="measured Pareto front")
    if metric == "kl" and (trials.value > 0).all():
        measured.set_yscale("log")
    tokens = heldout["samples"] * heldout["seq_len"]
    measured.set_ylabel({"kl": "mean token KL to BF16 (nats)", "ppl": "perplexity"}[metric] + f", {tokens} held-out tokens")
    estimated.plot(proxy.achieved_bits, proxy.total_score, "o-", color="#4c72b0", markersize=4, label="ILP (frontier.csv)")
    estimated.set_yscale("log" if (proxy.total_score > 0).all() else "linear")
    estimated.set_ylabel("proxy: total score (estimated loss increase)")
    for ax, name in ((measured, "measured"), (estimated, "proxy")):
        ax.set_xlabel("effective bits per weight, searched layers (scales included)")
        ax.set_title(f"{name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if len(trials):
        measured.set_xlim(np.nanmin(trials.bits) - 0.2, np.nanmax(trials.bits) + 0.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
