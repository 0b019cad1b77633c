"""``autoq refine``: turn the proxy's best plan into the best plan as *measured*, with optuna.

The solver is exact for an additive proxy (per-layer scores) that ignores how layers' errors
interact. Refinement measures instead: every trial is a whole plan, applied to the model in memory
(``autoq.measure.SwitchableModel``: nothing is re-quantized per trial) and scored by the mean token
KL to the BF16 model (or perplexity) on held-out tokens.

* **Trial 0** is the ILP plan at the budget; next come the ILP plans at nearby budgets and the ILP
  plan with each searched group switched to its runner-up format.
* **Searched groups** are the K whose choice the proxy is least sure of (``rank_groups``): at the
  budget's exchange rate between score and bits (the dual price of the budget in the ILP's LP
  relaxation), the relative score error that would make another format as good.
* **Every other group** is re-solved with the ILP for the bits the searched groups leave
  (``complete_choice``), so every trial spends the budget and none exceeds it. Where the ILP's own
  choice is still optimal it is kept (so trial 0 *is* the ILP plan). A trial whose searched groups
  leave too few bits is pruned, with the reason.
* **The study** (TPE, seeded) lives in ``RUN_DIR/refine.db``: a killed refine resumes, counting
  finished trials against ``--trials``, and ``optuna-dashboard sqlite:///RUN_DIR/refine.db`` shows
  it (optuna-dashboard takes SQLite files as URLs).

Outputs: ``plan-refined-<bits>bits.json`` (``achieved.source`` = ``refine``; the metric of trial 0
and of the best trial on the searched slice and on a second, never-searched slice) and
``refine-<bits>bits-<metric>/`` with ``trials.csv``, ``history.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from scipy.optimize import linprog
from tqdm import tqdm

from autoq.cache import _atomic_write
from autoq.errors import AutoqError, atomic_output_dir
from autoq.pipeline import log
from autoq.solver import Options, solve
from autoq.workspace import ModelSettings, Run, Workspace, open_workspace, read_run, resolve_settings

METRICS = ("kl", "ppl")
DEFAULT_GROUPS = 12
NEARBY_BUDGETS = (-0.25, -0.1, -0.05, 0.05, 0.1, 0.25)  # bits around the budget whose ILP plans seed the study
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# ---------------------------------------------------------------------------------------------
# Which groups to search, and how to complete a partial choice within the budget


def bit_price(options: Options, budget: float) -> float:
    """Score per bit at the budget's margin: the budget constraint's dual price in the LP relaxation."""
    scores = np.concatenate(options.scores)
    bits = np.concatenate(options.bits)
    scale = max(float(scores.max()), 1e-300)
    pick_one = np.zeros((len(options.groups), len(scores)))
    start = 0
    for row, fmts in enumerate(options.formats):
        pick_one[row, start : start + len(fmts)] = 1
        start += len(fmts)
    result = linprog(
        scores / scale, A_ub=bits[None, :] / options.params, b_ub=[budget], A_eq=pick_one, b_eq=np.ones(len(options.groups)),
        bounds=(0, 1), method="highs",
    )  # fmt: skip
    if result.status != 0:
        return 0.0
    return max(0.0, -float(result.ineqlin.marginals[0])) * scale / options.params


def rank_groups(options: Options, budget: float, choice: dict[str, str]) -> pd.DataFrame:
    """Groups with a choice, least certain first.

    With ``price`` = ``bit_price`` and the group's chosen format c, switching to format f changes
    the Lagrangian cost by ``regret(f) = (score_f - score_c) + price * (bits_f - bits_c)`` (>= 0 for
    the LP optimum). ``margin = min_f |regret(f)| / (score_f + score_c)`` is the relative error in
    the group's scores that would make f as good as c: the smaller, the less certain the choice.
    Only formats that can fit the budget at all count (``affordable_formats``).
    """
    price = bit_price(options, budget)
    affordable = affordable_formats(options, budget, options.groups)
    rows = []
    for group, fmts, scores, bits in zip(options.groups, options.formats, options.scores, options.bits):
        if len(affordable[group]) < 2:
            continue
        c = fmts.index(choice[group])
        best: tuple[float, float, str] | None = None
        for k, fmt in enumerate(fmts):
            if k == c or fmt not in affordable[group]:
                continue
            regret = float(scores[k] - scores[c] + price * (bits[k] - bits[c]))
            scale = abs(float(scores[k])) + abs(float(scores[c]))
            margin = abs(regret) / scale if scale > 0 else math.inf
            if best is None or margin < best[0]:
                best = (margin, regret, fmt)
        rows.append({"group": group, "chosen": choice[group], "runner_up": best[2], "regret": best[1], "margin": best[0]})
    table = pd.DataFrame(rows, columns=["group", "chosen", "runner_up", "regret", "margin"])
    return table.sort_values(["margin", "group"], kind="stable").reset_index(drop=True)


def affordable_formats(options: Options, budget: float, groups: list[str]) -> dict[str, list[str]]:
    """Each group's formats that fit the budget with every other group at its cheapest format."""
    least = sum(float(b.min()) for b in options.bits)
    capacity = math.floor(budget * options.params)
    space = {}
    for group in groups:
        i = options.groups.index(group)
        space[group] = [f for f, b in zip(options.formats[i], options.bits[i]) if least - float(options.bits[i].min()) + float(b) <= capacity]
    return space


