"""Hostile input: plan.json and search-space YAML fuzzed with hypothesis, hostile model files
(absurd config sizes, safetensors headers that lie, NaN weights, pickles, a model's own code) and
output paths that must be refused. Every case: exit 2, one ``autoq: error:`` line, no traceback,
nothing written, within STATED_SECONDS.

Fuzzing runs FUZZ_CASES cases per test from a fixed seed (``derandomize``); ``pytest
--fuzz-minutes N`` runs each fuzz test N minutes with fresh random seeds. Each fuzz test records
how many cases it ran (``record_property("fuzz_cases", n)``, in ``--junitxml``) and prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from autoq.cli import main
from autoq.errors import AutoqError
from autoq.formats import FORMATS
from autoq.search_space import parse_search_space, select_layers

STATED_SECONDS = 10  # the longest any one bad input may take to be refused (README, "Reliability")
FUZZ_CASES = 150
MISSING_MODEL = "/no/such/model"  # a plan or space that parses is then refused for the model: exit 2 either way
FAST = ["--calib-samples", "8", "--seq-len", "32", "--batch-size", "1", "--no-progress"]
FP8_SPACE = "name: fp8\nformats: [FP8, BF16]\n"


# ---------------------------------------------------------------------------------------- helpers
def refused(argv: list[str], capsys: pytest.CaptureFixture, *absent: Path, codes: tuple[int, ...] = (2,), alone: bool = True) -> str:
    """Run ``autoq argv`` in this process: exit in ``codes``; if 2, one ``autoq: error:`` line, last
    on stderr (``alone``: the only line), no traceback, nothing on stdout; ``absent`` paths stay
    absent. Returns stderr."""
    capsys.readouterr()
    start = time.perf_counter()
    code = main([str(a) for a in argv])
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    assert code in codes, (argv, code, captured.err[-2000:])
    assert seconds < STATED_SECONDS, (argv, seconds)
    if code == 2:
        lines = captured.err.splitlines()
        errors = [line for line in lines if line.startswith("autoq: error: ")]
        assert errors == lines[-1:] and (len(lines) == 1 or not alone), (argv, captured.err[-2000:])
        assert "Traceback" not in captured.err and captured.out == "", (argv, captured.err[-2000:])
        for path in absent:
            assert not path.exists(), (argv, path)
    return captured.err


def fuzz(name: str, strategy: st.SearchStrategy, check: Callable, minutes: float, record_property: Callable) -> int:
    """``check`` on FUZZ_CASES values of ``strategy`` from a fixed seed, or for ``minutes`` with fresh seeds."""
    count = 0

    def body(value) -> None:
        nonlocal count
        count += 1
        check(value)

    common = dict(database=None, deadline=timedelta(seconds=STATED_SECONDS), suppress_health_check=list(HealthCheck))
    if minutes:
        end = time.monotonic() + 60 * minutes
        while time.monotonic() < end:
            settings(max_examples=200, **common)(given(strategy)(body))()
    else:
        settings(max_examples=FUZZ_CASES, derandomize=True, **common)(given(strategy)(body))()
    record_property("fuzz_cases", count)
    print(f"fuzz {name}: {count} cases, none failed")
    return count


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        digest.update(path.relative_to(directory).as_posix().encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# JSON-like values of every type, unicode strings included, nested.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)  # fmt: skip
format_names = st.sampled_from(sorted(FORMATS)) | st.text(max_size=10)
layer_names = st.sampled_from(["model.layers.0.mlp.down_proj", "lm_head", "model.layers.1.self_attn.q_proj"]) | st.text(max_size=40)


# ------------------------------------------------------------------------------------------ plans
plan_entries = st.fixed_dictionaries(
    {"format": format_names | json_values},
    optional={"params": st.integers() | json_values, "bits": st.integers() | json_values, "score": st.floats() | json_values,
              "group": st.text(max_size=10) | json_values},
)  # fmt: skip
plan_like = st.fixed_dictionaries(
    {"schema": st.just("autoq.plan") | json_values, "version": st.just(1) | json_values,
     "layers": st.dictionaries(layer_names, plan_entries | json_values, max_size=4) | json_values},
    optional={"budget": st.fixed_dictionaries({}, optional={"effective_bits": st.floats() | json_values}) | json_values,
              "achieved": json_values, "model": json_values, "objective": json_values, "created": json_values},
)  # fmt: skip


def _with_duplicate(pairs: list[tuple[str, object]]) -> str:
    """A JSON object text with its first key given twice (json.dumps cannot write one)."""
    items = [*pairs, pairs[0]]
    return "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items) + "}"


plan_texts = st.one_of(
    json_values.map(json.dumps),  # any JSON at all (NaN and Infinity included)
    plan_like.map(lambda p: json.dumps(p, ensure_ascii=False)),  # a plan's shape, any field of any type, unicode names
    plan_like.map(lambda p: _with_duplicate(list(p.items()))),  # a duplicate top-level key
    st.tuples(plan_like, st.integers(0, 400), st.text(max_size=5)).map(  # valid-looking JSON, then cut or spliced
        lambda t: (lambda s: s[: t[1] % (len(s) + 1)] + t[2] + s[t[1] % (len(s) + 1) :])(json.dumps(t[0]))),
    st.text(max_size=200),
)


def test_fuzzed_plans_exit_2_with_one_line(tmp_path: Path, capsys, fuzz_minutes: float, record_property) -> None:
    """Every fuzzed plan: ``apply`` refuses it (or, if it is a valid plan, the missing model) with
    exit 2 and one line; ``plan show`` and ``plan convert`` either succeed or do the same."""
    plan, out = tmp_path / "plan.json", tmp_path / "out"

    def check(text: str) -> None:
        plan.write_text(text, encoding="utf-8", errors="surrogatepass")
        refused(["apply", plan, "--model", MISSING_MODEL, "--export", out, *FAST], capsys, out)
        refused(["plan", "show", plan], capsys, codes=(0, 2))
        refused(["plan", "convert", plan, "--to", "quark", "--out", out], capsys, out, codes=(0, 2))
        out.unlink(missing_ok=True)

    assert fuzz("plan.json", plan_texts, check, fuzz_minutes, record_property) >= (FUZZ_CASES if not fuzz_minutes else 1)


def test_fuzzed_plan_bytes_exit_2(tmp_path: Path, capsys, fuzz_minutes: float, record_property) -> None:
    plan, out = tmp_path / "plan.json", tmp_path / "out"

    def check(data: bytes) -> None:
        plan.write_bytes(data)
        refused(["apply", plan, "--model", MISSING_MODEL, "--export", out, *FAST], capsys, out)

    fuzz("plan.json bytes", st.binary(max_size=300), check, fuzz_minutes, record_property)


VALID_PLAN = {"schema": "autoq.plan", "version": 1, "layers": {"model.layers.0.mlp.down_proj": {"format": "FP8"}}}
PLAN_CASES = {
    "duplicate layer": ('{"schema": "autoq.plan", "version": 1, "layers": {"a.b": {"format": "FP8"}, "a.b": {"format": "BF16"}}}',
                        "twice in one object"),
    "NaN score": ('{"schema": "autoq.plan", "version": 1, "layers": {"a.b": {"format": "FP8", "score": NaN}}}', "NaN"),
    "huge integer": ('{"schema": "autoq.plan", "version": 1, "layers": {"a.b": {"format": "FP8", "params": 1' + "0" * 5000 + "}}}",
                     "not usable JSON"),
    "huge params": ('{"schema": "autoq.plan", "version": 1, "layers": {"a.b": {"format": "FP8", "params": 1e300}}}', "whole number"),
    "deep nesting": ('{"schema": "autoq.plan", "version": 1, "layers": ' + "[" * 100000 + "]" * 100000 + "}", "not usable JSON"),
    "newline in a layer name": (json.dumps({**VALID_PLAN, "layers": {"a\nb": {"format": "FP8"}}}), "not a module name"),
    "unicode layer name": (json.dumps({**VALID_PLAN, "layers": {"модель.слой": {"format": "FP9"}}}, ensure_ascii=False), "FP9"),
    "version true": (json.dumps({**VALID_PLAN, "version": True}), "plan version True"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_hostile_plans_exit_2_with_one_line(case: str, tmp_path: Path, capsys) -> None:
    text, message = PLAN_CASES[case]
    plan, out = tmp_path / "plan.json", tmp_path / "out"
    plan.write_text(text, encoding="utf-8")
    assert message in refused(["apply", plan, "--model", MISSING_MODEL, "--export", out, *FAST], capsys, out)


def test_a_100_mb_plan_and_a_fifo_are_refused_at_once(tmp_path: Path, capsys) -> None:
    big, fifo, out = tmp_path / "big.json", tmp_path / "fifo.json", tmp_path / "out"
    with big.open("w") as handle:  # valid JSON, 100 MB: refused by its size, before it is read
        handle.write('{"schema": "autoq.plan", "version": 1, "pad": "')
        handle.write("x" * (100 << 20))
        handle.write('"}')
    os.mkfifo(fifo)  # reading it would block forever
    assert "has 104857" in refused(["apply", big, "--model", MISSING_MODEL, "--export", out], capsys, out)
    assert "not a regular file" in refused(["plan", "show", fifo], capsys)


# ----------------------------------------------------------------------------------- search spaces
MARKER = Path("/tmp/autoq-yaml-tag-was-executed")
TAGGED = [
    f'formats: !!python/object/apply:os.system ["touch {MARKER}"]',
    f'name: !!python/object/apply:subprocess.check_output [["touch", "{MARKER}"]]',
    "formats: !!python/object/new:list [[FP8]]",
    "name: !!python/name:os.system",
    "formats: !!python/tuple [FP8, BF16]",
    "formats: !custom [FP8]",
    "formats: !!set {FP8: null}",
    "name: !!binary aGVsbG8=",
    "include: !!timestamp 2001-12-14",
    "<<: *missing",
]
space_like = st.fixed_dictionaries(
    {"formats": st.lists(format_names, max_size=4) | json_values},
    optional={"name": st.text(max_size=20) | json_values, "include": st.lists(st.text(max_size=12), max_size=3) | json_values,
              "skip": st.lists(st.text(max_size=12), max_size=3) | json_values, "search_lm_head": st.booleans() | json_values,
              "pin": st.dictionaries(st.text(max_size=12), format_names, max_size=2) | json_values,
              "groups": st.fixed_dictionaries({}, optional={"shared_input": st.booleans() | json_values,
                                                            "rules": st.lists(st.text(max_size=12), max_size=2) | json_values}) | json_values,
              "description": json_values},
).flatmap(lambda space: st.dictionaries(st.text(max_size=8), json_values, max_size=2).map(lambda extra: {**extra, **space}))  # fmt: skip
space_texts = st.one_of(
    json_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # any YAML data
    space_like.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # a space's shape, any field of any type
    st.tuples(space_like, st.sampled_from(TAGGED)).map(lambda t: t[1] + "\n" + yaml.safe_dump(t[0])),  # a tag line first
    st.tuples(space_like, st.sampled_from(TAGGED)).map(lambda t: yaml.safe_dump(t[0]) + t[1] + "\n"),  # a tag line last
    space_like.map(lambda v: yaml.safe_dump(v) + yaml.safe_dump({"formats": v["formats"]})),  # a duplicate key
    st.tuples(space_like, st.integers(0, 300), st.text(max_size=5)).map(  # valid YAML, then cut or spliced
        lambda t: (lambda s: s[: t[1] % (len(s) + 1)] + t[2] + s[t[1] % (len(s) + 1) :])(yaml.safe_dump(t[0]))),
    st.text(max_size=200),
)


@pytest.fixture(scope="module")
def skeleton(tiny_llama: Path) -> torch.nn.Module:
    """The tiny Llama's modules, on the meta device (no weights): what select_layers sees."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama))


