"""Every subcommand, given missing, empty and wrong-typed arguments: exit 2, exactly one line on
stderr (``autoq: error: ...``), no traceback, nothing written (working directory and cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoq.cli import main

FAST = ["--calib-samples", "8", "--seq-len", "64", "--no-progress"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")

# (argv, text the one error line must contain). {model}: a tiny model, {plan}: a valid plan,
# {empty}: an empty file, {dir}: an empty directory, {out}: a path that must stay absent.
CASES: dict[str, tuple[list[str], str]] = {
    "no command": ([], "required: command"),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
    # search
    "search without --bits": (["search"], "required: --bits"),
    "search --bits empty": (["search", "--bits", ""], "argument --bits"),
    "search --bits text": (["search", "--bits", "abc"], "argument --bits"),
    "search --bits negative": (["search", "--bits", "-1"], "argument --bits"),
    "search --batch-size 0": (["search", "--bits", "4.8", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    "search --batch-size text": (["search", "--bits", "4.8", "--batch-size", "x"], "argument --batch-size: expected a positive integer"),
    "search --calib-samples -1": (["search", "--bits", "4.8", "--calib-samples", "-1"], "argument --calib-samples"),
    "search --seq-len empty": (["search", "--bits", "4.8", "--seq-len", ""], "argument --seq-len"),
    "search --chunk-steps 0": (["search", "--bits", "4.8", "--chunk-steps", "0"], "argument --chunk-steps"),
    "search --dtype int8": (["search", "--bits", "4.8", "--dtype", "int8"], "argument --dtype: invalid choice"),
    "search --objective": (["search", "--bits", "4.8", "--objective", "mse"], "argument --objective: invalid choice"),
    "search --device cuda": (["search", "--bits", "4.8", "--model", "{model}", "--device", "cuda"], "CUDA is not available"),
    "search --device tpu": (["search", "--bits", "4.8", "--model", "{model}", "--device", "tpu"], "--device"),
    "search --device empty": (["search", "--bits", "4.8", "--model", "{model}", "--device", ""], "--device"),
    "search --model missing": (["search", "--bits", "4.8", "--model", "/no/such/model"], "does not exist"),
    "search --model empty": (["search", "--bits", "4.8", "--model", ""], "--model is empty"),
    "search --model a file": (["search", "--bits", "4.8", "--model", "{empty}"], "no config.json"),
    "search --space empty": (["search", "--bits", "4.8", "--model", "{model}", "--space", ""], "search space ''"),
    "search --space missing": (["search", "--bits", "4.8", "--model", "{model}", "--space", "/no/space.yaml"], "neither a file nor a built-in"),
    "search --space empty file": (["search", "--bits", "4.8", "--model", "{model}", "--space", "{empty}"], "expected a mapping"),
    "search --calib missing": (["search", "--bits", "4.8", "--model", "{model}", "--calib", "/no/such.txt"], "/no/such.txt"),
    "search --calib empty": (["search", "--bits", "4.8", "--model", "{model}", "--calib", ""], "--calib"),
    "search --calib empty file": (["search", "--bits", "4.8", "--model", "{model}", "--calib", "{empty_txt}"], "has 1 tokens"),
    "search --export two budgets": (["search", "--bits", "4,5", "--model", "{model}", "--export", "{out}"], "exactly one --bits"),
    # frontier
    "frontier without run": (["frontier"], "required: run"),
    "frontier missing run": (["frontier", "/no/such/run"], "no scores.parquet"),
    "frontier empty run": (["frontier", "{dir}"], "no scores.parquet"),
    "frontier --bits text": (["frontier", "{dir}", "--bits", "x"], "argument --bits"),
    # apply
    "apply without plan": (["apply", "--export", "{out}"], "required: plan"),
    "apply without --export": (["apply", "{plan}"], "required: --export"),
    "apply missing plan": (["apply", "/no/plan.json", "--export", "{out}"], "does not exist"),
    "apply empty plan": (["apply", "{empty}", "--export", "{out}"], "not valid JSON"),
    "apply plan is a directory": (["apply", "{dir}", "--export", "{out}"], "cannot read plan file"),
    "apply --batch-size 0": (["apply", "{plan}", "--export", "{out}", "--batch-size", "0"], "argument --batch-size"),
    "apply --device cuda": (["apply", "{plan}", "--model", "{model}", "--export", "{out}", "--device", "cuda"], "CUDA is not available"),
    # eval
    "eval --batch-size 0": (["eval", "--batch-size", "0"], "argument --batch-size"),
    "eval --tasks empty": (["eval", "--model", "{model}", "--tasks", ""], "--tasks is empty"),
    "eval --plan missing": (["eval", "--model", "{model}", "--plan", "/no/plan.json"], "does not exist"),
    "eval --plan and --checkpoint": (["eval", "--plan", "{plan}", "--checkpoint", "{dir}"], "not allowed with argument"),
    "eval --eval-samples text": (["eval", "--eval-samples", "many"], "argument --eval-samples"),
    "eval --num-fewshot -1": (["eval", "--num-fewshot", "-1"], "argument --num-fewshot"),
    "eval --limit 0": (["eval", "--limit", "0"], "argument --limit"),
    "eval --device cuda": (["eval", "--model", "{model}", "--device", "cuda"], "CUDA is not available"),
    # sweep
    "sweep without --bits": (["sweep"], "required: --bits"),
    "sweep --bits empty": (["sweep", "--bits", ""], "argument --bits"),
    "sweep --baselines unknown": (["sweep", "--bits", "5", "--model", "{model}", "--baselines", "fp6"], "unknown baselines"),
    "sweep --tasks empty": (["sweep", "--bits", "5", "--model", "{model}", "--tasks", ""], "--tasks is empty"),
    "sweep --eval-samples 0": (["sweep", "--bits", "5", "--eval-samples", "0"], "argument --eval-samples"),
    "sweep --device cuda": (["sweep", "--bits", "5", "--model", "{model}", "--device", "cuda"], "CUDA is not available"),
    # report
    "report without sweep": (["report"], "required: sweep"),
    "report missing sweep": (["report", "/no/sweep", "--out", "{out}"], "no results.csv"),
    "report empty sweep": (["report", "{dir}", "--out", "{out}"], "no results.csv"),
    # plan
    "plan without subcommand": (["plan"], "required: plan_command"),
    "plan show without plan": (["plan", "show"], "required: plan"),
    "plan show missing": (["plan", "show", "/no/plan.json"], "does not exist"),
    "plan show empty": (["plan", "show", "{empty}"], "not valid JSON"),
    "plan show not a plan": (["plan", "show", "{json_list}"], "not an autoq plan"),
    "plan diff one plan": (["plan", "diff", "{plan}"], "required: b"),
    "plan diff missing": (["plan", "diff", "{plan}", "/no/plan.json"], "does not exist"),
    "plan convert without --to": (["plan", "convert", "{plan}"], "required: --to"),
    "plan convert --to unknown": (["plan", "convert", "{plan}", "--to", "tensorrt"], "argument --to: invalid choice"),
    "plan convert missing": (["plan", "convert", "/no/plan.json", "--to", "quark"], "does not exist"),
    "plan convert --out in a missing dir": (["plan", "convert", "{plan}", "--to", "quark", "--out", "/no/dir/x.json"], "not a directory"),
    "plan import without checkpoint": (["plan", "import"], "required: checkpoint"),
    "plan import missing": (["plan", "import", "/missing"], "is not a directory"),
    "plan import empty dir": (["plan", "import", "{dir}"], "has no config.json"),
    "plan import a file": (["plan", "import", "{empty}"], "is not a directory"),
    # verify
    "verify without checkpoint": (["verify"], "required: checkpoint"),
    "verify missing": (["verify", "/no/checkpoint"], "is not a directory"),
    "verify empty dir": (["verify", "{dir}"], "no safetensors files"),
    "verify --runtime unknown": (["verify", "{dir}", "--runtime", "sglang"], "argument --runtime: invalid choice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(
    case: str, tiny_llama: Path, tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv, message = CASES[case]
    if "--device" in argv and argv[argv.index("--device") + 1] == "cuda" and torch.cuda.is_available():
        pytest.skip("checks the error on a machine without CUDA")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "dir").mkdir()
    (inputs / "empty").write_text("")
    (inputs / "empty.txt").write_text("")
    (inputs / "list.json").write_text("[]")
    (inputs / "plan.json").write_text(json.dumps({"schema": "autoq.plan", "version": 1, "layers": {"model.layers.0.mlp.down_proj": {"format": "FP8"}}}))
    files = {"model": tiny_llama, "plan": inputs / "plan.json", "empty": inputs / "empty", "empty_txt": inputs / "empty.txt",
             "dir": inputs / "dir", "json_list": inputs / "list.json", "out": tmp_path / "out"}  # fmt: skip
    argv = [a.format(**files) for a in argv]
    if argv and argv[0] in ("search", "sweep", "apply", "eval") and "--calib-samples" not in argv:
        argv += [a for a in FAST if a not in argv]
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoq: error: ") and message in lines[0], captured.err
    assert captured.out == ""
    assert list(workdir.iterdir()) == [] and not (tmp_path / "out").exists()
    assert list(isolated_cache.iterdir()) == []
    assert sorted(p.name for p in inputs.iterdir()) == ["dir", "empty", "empty.txt", "list.json", "plan.json"]
    assert list((inputs / "dir").iterdir()) == []
