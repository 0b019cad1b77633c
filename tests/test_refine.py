"""autoq refine and frontier --measured on a tiny random Llama: budget, trial 0, resume, exactness, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from autoq.cli import main
from autoq.plan import load_plan
from autoq.refine import affordable_formats, bit_price, complete_choice, rank_groups, refined_rows, storage_url
from autoq.solver import Options, solve
from autoq.workspace import read_run

BUDGET = 5.0
DATA = ["--calib-samples", "8", "--seq-len", "64"]
MEASURE = ["--eval-samples", "4", "--no-progress"]
STUDY = f"refine-{BUDGET:g}bits-kl"


@pytest.fixture(scope="module")
def run_dir(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refine")
    argv = ["search", "--model", str(tiny_llama), "--bits", f"{BUDGET:g}", "--out", str(root / "run"), "--cache-dir", str(root / "cache"),
            "--no-progress", *DATA]  # fmt: skip
    assert main(argv) == 0
    return root / "run"


@pytest.fixture(scope="module")
def refined(run_dir: Path) -> Path:
    """The run directory after `autoq refine --trials 10`."""
    assert main(["refine", str(run_dir), "--trials", "10", "--groups", "4", *MEASURE]) == 0
    return run_dir


def _study(run_dir: Path, name: str = STUDY) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(run_dir))


def _ilp(run_dir: Path) -> dict[str, str]:
    return solve(read_run(run_dir).options, BUDGET).choice


def test_every_trial_respects_the_budget(refined: Path) -> None:
    options = read_run(refined).options
    ilp = _ilp(refined)
    trials = pd.read_csv(refined / f"refine-{BUDGET:g}bits-kl" / "trials.csv")
    assert len(trials) == 10 and set(trials.state) <= {"COMPLETE", "PRUNED"}
    for trial in _study(refined).trials:
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert "bits" in trial.user_attrs["pruned"]  # says why: the bits the searched groups leave
            continue
        choice = {**ilp, **trial.user_attrs["changes"]}
        used = sum(b[f.index(choice[g])] for g, f, b in zip(options.groups, options.formats, options.bits))
        assert used <= BUDGET * options.params
        assert trial.user_attrs["bits"] == pytest.approx(used / options.params)
    assert (trials.bits.dropna() <= BUDGET).all()


def test_trial_zero_is_the_ilp_plan_and_equals_autoq_eval(refined: Path, tiny_llama: Path, tmp_path: Path) -> None:
    study = _study(refined)
    first = study.trials[0]
    ilp = _ilp(refined)
    assert first.user_attrs["changes"] == {} and first.params == {g: ilp[g] for g in first.params}
    table = read_run(refined).table
    assert load_plan(refined / "plan.json").formats() == {layer: ilp[g] for layer, g in zip(table.layer, table.group)}
    best = min((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    # The switched model computes exactly what apply_plan computes: trial 0 (the search's own plan) and the
    # best trial (a mixed plan) measure bit for bit what `autoq eval --plan` measures on the same tokens.
    for plan, trial in ((refined / "plan.json", first), (refined / f"plan-refined-{BUDGET:g}bits.json", best)):
        out = tmp_path / f"{plan.stem}.json"
        argv = ["eval", "--plan", str(plan), "--model", str(tiny_llama), "--tasks", "kl,ppl", "--out", str(out), *DATA, *MEASURE]
        assert main(argv) == 0
        metrics = json.loads(out.read_text())["metrics"]
        assert metrics["kl"] == trial.user_attrs["kl"] and metrics["ppl"] == trial.user_attrs["ppl"], plan.name


def test_several_plans_in_one_eval_measure_what_each_alone_measures(refined: Path, tiny_llama: Path, tmp_path: Path) -> None:
    """`autoq eval --plan A --plan B` calibrates each format once for both plans (a switchable model)
    and still measures each plan bit for bit as `--plan A` alone does (trial 0 and the best trial)."""
    study = _study(refined)
    best = min((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.value)
    plans = [refined / "plan.json", refined / f"plan-refined-{BUDGET:g}bits.json"]
    assert load_plan(plans[0]).formats() != load_plan(plans[1]).formats()
    out = tmp_path / "both.json"
    argv = ["eval", "--plan", str(plans[0]), "--plan", str(plans[1]), "--model", str(tiny_llama), "--tasks", "kl,ppl", "--out", str(out),
            *DATA, *MEASURE]  # fmt: skip
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert [r["plan"] for r in records] == [str(p) for p in plans]
    for record, trial in zip(records, (study.trials[0], best)):
        assert record["metrics"]["kl"] == trial.user_attrs["kl"] and record["metrics"]["ppl"] == trial.user_attrs["ppl"]


def test_plans_of_other_layers_cannot_be_evaluated_together(refined: Path, tiny_llama: Path, tmp_path: Path, capsys) -> None:
    plan = load_plan(refined / "plan.json")
    fewer = tmp_path / "fewer.json"
    plan.layers.pop(next(iter(plan.layers)))
    plan.save(fewer)
    out = tmp_path / "out.json"
    argv = ["eval", "--plan", str(refined / "plan.json"), "--plan", str(fewer), "--model", str(tiny_llama), "--out", str(out), *DATA, *MEASURE]
    assert main(argv) == 2
    assert "plans other layers" in capsys.readouterr().err and not out.exists()


def test_refined_plan_names_its_source_and_both_slices(refined: Path) -> None:
    plan = load_plan(refined / f"plan-refined-{BUDGET:g}bits.json")
    achieved = plan.achieved
    assert achieved["source"] == "refine" and achieved["searched_effective_bits"] <= BUDGET
    info = achieved["refine"]
    assert info["trial0"]["number"] == 0 and info["best"]["kl"] <= info["trial0"]["kl"]
    assert info["search_slice"]["skip_samples"] == 8 and info["unseen_slice"]["skip_samples"] == 8 + 4
    assert info["search_slice"]["fingerprint"] != info["unseen_slice"]["fingerprint"]
    assert all(info["unseen"][p]["kl"] > 0 for p in ("ilp", "refined"))
    assert (refined / f"refine-{BUDGET:g}bits-kl" / "history.png").stat().st_size > 0
    (row,) = refined_rows(refined)  # what `autoq sweep` evaluates next to the other rows
    assert (row.id, row.method, row.budget, row.formats) == (f"refine-{BUDGET:g}", "autoq refine", BUDGET, plan.formats())
    assert row.notes["kl_unseen_refined"] == info["unseen"]["refined"]["kl"]


def test_resume_continues_the_same_study_without_repeating_trials(refined: Path) -> None:
    before = {t.number: (t.params, t.value, t.datetime_start) for t in _study(refined).trials}
    killed = _study(refined).ask()  # a trial left RUNNING, as by a killed refine
    assert main(["refine", str(refined), "--trials", "13", "--groups", "4", *MEASURE]) == 0
    study = _study(refined)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 13
    assert study.trials[killed.number].state == optuna.trial.TrialState.FAIL
    for number, (params, value, started) in before.items():  # earlier trials untouched, not run again
        trial = study.trials[number]
        assert (trial.params, trial.value, trial.datetime_start) == (params, value, started)
    measured = {}
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            key = json.dumps(trial.user_attrs["changes"], sort_keys=True)
            # A plan seen before is looked up, not measured again.
            assert (key in measured) == ("duplicate_of" in trial.user_attrs)
            measured.setdefault(key, trial.number)
    assert main(["refine", str(refined), "--trials", "13", "--groups", "3", *MEASURE]) == 2  # other settings: no silent mix


def test_bad_arguments_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = {
        "--trials must be positive": ["refine", str(run_dir), "--trials", "0"],
        "is infeasible": ["refine", str(run_dir), "--bits", "1.0"],
        "no scores.parquet": ["refine", str(tmp_path)],
        "--groups must be positive": ["refine", str(run_dir), "--groups", "0"],
        "--trials must be positive (got -1)": ["frontier", str(run_dir), "--measured", "--trials", "-1"],
    }
    for message, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("autoq: error: ") and message in err[0], err


def _options() -> Options:
    """Four groups of 100 weights; formats with honest-looking bits and made-up scores."""
    fmts = ["BF16", "FP8", "NVFP4"]
    bits = np.array([1600.0, 800.0, 450.0])
    scores = {"a": [0, 1.0, 1.02], "b": [0, 1.0, 9.0], "c": [0, 0.1, 2.0], "d": [0, 3.0, 3.3]}
    return Options(list(scores), [fmts] * 4, [np.array(s) for s in scores.values()], [bits] * 4, 400)


def test_complete_choice_is_the_best_completion_within_budget() -> None:
    options = _options()
    budget = 5.5
    ilp = solve(options, budget).choice
    index = {g: i for i, g in enumerate(options.groups)}

    def cost(choice, what):
        return sum(getattr(options, what)[index[g]][options.formats[index[g]].index(f)] for g, f in choice.items())

    assert complete_choice(options, {"a": ilp["a"], "b": ilp["b"]}, ilp, budget) == ilp
    for fa, fb in itertools.product(options.formats[0], repeat=2):
        got = complete_choice(options, {"a": fa, "b": fb}, ilp, budget)
        fits = [dict(zip("cd", rest)) for rest in itertools.product(options.formats[0], repeat=2)
                if cost({"a": fa, "b": fb, **dict(zip("cd", rest))}, "bits") <= budget * options.params]  # fmt: skip
        if not fits:
            assert isinstance(got, str) and "bits" in got
            continue
        assert cost(got, "bits") <= budget * options.params and got["a"] == fa and got["b"] == fb
        assert cost(got, "scores") == pytest.approx(min(cost({"a": fa, "b": fb, **r}, "scores") for r in fits))


def test_rank_groups_puts_the_group_at_the_budgets_margin_first() -> None:
    options = _options()
    # 6 bits x 400 weights = 2400 bits: all NVFP4 takes 1800, so one group (not two) can be FP8 (+350); BF16
    # (+1150) fits nowhere. The ILP gives FP8 to b (gain 8); the LP relaxation spends the 250 bits left
    # on c, the next best gain per bit (1.9 / 350): that is the price of a bit at this budget.
    assert bit_price(options, 6.0) == pytest.approx(1.9 / 350)
    assert affordable_formats(options, 6.0, ["a"]) == {"a": ["FP8", "NVFP4"]}
    ranking = rank_groups(options, 6.0, solve(options, 6.0).choice).set_index("group")
    assert list(ranking.index) == ["c", "d", "b", "a"]
    assert ranking.loc["c", "margin"] == pytest.approx(0, abs=1e-9)  # c is the coin toss at this budget
    # a's scores are close (1.0 vs 1.02), but FP8's 350 extra bits are worth 1.9 at the margin: a is sure.
    assert ranking.loc["a", "regret"] == pytest.approx(-0.02 + 1.9)
    assert ranking.loc["b", ["chosen", "runner_up"]].tolist() == ["FP8", "NVFP4"]


def test_measured_frontier_starts_from_the_ilp_plans(run_dir: Path) -> None:
    budgets = [4.6, 5.0, 6.0]
    argv = ["frontier", str(run_dir), "--measured", "--trials", "6", "--bits", ",".join(map(str, budgets)), *MEASURE]
    assert main(argv) == 0
    table = pd.read_csv(run_dir / "frontier-measured-kl.csv")
    assert len(table) == 6 and (run_dir / "frontier-measured-kl.png").stat().st_size > 0
    assert sorted(table.ilp_budget.dropna()) == budgets  # the proxy's plans, measured
    front = table[table.pareto]
    for row in front.itertuples():  # nothing measured dominates a front point
        assert not ((table.bits <= row.bits) & (table.value < row.value)).any()


def test_packed_variants_measure_bit_for_bit_what_dense_ones_do_in_a_fraction_of_the_memory(tiny_llama: Path) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from autoq.measure import HeldoutSlice, SwitchableModel

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (2, 64), generator=generator) for _ in range(2)]
    heldout = HeldoutSlice(model, batches, {})
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    candidates = dict.fromkeys(layers, ["BF16", "FP8", "NVFP4"])
    dense = SwitchableModel(copy.deepcopy(model), candidates, batches, progress=False, pack=False)
    packed = SwitchableModel(copy.deepcopy(model), candidates, batches, progress=False, pack=True)
    for fmt, index_dtypes in (("FP8", {torch.uint8}), ("NVFP4", {torch.uint8, torch.int16})):  # NVFP4: up to ~1,900 values
        for name in layers:
            weight, ours = dense._variants[name][fmt].weight, packed._variants[name][fmt].packed_weight
            assert ours.index.dtype in index_dtypes and ours.nbytes < weight.nbytes * (0.3 if fmt == "FP8" else 0.55)
            assert torch.equal(ours.unpack().view(torch.int32), weight.view(torch.int32))  # the very bits
    plan = {name: ("BF16", "FP8", "NVFP4")[i % 3] for i, name in enumerate(layers)}
    assert heldout.measure(packed.use(plan)) == heldout.measure(dense.use(plan))
    assert heldout.measure(packed.use(dict.fromkeys(layers, "NVFP4"))) == heldout.measure(dense.use(dict.fromkeys(layers, "NVFP4")))


def test_packing_keeps_every_bit_and_declines_where_it_saves_nothing() -> None:
    import torch

    from autoq.measure import PackedWeight

    values = torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([0.0, -0.0, float("nan"), float("inf")])])
    tensor = values[torch.randint(0, len(values), (256, 256), generator=torch.Generator().manual_seed(0))]
    packed = PackedWeight.pack(tensor)
    assert packed.index.dtype == torch.int16 and packed.nbytes < tensor.nbytes * 0.6
    assert torch.equal(packed.unpack().view(torch.int32), tensor.view(torch.int32))  # -0.0 and NaN included
    assert PackedWeight.pack(torch.randn(300, 300)) is None  # 90,000 distinct values
    assert PackedWeight.pack(tensor[:4, :100]) is None  # a table of 1,004 values for 400 elements
    assert PackedWeight.pack(torch.randn(64, 64).bfloat16()) is None  # bf16: an int16 index would save nothing


def test_copies_are_packed_when_dense_ones_would_take_over_half_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from autoq import measure

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64))
    candidates = {"0": ["BF16", "FP8", "NVFP4"], "1": ["BF16", "FP8"]}
    dense = 3 * 64 * 32 * 4  # bytes of the three quantized float32 copies
    for free, packed in ((2 * dense + 8, False), (2 * dense - 8, True), (None, False)):
        monkeypatch.setattr(measure, "available_memory_bytes", lambda device, free=free: free)
        assert measure._should_pack(model, candidates) is packed, free