def complete_choice(options: Options, searched: dict[str, str], ilp: dict[str, str], budget: float) -> dict[str, str] | str:
    """A full group -> format choice with ``searched`` fixed and the rest re-solved for the bits left.

    Returns the reason as a string when no completion fits the budget.
    """
    index = {g: i for i, g in enumerate(options.groups)}

    def bits_of(group: str, fmt: str) -> float:
        i = index[group]
        return float(options.bits[i][options.formats[i].index(fmt)])

    capacity = math.floor(budget * options.params) - sum(bits_of(g, f) for g, f in searched.items())
    rest = [g for g in options.groups if g not in searched]
    if not rest:
        return dict(searched) if capacity >= 0 else "the searched groups alone exceed the budget"
    sub = Options(
        [g for g in rest], [options.formats[index[g]] for g in rest], [options.scores[index[g]] for g in rest],
        [options.bits[index[g]] for g in rest], options.params,
    )  # fmt: skip
    least = sum(float(b.min()) for b in sub.bits)
    if least > capacity:
        return f"the searched groups leave {capacity:.0f} bits; the other groups need at least {least:.0f}"
    solution = solve(sub, capacity / options.params)
    rest_choice = solution.choice
    ilp_bits = sum(bits_of(g, ilp[g]) for g in rest)
    ilp_score = sum(float(options.scores[index[g]][options.formats[index[g]].index(ilp[g])]) for g in rest)
    if ilp_bits <= capacity and ilp_score <= solution.total_score * (1 + 1e-12):
        rest_choice = {g: ilp[g] for g in rest}  # the ILP's choice is still optimal: keep it exactly
    if sum(bits_of(g, f) for g, f in rest_choice.items()) > capacity:
        return "the solver could not fit the other groups into the bits left"
    return {g: searched.get(g) or rest_choice[g] for g in options.groups}


# ---------------------------------------------------------------------------------------------
# Studies in RUN_DIR/refine.db, shared with `autoq frontier --measured`


def study_settings(run: Run, settings: ModelSettings) -> dict[str, Any]:
    """What a study's measurements depend on besides its own arguments (a resume must match them)."""
    s = resolve_settings(run, settings)
    return {k: getattr(s, k) for k in ("model", "calib", "calib_samples", "seq_len", "eval_samples", "batch_size", "dtype")}


def check_study_args(trials: int, metric: str) -> None:
    if trials <= 0:
        raise AutoqError(f"--trials must be positive (got {trials})")
    if metric not in METRICS:
        raise AutoqError(f"--metric must be one of {', '.join(METRICS)} (got {metric!r})")


def storage_url(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'refine.db').resolve()}"


