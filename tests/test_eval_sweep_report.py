"""autoq eval / sweep / report on a tiny model: lm-eval MMLU offline, proxies, baselines, plots."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from autoq.cli import main

FAST = ["--calib-samples", "8", "--seq-len", "64", "--eval-samples", "8", "--no-progress"]
SUBJECTS = ("abstract_algebra", "world_religions", "college_physics")


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eval data holding a miniature MMLU in the original layout: mmlu/<split>/<subject>_<split>.csv, no header."""
    data = tmp_path_factory.mktemp("eval_data")
    root = data / "mmlu"
    for split, rows in (("dev", 5), ("val", 2), ("test", 6)):
        (root / split).mkdir(parents=True)
        for subject in SUBJECTS:
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as handle:
                writer = csv.writer(handle)
                for i in range(rows):
                    writer.writerow([f"{subject} question {i}, with a comma?", f"one {i}", f"two, {i}", f"three {i}", f"four {i}", "ABCD"[i % 4]])
    return data


def _plan(tmp_path: Path, fmt: str, layers: list[str]) -> Path:
    path = tmp_path / f"plan-{fmt}.json"
    path.write_text(json.dumps({"schema": "autoq.plan", "version": 1, "layers": {n: {"format": fmt} for n in layers}}))
    return path


