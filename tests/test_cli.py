"""End to end through the CLI: search, export, cache reuse, frontier, apply, and every user error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autoq.checkpoint import read_quant_config
from autoq.cli import main
from autoq.formats import FORMATS
from autoq.model import TIED_HEAD_REASON
from autoq.plan import load_plan
from autoq.verify import verify_checkpoint

FAST = ["--calib-samples", "8", "--seq-len", "64", "--no-progress"]


def safetensors_header(directory: Path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape, data_offsets), read straight from the files."""
    header = {}
    for shard in directory.glob("*.safetensors"):
        with shard.open("rb") as handle:
            header |= json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    header.pop("__metadata__", None)
    return header


def stored_tensor_bits(checkpoint: Path) -> dict[str, int]:
    """Bits of every tensor's data as the safetensors files lay them out (byte offsets, not dtypes)."""
    bits = {name: 8 * (info["data_offsets"][1] - info["data_offsets"][0]) for name, info in safetensors_header(checkpoint).items()}
    assert 8 * sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) - sum(bits.values()) < 8 * 2**16  # only headers left
    return bits


def _search(model: Path, out: Path, *extra: str) -> int:
    return main(["search", "--model", str(model), "--space", "fp8_w4a8", "--out", str(out), *FAST, *extra])


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
def test_search_and_export_end_to_end(model_fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    out, checkpoint = tmp_path / "run", tmp_path / "ckpt"
    assert _search(model_dir, out, "--bits", "4.8", "--export", str(checkpoint)) == 0

    plan = load_plan(out / "plan.json")
    assert plan.achieved["searched_effective_bits"] <= 4.8
    quantized = {name: layer.format for name, layer in plan.layers.items() if layer.format != "BF16"}
    assert len(set(quantized.values())) >= 2, "4.8 bits over FP8/W4A8/BF16 should mix formats"

    quant = read_quant_config(checkpoint)
    assert quant["quant_algo"] == "MIXED_PRECISION"
    assert {name: cfg["quant_algo"] for name, cfg in quant["quantized_layers"].items()} == {
        name: FORMATS[fmt].hf_quant_algo for name, fmt in quantized.items()
    }
    # Bits as stored: each plan layer's bits are its tensors' bytes in the files (its bias, unquantized,
    # counts with the rest of the model), plus the AWQ pre-scale (16 bits per input channel) that the
    # plan counts and the exporter folds into a norm.
    report = verify_checkpoint(checkpoint, plan.formats())
    assert report.problems == []
    tensor_bits = stored_tensor_bits(checkpoint)
    reference_shapes = {name: info["shape"] for name, info in safetensors_header(model_dir).items()}
    for name, layer in plan.layers.items():
        in_features = reference_shapes[f"{name}.weight"][1]
        stored = sum(bits for key, bits in tensor_bits.items() if key.rpartition(".")[0] == name and not key.endswith(".bias"))
        folded = FORMATS[layer.format].awq and f"{name}.pre_quant_scale" not in tensor_bits
        assert layer.bits == stored + (16 * in_features if folded else 0), name
        assert report.layer_bits[name] == stored, name
    assert report.effective_bits <= plan.achieved["searched_effective_bits"] <= 4.8
    for required in ("config.json", "tokenizer.json", "model.safetensors", "autoq_plan.json"):
        assert (checkpoint / required).is_file()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_llama_tied"])
def test_plan_model_bits_equal_the_checkpoints_bytes(
    model_fixture: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With lm_head searched: a tied head is skipped (saying why), an untied one quantized, and either
    way the plan's whole-model bits are exactly the exported checkpoint's tensor bytes."""
    model_dir = request.getfixturevalue(model_fixture)
    space = _write(tmp_path / "head.yaml", "formats: [NVFP4, FP8, BF16]\nsearch_lm_head: true\n")
    out, checkpoint = tmp_path / "run", tmp_path / "ckpt"
    argv = ["search", "--model", str(model_dir), "--space", str(space), "--out", str(out), "--bits", "4.6", "--export", str(checkpoint)]
    assert main([*argv, *FAST]) == 0
    plan = load_plan(out / "plan.json")
    tied = model_fixture.endswith("tied")
    assert ("lm_head" in plan.layers) is not tied
    assert (f"lm_head is not searched: {TIED_HEAD_REASON}" in capsys.readouterr().err) is tied
    if not tied:
        assert plan.layers["lm_head"].format == "NVFP4"
    stored = sum(stored_tensor_bits(checkpoint).values())
    assert stored / plan.achieved["total_params"] == plan.achieved["model_effective_bits"]
    assert plan.achieved["model_effective_bits"] < 16 * 0.75  # and the plan saves what it claims


def test_quantizing_a_tied_lm_head_is_refused(tiny_llama_tied: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plan = _write(tmp_path / "plan.json", _plan({"lm_head": "FP8"}))
    assert main(["apply", str(plan), "--model", str(tiny_llama_tied), "--export", str(tmp_path / "ckpt"), *FAST]) == 2
    assert capsys.readouterr().err.strip() == f"autoq: error: plan quantizes lm_head, which cannot be: {TIED_HEAD_REASON}"
    assert not (tmp_path / "ckpt").exists()


def test_search_export_failure_leaves_neither_output(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--out and --export appear together or not at all: here the export fails its verification."""
    import autoq.apply
    import autoq.export
    from autoq.verify import VerifyReport

    for engine in (autoq.apply, autoq.export):  # either engine's export
        monkeypatch.setattr(engine, "verify_checkpoint", lambda *a, **k: VerifyReport(problems=["simulated damage"]))
    out, checkpoint = tmp_path / "run", tmp_path / "ckpt"
    assert _search(tiny_llama, out, "--bits", "4.8", "--export", str(checkpoint)) == 2
    assert "autoq: error: exported checkpoint failed verification: simulated damage" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rerun_with_other_bits_reuses_scores_without_model_work(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _search(tiny_llama, tmp_path / "first", "--bits", "4.8") == 0
    from transformers import LlamaForCausalLM

    import autoq.pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("model work on a cached rerun")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)
    monkeypatch.setattr(autoq.pipeline, "load_model", forbidden)
    assert _search(tiny_llama, tmp_path / "second", "--bits", "6,5.5") == 0
    summary = json.loads((tmp_path / "second" / "search.json").read_text())
    assert summary["scores_from_cache"] is True
    assert load_plan(tmp_path / "second" / "plan-6bits.json").achieved["searched_effective_bits"] <= 6
    assert load_plan(tmp_path / "second" / "plan-5.5bits.json").achieved["searched_effective_bits"] <= 5.5


def test_search_calibrates_on_fewer_tokens_on_a_cpu(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from autoq.cli import DEFAULT_CALIBRATION

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    out = tmp_path / "run"
    argv = ["search", "--bits", "6", "--model", str(tiny_llama), "--space", "fp8_w4a8", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(out)]) == 0
    calibration = json.loads((out / "search.json").read_text())["calibration"]
    assert (calibration["samples"], calibration["seq_len"]) == DEFAULT_CALIBRATION["cpu"] != DEFAULT_CALIBRATION["cuda"]
    assert main([*argv, "--out", str(tmp_path / "given"), "--calib-samples", "3", "--seq-len", "32"]) == 0
    given = json.loads((tmp_path / "given" / "search.json").read_text())["calibration"]
    assert (given["samples"], given["seq_len"]) == (3, 32)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # waiting OpenMP threads yield their core


def test_frontier_from_a_search(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _search(tiny_llama, tmp_path / "run", "--bits", "5") == 0
    capsys.readouterr()
    assert main(["frontier", str(tmp_path / "run"), "--bits", "4.5,6,8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# ") and "budget_bits" in lines[1]
    scores = [float(line.split()[2]) for line in lines[2:]]
    assert len(scores) == 3 and scores[0] >= scores[1] >= scores[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _plan(layers: dict[str, str]) -> str:
    return json.dumps({"schema": "autoq.plan", "version": 1, "layers": {n: {"format": f} for n, f in layers.items()}})


def test_apply_a_hand_written_plan(tiny_llama: Path, tmp_path: Path) -> None:
    layers = {f"model.layers.0.self_attn.{p}_proj": "FP8" for p in "qkv"} | {"model.layers.1.mlp.down_proj": "W4A8"}
    plan = _write(tmp_path / "plan.json", _plan(layers))
    assert main(["apply", str(plan), "--model", str(tiny_llama), "--export", str(tmp_path / "ckpt"), *FAST]) == 0
    quant = read_quant_config(tmp_path / "ckpt")
    assert {n: c["quant_algo"] for n, c in quant["quantized_layers"].items()} == {
        n: FORMATS[f].hf_quant_algo for n, f in layers.items()
    }


ERRORS = {
    "missing model path": (["search", "--bits", "4.8", "--model", "/no/such/model"], "does not exist"),
    "unknown format in space": (["search", "--bits", "4.8", "--space", "{space_fp6}"], "unknown format 'FP6'"),
    "bad yaml": (["search", "--bits", "4.8", "--space", "{space_bad_yaml}"], "invalid YAML"),
    "no quantizable layers": (["search", "--bits", "4.8", "--space", "{space_empty}"], "selects no quantizable linear layers"),
    "infeasible budget": (["search", "--bits", "2"], "infeasible: the cheapest assignment needs"),
    "not a causal LM": (["search", "--bits", "4.8", "--model", "{t5}"], "not a causal LM"),
    "output exists": (["search", "--bits", "4.8", "--out", "{existing}"], "already exists"),
    "plan names missing layer": (["apply", "{plan_missing_layer}"], "does not have: model.layers.99.mlp.down_proj"),
    "plan unknown format": (["apply", "{plan_fp6}"], "unknown format 'FP6'"),
    "corrupt plan": (["apply", "{plan_corrupt}"], "not valid JSON"),
    "fused layers disagree": (["apply", "{plan_split_qkv}"], "must share a format"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_line_and_write_nothing(
    case: str, tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import T5Config

    t5 = tmp_path / "t5"  # an encoder-decoder: not loadable as a causal LM
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(t5)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    files = {
        "t5": t5,
        "existing": existing,
        "space_fp6": _write(tmp_path / "fp6.yaml", "formats: [FP6, BF16]\n"),
        "space_bad_yaml": _write(tmp_path / "bad.yaml", "formats: [FP8\n  - :\n"),
        "space_empty": _write(tmp_path / "empty.yaml", "formats: [FP8, BF16]\ninclude: ['*nothing*']\n"),
        "plan_missing_layer": _write(tmp_path / "p1.json", _plan({"model.layers.99.mlp.down_proj": "FP8"})),
        "plan_fp6": _write(tmp_path / "p2.json", _plan({"model.layers.0.mlp.down_proj": "FP6"})),
        "plan_corrupt": _write(tmp_path / "p3.json", '{"schema": "autoq.plan", "version": 1, "layers": {'),
        "plan_split_qkv": _write(
            tmp_path / "p4.json",
            _plan({"model.layers.0.self_attn.q_proj": "FP8", "model.layers.0.self_attn.k_proj": "W4A8", "model.layers.0.self_attn.v_proj": "FP8"}),
        ),
    }
    argv, message = ERRORS[case]
    argv = [a.format(**files) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_llama)]
    out = tmp_path / "out"
    if argv[0] == "search" and "--out" not in argv:
        argv += ["--out", str(out)]
    if argv[0] == "apply":
        argv += ["--export", str(out)]
    capsys.readouterr()
    assert main([*argv, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoq: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not out.exists()
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