def open_study(run_dir: Path, name: str, directions: list[str], attrs: dict[str, Any], restart: bool) -> optuna.Study:
    """Create or resume study ``name``; refuse to resume one made with other settings."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url(run_dir))
    if restart and name in {s.study_name for s in storage.get_all_studies()}:
        optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    stored = study.user_attrs.get("settings")
    if stored is not None and stored != json.loads(json.dumps(attrs)):
        differ = sorted(k for k in set(stored) | set(attrs) if stored.get(k) != json.loads(json.dumps(attrs.get(k))))
        raise AutoqError(f"{run_dir}/refine.db holds study '{name}' made with other settings ({', '.join(differ)}); "
                         "pass --restart to replace it")  # fmt: skip
    study.set_user_attr("settings", attrs)
    # A trial left RUNNING was killed with its process (one refine per study at a time): fail it.
    study_id = storage.get_study_id_from_name(name)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                       optuna.trial.TrialState.FAIL)  # fmt: skip
    return study


def enqueue_missing(study: optuna.Study, seeds: list[dict[str, str]]) -> None:
    """Enqueue each seed that no finished or waiting trial already has (so a resume adds none twice)."""
    states = (*FINISHED, optuna.trial.TrialState.WAITING)
    known = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False, states=states)]
    for seed in seeds:
        if seed not in known:
            study.enqueue_trial(seed)
            known.append(seed)


def run_trials(study: optuna.Study, objective: Callable, trials: int, timeout: float | None, progress: bool, desc: str) -> None:
    """Run trials until ``trials`` have finished in total (earlier runs count) or ``timeout`` passes."""
    done = len(study.get_trials(deepcopy=False, states=FINISHED))
    if done >= trials:
        log(f"study '{study.study_name}' already has {done} finished trials (--trials {trials}); nothing to run")
        return
    with tqdm(total=trials, initial=done, desc=desc, disable=not progress) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(objective, n_trials=trials - done, timeout=timeout, callbacks=[lambda _s, _t: bar.update(1)])


def measured_cache(study: optuna.Study) -> dict[str, tuple[int, dict[str, float]]]:
    """Plans measured by finished trials (key: their changes against the ILP) -> (trial, metrics)."""
    cache = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        key = json.dumps(trial.user_attrs["changes"], sort_keys=True)
        cache.setdefault(key, (trial.number, {m: trial.user_attrs[m] for m in METRICS}))
    return cache


# ---------------------------------------------------------------------------------------------
# autoq refine


@dataclass
class RefineResult:
    plan_path: Path
    out_dir: Path
    trials: pd.DataFrame
    summary: dict[str, Any]
    workspace: Workspace  # reusable for another budget of the same run


def check_budgets(run_dir: Path, budgets: list[float] | None) -> list[float]:
    """The budgets to refine (default: the run's only one), each checked feasible, before any model work."""
    run = read_run(run_dir)
    checked = [run.budget(b) for b in (budgets or [None])]
    for budget in checked:
        solve(run.options, budget)
    return checked


def refine(
    run_dir: Path,
    budget: float | None = None,
    trials: int = 100,
    metric: str = "kl",
    timeout: float | None = None,
    groups: int = DEFAULT_GROUPS,
    seed: int = 0,
    settings: ModelSettings | None = None,
    restart: bool = False,
    workspace: Workspace | None = None,
) -> RefineResult:
    """Refine the ILP plan of ``run_dir`` at ``budget`` by measured ``metric`` (see module doc).

    ``workspace`` (from ``open_workspace`` on the same run and ``settings``) lets several budgets
    share one model build.
    """
    run_dir = Path(run_dir)
    settings = settings or ModelSettings()
    check_study_args(trials, metric)
    if groups <= 0:
        raise AutoqError(f"--groups must be positive (got {groups})")
    run = read_run(run_dir)
    budget = run.budget(budget)
    ilp = solve(run.options, budget).choice  # raises for a budget below the minimum, before any model work
    ranking = rank_groups(run.options, budget, ilp)
    searched = list(ranking.group[:groups])
    if not searched:
        raise AutoqError(f"{run_dir}: no group has more than one candidate format; nothing to refine")
    space = affordable_formats(run.options, budget, searched)

    name = f"refine-{budget:g}bits-{metric}"
    attrs = {"budget": budget, "metric": metric, "searched": searched, "seed": seed, "scores": run.fingerprint,
             **study_settings(run, settings)}  # fmt: skip
    study = open_study(run_dir, name, ["minimize"], attrs, restart)
    ws = workspace or open_workspace(run, settings)
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), multivariate=True)  # a resume draws anew
    enqueue_missing(study, _seeds(run.options, budget, ilp, ranking.head(len(searched)), space))
    objective = _objective(ws, space, ilp, budget, metric, measured_cache(study))
    start = time.perf_counter()
    run_trials(study, objective, trials, timeout, ws.settings.progress, f"autoq refine {budget:g} bits")
    table = trials_table(study, searched)
    complete = table[table.state == "COMPLETE"]
    if not (complete.changed_groups == 0).any():
        raise AutoqError("the ILP plan (trial 0) has not been measured yet (is --timeout too short?)")
    ilp_row = complete[complete.changed_groups == 0].iloc[0]
    best_row = complete.loc[complete.value.idxmin()]
    best = {**ilp, **study.trials[int(best_row.number)].user_attrs["changes"]}
    unseen_ilp = ws.measure(ilp, ws.unseen)
    unseen = {"ilp": unseen_ilp, "refined": unseen_ilp if best == ilp else ws.measure(best, ws.unseen)}
    summary = {
        "metric": metric, "budget_bits": budget, "study": name, "storage": str(run_dir / "refine.db"),
        "searched_groups": ranking.head(len(searched)).assign(formats=[space[g] for g in searched]).to_dict(orient="records"),
        "trials": {state.lower(): int(n) for state, n in table.state.value_counts().items()}
        | {"duplicates": int(table.duplicate_of.notna().sum())},
        "trial0": {"number": int(ilp_row.number), "bits": float(ilp_row.bits), metric: float(ilp_row.value)},
        "best": {"number": int(best_row.number), "bits": float(best_row.bits), metric: float(best_row.value),
                 "changed_groups": int(best_row.changed_groups)},  # fmt: skip
        "search_slice": ws.search.description, "unseen_slice": ws.unseen.description, "unseen": unseen,
        "seconds": {"build": ws.build_seconds, "trials_this_run": time.perf_counter() - start,
                    "per_trial_mean": float(complete.seconds[complete.duplicate_of.isna()].mean())},  # fmt: skip
        "model": ws.model_info, "device": ws.device,
    }  # fmt: skip
    plan_path, out_dir = _write_outputs(ws, best, table, summary)
    return RefineResult(plan_path, out_dir, table, summary, ws)