def test_fuzzed_search_spaces_exit_2_with_one_line_and_run_no_tag(
    tmp_path: Path, capsys, skeleton: torch.nn.Module, fuzz_minutes: float, record_property
) -> None:
    """Every fuzzed space: ``search`` refuses it (or, if it is valid, the missing model) with exit
    2 and one line; no YAML tag builds a Python object or runs code. A space that parses is also
    matched against a real model's layers: it selects layers or fails with one AutoqError."""
    space, out = tmp_path / "space.yaml", tmp_path / "out"
    MARKER.unlink(missing_ok=True)

    def check(text: str) -> None:
        space.write_text(text, encoding="utf-8", errors="surrogatepass")
        refused(["search", "--model", MISSING_MODEL, "--space", space, "--bits", "5", "--out", out, *FAST], capsys, out)
        assert not MARKER.exists(), text
        try:
            parsed = parse_search_space(space.read_text(encoding="utf-8", errors="surrogatepass"), str(space))
        except AutoqError:
            return
        try:
            select_layers(skeleton, parsed, "lm_head")
        except AutoqError as err:
            assert "\n" not in str(err)

    fuzz("search-space YAML", space_texts, check, fuzz_minutes, record_property)


SPACE_CASES = {
    "tag that runs a command": (TAGGED[0] + "\n", "invalid YAML"),
    "duplicate key": ("formats: [FP8]\nformats: [BF16]\n", "duplicate key 'formats' (line 2)"),
    "duplicate nested key": ("formats: [FP8]\ngroups: {rules: ['a'], rules: ['b']}\n", "duplicate key 'rules'"),
    "quoted no as a flag": ("formats: [FP8]\nsearch_lm_head: 'no'\n", "must be true or false"),
    "unicode name": ("name: \"сеть\\n\u202e\"\nformats: [FP9]\n", "FP9"),
    "billion laughs": ("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
                       "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\nformats: [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "unknown keys"),
    "bad regex rule": ("formats: [FP8]\ngroups: {rules: ['(']}\n", "bad group rule"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPACE_CASES))
def test_hostile_search_spaces_exit_2_with_one_line(case: str, tmp_path: Path, capsys) -> None:
    text, message = SPACE_CASES[case]
    space, out = tmp_path / "space.yaml", tmp_path / "out"
    space.write_text(text, encoding="utf-8")
    MARKER.unlink(missing_ok=True)
    assert message in refused(["search", "--model", MISSING_MODEL, "--space", space, "--bits", "5", "--out", out], capsys, out)
    assert not MARKER.exists()


def test_a_100_mb_search_space_and_a_catastrophic_rule_are_refused_in_time(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    big, slow, out = tmp_path / "big.yaml", tmp_path / "slow.yaml", tmp_path / "out"
    with big.open("w") as handle:
        handle.write("formats: [FP8]\ndescription: ")
        handle.write("x" * (100 << 20))
    assert "has 104857" in refused(["search", "--space", big, "--bits", "5", "--out", out], capsys, out)
    # Exponential backtracking on every layer name: stopped after RULE_SECONDS, before any model work.
    slow.write_text("formats: [FP8, BF16]\ngroups: {rules: ['^(.+?)+(?<=q)$']}\n")
    assert "catastrophic backtracking" in refused(["search", "--model", tiny_llama, "--space", slow, "--bits", "5", "--out", out, *FAST],
                                                  capsys, out, alone=False)  # fmt: skip


# ------------------------------------------------------------------------------------- model files
def _copy_model(source: Path, tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(source, copy)
    return copy


def _edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


CONFIG_CASES = {
    "hidden_size 10**12": ({"hidden_size": 10**12}, "hidden_size must be a positive integer"),
    "negative layers": ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
    "vocab_size as text": ({"vocab_size": "50000"}, "vocab_size must be a positive integer"),
    "heads true": ({"num_attention_heads": True}, "num_attention_heads must be a positive integer"),
    "a million layers": ({"num_hidden_layers": 10**6}, "does not match the weights"),
    "not a causal LM": ({"model_type": "vit", "architectures": ["ViTModel"]}, "not a causal LM"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_absurd_configs_are_refused_before_anything_is_built(case: str, tiny_llama: Path, tmp_path: Path, capsys) -> None:
    changes, message = CONFIG_CASES[case]
    model, out = _copy_model(tiny_llama, tmp_path), tmp_path / "out"
    _edit_config(model, **changes)
    assert message in refused(["search", "--model", model, "--bits", "5", "--out", out, *FAST], capsys, out)


def _lying_header(path: Path, how: str) -> None:
    """Rewrite a safetensors file's header so that it lies about where its tensors lie."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    name = next(k for k in sorted(header) if k != "__metadata__")
    if how == "offset past the end":
        header[name]["data_offsets"][1] = len(body) + 4096
    elif how == "overlapping offsets":  # the last tensor said to start at 0, over the first
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        start, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [0, end - start]
    elif how == "header longer than the file":
        path.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
        return
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize("how", ["offset past the end", "overlapping offsets", "header longer than the file", "truncated"])
def test_safetensors_headers_that_lie_are_one_error(how: str, tiny_llama: Path, tmp_path: Path, capsys) -> None:
    model, out = _copy_model(tiny_llama, tmp_path), tmp_path / "out"
    weights = model / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        _lying_header(weights, how)
    assert "is not a valid safetensors file" in refused(["search", "--model", model, "--bits", "5", "--out", out, *FAST], capsys, out)


def test_nan_and_infinite_weights_are_refused(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    space, out = tmp_path / "fp8.yaml", tmp_path / "out"
    space.write_text(FP8_SPACE)
    for value in (float("nan"), float("inf")):
        model = _copy_model(tiny_llama, tmp_path, f"model-{value}")
        tensors = load_file(model / "model.safetensors")
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
        message = refused(["search", "--model", model, "--space", space, "--bits", "5", "--out", out, *FAST], capsys, out, alone=False)
        assert "weight model.layers.1.mlp.up_proj.weight has NaN or infinite values" in message


class _Payload:
    """Unpickling this runs os.system: the test fails if any path unpickles the file."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def test_no_path_unpickles_a_model_file(tiny_llama: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model with only pytorch_model.bin is refused; one with both formats is read from
    safetensors alone: search, export and verify run end to end with every unpickler disabled."""
    MARKER.unlink(missing_ok=True)
    pickled = _copy_model(tiny_llama, tmp_path, "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    assert "never unpickles" in refused(["search", "--model", pickled, "--bits", "5", "--out", tmp_path / "out"], capsys)
    both = _copy_model(tiny_llama, tmp_path, "both")
    (both / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))

    def forbidden(*args, **kwargs):
        raise AssertionError("a file was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    space = tmp_path / "fp8.yaml"
    space.write_text(FP8_SPACE)
    export = tmp_path / "export"
    refused(["search", "--model", both, "--space", space, "--bits", "10", "--out", tmp_path / "run", "--export", export, *FAST],
            capsys, codes=(0,))  # fmt: skip
    refused(["verify", export], capsys, codes=(0,))
    assert not MARKER.exists()


MODELING = '''
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).touch()  # the model's own code ran


class ShippedConfig(LlamaConfig):
    model_type = "shipped"


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig
'''


def test_a_models_own_code_runs_only_with_trust_remote_code(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    model, space = _copy_model(tiny_llama, tmp_path, "shipped"), tmp_path / "fp8.yaml"
    space.write_text(FP8_SPACE)
    marker = tmp_path / "code-ran"
    (model / "modeling_shipped.py").write_text(MODELING.format(marker=str(marker)))
    _edit_config(model, model_type="shipped", architectures=["ShippedForCausalLM"],
                 auto_map={"AutoConfig": "modeling_shipped.ShippedConfig", "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM"})  # fmt: skip
    argv = ["search", "--model", model, "--space", space, "--bits", "10", *FAST]
    message = refused([*argv, "--out", tmp_path / "refused"], capsys, tmp_path / "refused")
    assert "ships its own code" in message and "--trust-remote-code" in message and not marker.exists()
    refused([*argv, "--out", tmp_path / "trusted", "--trust-remote-code"], capsys, codes=(0,))
    assert marker.exists() and (tmp_path / "trusted" / "plan.json").is_file()


# ------------------------------------------------------------------------------------------ paths
def test_outputs_that_are_links_files_or_inside_the_model_are_refused(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(VALID_PLAN))
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    a_file = tmp_path / "file"
    a_file.write_text("")
    apply = ["apply", plan, "--model", tiny_llama, *FAST, "--export"]
    before = _tree_digest(tiny_llama)
    assert "is a symbolic link" in refused([*apply, link, "--overwrite"], capsys)
    assert "not a directory" in refused([*apply, a_file / "export"], capsys)
    assert "is inside the input model" in refused([*apply, tiny_llama / "export"], capsys, tiny_llama / "export")
    assert "is the input model" in refused([*apply, tiny_llama, "--overwrite"], capsys)
    assert "is inside the input model" in refused(["search", "--model", tiny_llama, "--bits", "5", "--out", tiny_llama / "run", *FAST],
                                                  capsys, tiny_llama / "run")  # fmt: skip
    assert _tree_digest(tiny_llama) == before and list(real.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: the check needs an ordinary user")
def test_an_output_in_a_read_only_directory_is_refused(tmp_path: Path, capsys) -> None:
    plan, parent = tmp_path / "plan.json", tmp_path / "read-only"
    plan.write_text(json.dumps(VALID_PLAN))
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert "is not writable" in refused(["apply", plan, "--export", parent / "export"], capsys)
    finally:
        parent.chmod(0o755)