LAYERS = [f"model.layers.{b}.{m}" for b in (0, 1) for m in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip


def _eval(model: Path, out: Path, *extra: str) -> dict:
    assert main(["eval", "--model", str(model), "--out", str(out), *FAST, *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("few_shot", [5, 0])
def test_eval_runs_lm_eval_mmlu_from_local_csvs(tiny_llama: Path, eval_data: Path, tmp_path: Path, few_shot: int) -> None:
    result = _eval(tiny_llama, tmp_path / "r.json", "--tasks", "mmlu", "--eval-data", str(eval_data),
                   "--num-fewshot", str(few_shot), "--limit", "4")  # fmt: skip
    (run,) = result["lm_eval"]
    assert run["num_fewshot"] == few_shot and run["tasks"] == {"mmlu": "autoq_mmlu"}
    raw = run["results"]
    assert {f"autoq_mmlu_{s}" for s in SUBJECTS} <= set(raw)
    for subject in SUBJECTS:
        assert 0.0 <= raw[f"autoq_mmlu_{subject}"]["acc,none"] <= 1.0
    assert 0.0 <= result["metrics"]["mmlu_acc"] <= 1.0
    assert run["groups"]["autoq_mmlu"]["acc,none"] == pytest.approx(result["metrics"]["mmlu_acc"])


def test_bf16_plan_is_lossless_and_quantized_plans_are_not(tiny_llama: Path, tmp_path: Path) -> None:
    reference = _eval(tiny_llama, tmp_path / "ref.json")["metrics"]
    bf16 = _eval(tiny_llama, tmp_path / "bf16.json", "--plan", str(_plan(tmp_path, "BF16", LAYERS)))["metrics"]
    assert bf16["kl"] == pytest.approx(0.0, abs=1e-6) and bf16["ppl"] == pytest.approx(reference["ppl"], rel=1e-6)
    for fmt in ("NVFP4", "W4A8"):
        quantized = _eval(tiny_llama, tmp_path / f"{fmt}.json", "--plan", str(_plan(tmp_path, fmt, LAYERS)))["metrics"]
        assert quantized["kl"] > 1e-4 and quantized["ppl"] != reference["ppl"], fmt


BUDGETS = (4.6, 6.0)


@pytest.fixture(scope="module")
def sweep_dir(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "run"
    argv = ["sweep", "--model", str(tiny_llama), "--space", "fp8_w4a8", "--bits", ",".join(map(str, BUDGETS)), "--out", str(out), *FAST]
    assert main(argv) == 0
    return out


def test_sweep_has_every_budget_and_baseline(sweep_dir: Path) -> None:
    results = pd.read_csv(sweep_dir / "results.csv")
    expected = {"bf16", "uniform-FP8", "uniform-W4A8", "uniform-NVFP4"} | {f"autoq-{b:g}" for b in BUDGETS} | {f"modelopt-{b:g}" for b in BUDGETS}
    assert set(results.row) == expected and len(results) == len(expected)
    assert (results.size_bytes > 0).all()
    bf16 = results.set_index("row").loc["bf16"]
    assert bf16.kl == pytest.approx(0.0, abs=1e-6) and bf16.searched_bits == 16  # measured: the reloaded BF16 export
    assert (results[results.row != "bf16"].kl > 1e-5).all()  # every quantized row, through the same path
    for budget in BUDGETS:
        for method in ("autoq", "modelopt"):
            assert results.set_index("row").loc[f"{method}-{budget:g}"].searched_bits <= budget
    # Checkpoint sizes follow the stored bit counts (up to safetensors header bytes).
    for _, a in results.iterrows():
        for _, b in results.iterrows():
            if a.stored_bits < b.stored_bits - 0.05:
                assert a.size_bytes < b.size_bytes, (a.row, b.row)


def test_bf16_row_kl_is_measured_through_the_same_evaluation(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The BF16 row's KL comes from the evaluation stage on its reloaded export, like every row's (never a constant)."""
    import autoq.evaluate
    from autoq.data import load_tokens
    from autoq.evaluate import EvalSpec
    from autoq.model import ModelSource, load_model, load_tokenizer
    from autoq.sweep import Row, evaluate_row

    source = ModelSource(tiny_llama, "tiny")
    reference, tokenizer = load_model(source), load_tokenizer(source)
    heldout = load_tokens("default", tokenizer, 2, 64)
    calls = []
    real_kl = autoq.evaluate.mean_kl

    def spy(ref, model, batches):
        calls.append(model)
        return real_kl(ref, model, batches) + 0.25  # an offset only a computed value carries

    monkeypatch.setattr(autoq.evaluate, "mean_kl", spy)
    row = Row("bf16", "BF16", None, {name: "BF16" for name in LAYERS})
    record = evaluate_row(row, reference, tokenizer, [], heldout, EvalSpec(batch_size=2), None, progress=False)
    assert len(calls) == 1 and calls[0] is not reference  # the exported, reloaded checkpoint
    assert record["kl"] == pytest.approx(0.25, abs=1e-6) and record["stored_bits"] == 16.0


def test_autoq_beats_uniform_lowest_format_at_same_or_more_bits(sweep_dir: Path) -> None:
    results = pd.read_csv(sweep_dir / "results.csv").set_index("row")
    uniform = results.loc["uniform-W4A8"]
    for budget in BUDGETS:
        autoq = results.loc[f"autoq-{budget:g}"]
        assert autoq.searched_bits >= uniform.searched_bits
        assert autoq.kl <= uniform.kl


def test_sweep_resumes_from_finished_rows(sweep_dir: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoq.sweep

    finished = sorted(p.name for p in (sweep_dir / "rows").glob("*.json"))
    (sweep_dir / "rows" / "autoq-6.json").unlink()  # as if killed before this row finished
    evaluated = []
    original = autoq.sweep.evaluate_row
    monkeypatch.setattr(autoq.sweep, "evaluate_row", lambda row, *a, **k: (evaluated.append(row.id), original(row, *a, **k))[1])
    argv = ["sweep", "--model", str(tiny_llama), "--space", "fp8_w4a8", "--bits", ",".join(map(str, BUDGETS)), "--out", str(sweep_dir), *FAST]
    assert main(argv) == 0
    assert evaluated == ["autoq-6"]
    assert sorted(p.name for p in (sweep_dir / "rows").glob("*.json")) == finished


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None


def test_report_plots_and_html_table_match_the_csv(sweep_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["report", str(sweep_dir), "--out", str(out)]) == 0
    for png in ("ppl_vs_bits.png", "kl_vs_bits.png", "format_map.png", "sensitivity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{png}" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    parser = _Tables()
    parser.feed(page)
    header, *body = parser.rows
    csv_table = pd.read_csv(out / "results.csv")
    assert header == list(csv_table.columns)
    assert len(body) == len(csv_table) == len(pd.read_csv(sweep_dir / "results.csv"))
    for cells, (_, row) in zip(body, csv_table.iterrows()):
        for cell, value in zip(cells, row):
            if isinstance(value, float):
                assert (cell == "" and pd.isna(value)) or float(cell) == pytest.approx(value, rel=1e-5)
            else:
                assert cell == str(value)


def test_report_on_gguf_weights_states_their_origin_and_caveat(sweep_dir: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    info = json.loads((copy / "sweep.json").read_text())
    info["model"].update(weights_from="dequantized from GGUF x.gguf: linear weights Q4_1 (4-bit asymmetric, g32)", caveat="on a 4-bit grid")
    (copy / "sweep.json").write_text(json.dumps(info))
    assert main(["report", str(copy), "--out", str(tmp_path / "report")]) == 0
    head = (tmp_path / "report" / "report.md").read_text().split("\n|")[0]  # the text above the results table
    assert "Model weights dequantized from GGUF x.gguf: linear weights Q4_1 (4-bit asymmetric, g32). **Caveat:** on a 4-bit grid." in head
    assert "Q4_1 (4-bit asymmetric, g32)" in (tmp_path / "report" / "report.html").read_text()


def test_every_registry_format_has_its_own_colour_and_none_is_left_out_of_the_plots(tmp_path: Path) -> None:
    from autoq.formats import FORMATS
    from autoq.report import FORMAT_COLORS, plot_format_maps, sensitivity_table

    assert set(FORMAT_COLORS) == set(FORMATS) and len(set(FORMAT_COLORS.values())) == len(FORMAT_COLORS)
    layers = ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    formats = ["BF16", "MXFP8", "W4A16_NVFP4", "NVFP4", "FUTURE_FMT"]
    scores = pd.DataFrame([{"layer": n, "block": int(n.split(".")[2]), "format": f, "score": 1.0 + i}
                           for n in layers for i, f in enumerate(formats)])  # fmt: skip
    assert list(sensitivity_table(scores).columns) == ["MXFP8", "W4A16_NVFP4", "NVFP4", "FUTURE_FMT"]
    plan = dict(zip(layers, ["MXFP8", "W4A16_NVFP4", "FUTURE_FMT"]))
    plot_format_maps({"widened": plan}, scores, tmp_path / "map.png", "t")  # an unknown name used to raise ValueError
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