def _objective(
    ws: Workspace, space: dict[str, list[str]], ilp: dict[str, str], budget: float, metric: str,
    cache: dict[str, tuple[int, dict[str, float]]],
) -> Callable[[optuna.Trial], float]:  # fmt: skip
    """A trial: pick the searched groups' formats, complete the plan within budget, measure it once."""

    def objective(trial: optuna.Trial) -> float:
        start, cpu_start = time.perf_counter(), time.process_time()
        picked = {g: trial.suggest_categorical(g, formats) for g, formats in space.items()}
        choice = complete_choice(ws.run.options, picked, ilp, budget)
        if isinstance(choice, str):
            trial.set_user_attr("pruned", choice)
            raise optuna.TrialPruned(choice)
        changes = {g: f for g, f in choice.items() if f != ilp[g]}
        key = json.dumps(changes, sort_keys=True)
        if key in cache:
            trial.set_user_attr("duplicate_of", cache[key][0])
        else:
            cache[key] = (trial.number, ws.measure(choice, ws.search))
        metrics = cache[key][1]
        trial.set_user_attr("changes", changes)
        trial.set_user_attr("bits", ws.bits(choice))
        trial.set_user_attr("seconds", time.perf_counter() - start)
        trial.set_user_attr("cpu_seconds", time.process_time() - cpu_start)  # all threads; on a shared machine
        for m in METRICS:
            trial.set_user_attr(m, metrics[m])
        return metrics[metric]

    return objective


def _write_outputs(ws: Workspace, best: dict[str, str], table: pd.DataFrame, summary: dict[str, Any]) -> tuple[Path, Path]:
    """The refined plan, and trials.csv / history.png / summary.json, each written atomically."""
    budget, metric, run_dir = summary["budget_bits"], summary["metric"], ws.run.dir
    plan = ws.plan(best, budget)
    plan.achieved.update(source="refine", refine={k: summary[k] for k in ("metric", "trial0", "best", "unseen", "search_slice", "unseen_slice")})
    out_dir = run_dir / f"refine-{budget:g}bits-{metric}"
    with atomic_output_dir(out_dir, overwrite=True) as tmp:
        table.to_csv(tmp / "trials.csv", index=False)
        tokens = ws.search.description["samples"] * ws.search.description["seq_len"]
        plot_history(table, metric, tmp / "history.png", f"{ws.title}: refine at {budget:g} bits ({tokens} searched held-out tokens)")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plan_path = run_dir / f"plan-refined-{budget:g}bits.json"
    _atomic_write(plan_path, plan.save)
    (run_dir / "rows" / f"refine-{budget:g}.json").unlink(missing_ok=True)  # a sweep re-evaluates the new plan
    return plan_path, out_dir


