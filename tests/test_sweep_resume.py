"""Sweeps: resume only under the same configuration, every row checked before any runs, failed
rows recorded while the sweep goes on, ModelOpt re-solved over storable formats only."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import autoq.sweep
from autoq.cli import main
from autoq.formats import FORMATS

FAST = ["--calib-samples", "8", "--seq-len", "64", "--eval-samples", "4", "--tasks", "ppl,kl", "--no-progress"]


def _sweep(model: Path, out: Path, *extra: str) -> int:
    return main(["sweep", "--model", str(model), "--space", "fp8_w4a8", "--out", str(out), *FAST, *extra])


@pytest.fixture
def evaluated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Row ids evaluate_row is called for (it still runs)."""
    calls: list[str] = []
    original = autoq.sweep.evaluate_row

    def spy(row, *args, **kwargs):
        calls.append(row.id)
        return original(row, *args, **kwargs)

    monkeypatch.setattr(autoq.sweep, "evaluate_row", spy)
    return calls


def _results(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "results.csv").set_index("row")


def test_resume_reuses_rows_only_under_the_same_configuration(
    tiny_llama: Path, tmp_path: Path, evaluated: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    assert _sweep(tiny_llama, out, "--bits", "6", "--baselines", "bf16") == 0
    assert sorted(evaluated) == ["autoq-6", "bf16"]
    first = _results(out)
    evaluated.clear()
    assert _sweep(tiny_llama, out, "--bits", "6", "--baselines", "bf16") == 0
    assert evaluated == []  # same configuration: both rows reused
    capsys.readouterr()
    # Other held-out data (8 samples, not 4): every row's result would differ, so every row runs again.
    assert main(["sweep", "--model", str(tiny_llama), "--space", "fp8_w4a8", "--out", str(out), "--bits", "6",
                 "--baselines", "bf16", *FAST[:4], "--eval-samples", "8", *FAST[6:]]) == 0  # fmt: skip
    assert sorted(evaluated) == ["autoq-6", "bf16"]
    err = capsys.readouterr().err
    assert "2 finished row(s) are not reused, because the configuration changed (evaluation, heldout)" in err
    second = _results(out)
    assert second.loc["autoq-6", "ppl"] != first.loc["autoq-6", "ppl"]
    info = json.loads((out / "sweep.json").read_text())
    assert info["config_key"]["heldout"]["samples"] == 8 and info["complete"] is True


def test_every_row_is_checked_before_any_runs(
    tiny_llama_odd: Path, tmp_path: Path, evaluated: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # A uniform baseline that ignores shapes: W4A8 on layers whose 192 inputs INT4 groups of 128 cannot hold.
    monkeypatch.setattr(autoq.sweep, "uniform_formats", lambda choices, fmt: {c.name: fmt for c in choices})
    capsys.readouterr()
    assert _sweep(tiny_llama_odd, tmp_path / "sweep", "--bits", "8", "--baselines", "bf16,fp8,w4a8") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoq: error: 1 sweep row(s) cannot be applied to this model: uniform-W4A8: ")
    assert "cannot be stored as W4A8" in err[-1]
    assert evaluated == []  # nothing ran before the check
    assert not list((tmp_path / "sweep" / "rows").glob("*.json"))


def test_a_failed_row_is_recorded_and_the_sweep_goes_on(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    original = autoq.sweep.evaluate_row

    def out_of_memory_on_fp8(row, *args, **kwargs):
        if row.id == "uniform-FP8":
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(row, *args, **kwargs)

    monkeypatch.setattr(autoq.sweep, "evaluate_row", out_of_memory_on_fp8)
    out = tmp_path / "sweep"
    capsys.readouterr()
    assert _sweep(tiny_llama, out, "--bits", "6", "--baselines", "bf16,fp8") == 0
    assert "sweep row uniform-FP8 failed: RuntimeError: CUDA out of memory (simulated)" in capsys.readouterr().err
    results = _results(out)
    assert results.loc["uniform-FP8", "status"] == "failed"
    assert results.loc["uniform-FP8", "error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert (results.drop("uniform-FP8").status == "ok").all() and results.drop("uniform-FP8").kl.notna().all()
    assert json.loads((out / "sweep.json").read_text())["complete"] is False
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "CUDA out of memory (simulated)" in (tmp_path / "report" / "report.md").read_text()

    calls = []
    monkeypatch.setattr(autoq.sweep, "evaluate_row", lambda row, *a, **k: calls.append(row.id) or original(row, *a, **k))
    assert _sweep(tiny_llama, out, "--bits", "6", "--baselines", "bf16,fp8") == 0
    assert calls == ["uniform-FP8"]  # only the failed row runs again
    assert (_results(out).status == "ok").all() and json.loads((out / "sweep.json").read_text())["complete"] is True


def test_modelopt_is_resolved_over_formats_each_layer_can_store(tiny_llama_odd: Path, tmp_path: Path) -> None:
    """ModelOpt's search offers W4A8 to layers with 192 inputs; its re-solve at honest bits must not
    pick it (the sweep used to die there: "cannot be stored as W4A8"), and the row says so."""
    out = tmp_path / "sweep"
    assert _sweep(tiny_llama_odd, out, "--bits", "7.5", "--baselines", "modelopt") == 0
    record = json.loads((out / "rows" / "modelopt-7.5.json").read_text())
    assert record["status"] == "ok"
    assert record["modelopt_note"].startswith("re-solved over the formats each layer can store; ModelOpt also offered W4A8 for ")
    plan = json.loads((out / "plans" / "modelopt-7.5.json").read_text())["layers"]
    shapes = {f"model.layers.{b}.{n}": shape for b in (0, 1) for n, shape in
              {"self_attn.q_proj": (192, 192), "self_attn.o_proj": (192, 192), "mlp.gate_proj": (384, 192), "mlp.down_proj": (192, 384)}.items()}  # fmt: skip
    assert all(FORMATS[plan[name]["format"]].supports(*shape) for name, shape in shapes.items())
    assert "W4A8" in {plan[f"model.layers.{b}.mlp.down_proj"]["format"] for b in (0, 1)}  # where it fits, it is used


def test_streamed_rows_reuse_the_search_state_and_match_modelopt_rows(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--engine stream writes each row's checkpoint file to file from the search's calibration state:
    no row is calibrated again (ModelOpt's apply never runs), the stored bits equal the ModelOpt
    engine's, and so do the measured metrics, but for the FP8 codes ModelOpt's exporter rounds twice
    (bf16 division before the E4M3 cast: ~3% of codes one step apart, tests/test_export.py)."""
    assert _sweep(tiny_llama, tmp_path / "modelopt", "--bits", "6", "--baselines", "bf16,fp8,w4a8", "--engine", "modelopt") == 0
    monkeypatch.setattr(autoq.sweep, "apply_plan", lambda *a, **k: pytest.fail("a streamed sweep calibrated a row with ModelOpt"))
    # With ModelOpt's search too, which quantizes the loaded model in place: the rows after it must
    # still measure against the unquantized model (read again), so the BF16 row's ppl is unchanged.
    assert _sweep(tiny_llama, tmp_path / "stream", "--bits", "6", "--baselines", "bf16,fp8,w4a8,modelopt", "--engine", "stream") == 0
    modelopt, stream = _results(tmp_path / "modelopt"), _results(tmp_path / "stream")
    assert stream.loc["modelopt-6", "export_engine"] == "stream" and (stream.status == "ok").all()
    stream = stream.drop(index="modelopt-6")
    assert list(stream.index) == list(modelopt.index)
    assert stream.loc["bf16", "ppl"] == modelopt.loc["bf16", "ppl"]
    quantized = [row for row in stream.index if row != "bf16"]
    assert (stream.loc[quantized, "export_engine"] == "stream").all() and (modelopt.loc[quantized, "export_engine"] == "modelopt").all()
    pd.testing.assert_series_equal(stream.stored_bits, modelopt.stored_bits)
    assert stream.loc["bf16", "kl"] == modelopt.loc["bf16", "kl"]
    for row in quantized:  # each row's loss as either engine exports it, within 10% of each other
        assert stream.loc[row, "kl"] == pytest.approx(modelopt.loc[row, "kl"], rel=0.1), row
        assert stream.loc[row, "kl"] > 1e-5, row  # and is a real loss (the BF16 row measures 0)


def test_a_float32_sweep_of_a_bf16_model_writes_bf16_checkpoints(tiny_llama: Path, tmp_path: Path) -> None:
    """--dtype float32 (fast on CPUs without native bf16) computes the bf16 weights in float32; every
    row's checkpoint is still written as the source stores it, so sizes are the deployable ones: the
    BF16 row is exactly the source's bytes, and the FP8 row fewer (not a float32 copy of the rest)."""
    out = tmp_path / "sweep"
    assert _sweep(tiny_llama, out, "--bits", "6", "--baselines", "bf16,fp8", "--dtype", "float32") == 0
    results = _results(out)
    source_bytes = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    assert results.loc["bf16", "size_bytes"] == pytest.approx(source_bytes, rel=0.01)
    assert results.loc["uniform-FP8", "size_bytes"] < source_bytes  # a float32 copy of the rest would be larger
    assert (results.loc[["autoq-6", "uniform-FP8"], "export_engine"] == "stream").all()