def _seeds(options: Options, budget: float, ilp: dict[str, str], ranking: pd.DataFrame, space: dict[str, list[str]]) -> list[dict[str, str]]:
    """Trial 0 (the ILP plan), ILP plans at nearby budgets, and each searched group at its runner-up
    (those within the searched formats ``space``)."""
    searched = list(ranking.group)
    seeds = [{g: ilp[g] for g in searched}]
    low, high = options.min_bits(), options.max_bits()
    for delta in NEARBY_BUDGETS:
        if low <= budget + delta <= high:
            choice = solve(options, budget + delta).choice
            seeds.append({g: choice[g] for g in searched})
    seeds += [{**seeds[0], row.group: row.runner_up} for row in ranking.itertuples()]
    inside = [s for s in seeds if all(f in space[g] for g, f in s.items())]
    return [s for i, s in enumerate(inside) if s not in inside[:i]]


def trials_table(study: optuna.Study, searched: list[str]) -> pd.DataFrame:
    """One row per finished trial: the searched groups' formats, bits, metrics, seconds."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (*FINISHED, optuna.trial.TrialState.FAIL):
            continue
        attrs = trial.user_attrs
        rows.append({
            "number": trial.number, "state": trial.state.name, "value": trial.value,
            "bits": attrs.get("bits"), "kl": attrs.get("kl"), "ppl": attrs.get("ppl"), "seconds": attrs.get("seconds"),
            "cpu_seconds": attrs.get("cpu_seconds"),
            "changed_groups": len(attrs["changes"]) if "changes" in attrs else None,
            "duplicate_of": attrs.get("duplicate_of"), "pruned": attrs.get("pruned"),
            **{g: trial.params.get(g) for g in searched},
        })  # fmt: skip
    table = pd.DataFrame(rows, columns=["number", "state", "value", "bits", "kl", "ppl", "seconds", "cpu_seconds", "changed_groups",
                                        "duplicate_of", "pruned", *searched])  # fmt: skip
    return table.astype({"changed_groups": "Int64", "duplicate_of": "Int64"})


def plot_history(table: pd.DataFrame, metric: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table.state == "COMPLETE"].sort_values("number")
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.scatter(done.number, done.value, s=14, color="#4c72b0", label="trial")
    ax.step(done.number, done.value.cummin(), where="post", color="#c44e52", label="best so far")
    ilp = done[done.changed_groups == 0]
    if len(ilp):
        ax.axhline(ilp.value.iloc[0], color="gray", linestyle="--", linewidth=1, label="ILP plan (trial 0)")
    pruned = table[table.state == "PRUNED"]
    if len(pruned):
        ax.scatter(pruned.number, [done.value.max()] * len(pruned), marker="x", color="gray", s=14, label="pruned (no fit)")
    if metric == "kl":
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel({"kl": "mean token KL to BF16 (nats), searched slice", "ppl": "perplexity, searched slice"}[metric])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refined_rows(run_dir: Path) -> list:
    """Sweep rows (method ``autoq refine``) for the refined plans in a sweep directory.

    ``autoq sweep`` evaluates them like every other row. Their ``kl`` is measured on the slice the
    refinement searched on, so each row also carries ``kl_unseen_ilp`` / ``kl_unseen_refined``
    from the plan (the ILP and refined plans on the slice it never saw).
    """
    from autoq.plan import load_plan
    from autoq.sweep import Row

    rows = []
    for path in sorted(Path(run_dir).glob("plan-refined-*bits.json")):
        plan = load_plan(path)
        budget = float(plan.budget["effective_bits"])
        unseen = plan.achieved.get("refine", {}).get("unseen", {})
        rows.append(Row(f"refine-{budget:g}", "autoq refine", budget, plan.formats(), {f"kl_unseen_{k}": v["kl"] for k, v in unseen.items()}))
    return rows
