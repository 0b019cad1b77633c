"""Plans through other tools: converters parsed by their own libraries, checkpoint import round
trips, verification catching damage, dequantized weights against ModelOpt's fake quantization."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from autoq.apply import apply_plan, export_checkpoint
from autoq.checkpoint import checkpoint_formats, load_fake_quant_model, read_quant_config
from autoq.cli import main
from autoq.codec import dequantize_weight, read_layer_tensors
from autoq.data import load_tokens
from autoq.errors import AutoqError
from autoq.formats import FORMATS, Format
from autoq.interop.llmcompressor import to_llmcompressor
from autoq.interop.modelopt import config_from_json, plan_formats_from_checkpoint, to_modelopt
from autoq.interop.quark import to_quark
from autoq.interop.vllm import vllm_problems
from autoq.model import ModelSource, load_model, load_tokenizer
from autoq.plan import LayerPlan, Plan, diff_plans
from autoq.verify import verify_checkpoint

ATTN = ("q_proj", "k_proj", "v_proj")
MIXED = (
    {f"model.layers.0.self_attn.{p}": "NVFP4" for p in ATTN}
    | {"model.layers.0.self_attn.o_proj": "FP8", "model.layers.0.mlp.gate_proj": "W4A8", "model.layers.0.mlp.up_proj": "W4A8"}
    | {"model.layers.0.mlp.down_proj": "INT4_AWQ"}
    | {f"model.layers.1.self_attn.{p}": "FP8" for p in ATTN}
    | {"model.layers.1.self_attn.o_proj": "BF16", "model.layers.1.mlp.gate_proj": "NVFP4", "model.layers.1.mlp.up_proj": "NVFP4"}
    | {"model.layers.1.mlp.down_proj": "W4A8"}
)


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """The MIXED plan applied and exported; also the fake-quantized weights and logits before export."""
    source = ModelSource(tiny_llama, "tiny")
    tokenizer = load_tokenizer(source)
    batches = load_tokens("default", tokenizer, 8, 64).batches(4)
    model = apply_plan(load_model(source), MIXED, batches, progress=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        fake = {n: modules[n].weight_quantizer(modules[n].weight).float() for n, f in MIXED.items() if f != "BF16"}
        logits = model(input_ids=batches[0]).logits.float()
    out = tmp_path_factory.mktemp("export") / "ckpt"
    export_checkpoint(model, tokenizer, Plan(layers={n: LayerPlan(format=f) for n, f in MIXED.items()}), out)
    return out, fake, logits, batches


def test_plan_export_import_round_trip(exported, tiny_llama: Path, tmp_path: Path) -> None:
    checkpoint = exported[0]
    imported = plan_formats_from_checkpoint(checkpoint)
    assert {n: imported[n] for n in MIXED} == MIXED
    assert imported["lm_head"] == "BF16" and set(imported) == set(MIXED) | {"lm_head"}
    # The imported plan, applied again, reproduces the same per-layer formats in a new checkpoint.
    assert main(["plan", "import", str(checkpoint), "--out", str(tmp_path / "imported.json")]) == 0
    assert main(["apply", str(tmp_path / "imported.json"), "--model", str(tiny_llama), "--export", str(tmp_path / "again"),
                 "--calib-samples", "8", "--seq-len", "64", "--no-progress"]) == 0  # fmt: skip
    assert checkpoint_formats(tmp_path / "again") == checkpoint_formats(checkpoint)


def test_dequantized_weights_equal_modelopt_fake_quant(exported) -> None:
    """NVFP4 bit-exact. FP8 / INT4 / W4A8 within one quantization step on a few percent of weights:
    ModelOpt's exporter divides by the scale in bf16 before casting (two roundings), its fake
    quantization in float32 (one)."""
    checkpoint, fake, _, _ = exported
    for name, fmt in MIXED.items():
        if fmt == "BF16":
            continue
        tensors = read_layer_tensors(checkpoint, name)
        ours = dequantize_weight(FORMATS[fmt], tensors).to(torch.bfloat16).float()
        differ = ours != fake[name]
        if fmt == "NVFP4":
            assert not differ.any(), name
            continue
        assert differ.float().mean() < 0.06, (name, differ.float().mean())
        # One step of the coarsest grid (FP8 E4M3: 32 of 448 in its top binade; INT4: one code of 7),
        # plus the bf16 rounding of both values (2^-8 relative each).
        step = fake[name].abs().amax() * (32 / 448 if fmt == "FP8" else 1 / 7)
        assert (ours - fake[name]).abs().max() <= step * 1.06, name


def test_checkpoint_runs_like_the_in_memory_model(exported) -> None:
    """Same logits up to the exporter's double rounding of FP8 / INT4 weights (NVFP4 layers are exact)."""
    checkpoint, _, logits, batches = exported
    with torch.no_grad():
        from_checkpoint = load_fake_quant_model(checkpoint)(input_ids=batches[0]).logits.float()
    assert ((from_checkpoint - logits).norm() / logits.norm()) < 0.05


def test_verify_passes_then_names_the_damaged_layer(exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = exported[0]
    assert main(["verify", str(checkpoint)]) == 0
    assert verify_checkpoint(checkpoint, checkpoint_formats(checkpoint)).problems == []

    def damaged(name: str, edit) -> Path:
        copy_dir = tmp_path / name
        shutil.copytree(checkpoint, copy_dir)
        tensors = load_file(copy_dir / "model.safetensors")
        edit(tensors)
        save_file(tensors, copy_dir / "model.safetensors", metadata={"format": "pt"})
        return copy_dir

    missing = damaged("missing", lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    corrupt = damaged("corrupt", lambda t: t["model.layers.0.self_attn.o_proj.weight_scale"].mul_(-1))
    for path, layer, what in ((missing, "model.layers.1.mlp.down_proj", "missing weight_scale"),
                              (corrupt, "model.layers.0.self_attn.o_proj", "non-positive")):  # fmt: skip
        capsys.readouterr()
        assert main(["verify", str(path)]) == 1
        err = capsys.readouterr().err
        assert layer in err and what in err, err


def test_verify_reads_sharded_checkpoints(exported, tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = exported[0]
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint, sharded)
    tensors = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-{index + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "autoq_manifest.json").unlink()  # resharded here, after export: no longer the files autoq hashed
    capsys.readouterr()
    assert main(["verify", str(sharded), "--model", str(tiny_llama)]) == 0
    out = capsys.readouterr().out
    errors = {line.split()[0]: float(line.split("rel.err")[1]) for line in out.splitlines() if "rel.err" in line}
    assert set(errors) == {n for n, f in MIXED.items() if f != "BF16"}
    assert all(0 < e < 0.2 for e in errors.values())  # quantized, but close to the BF16 weights
    assert errors["model.layers.0.self_attn.o_proj"] < errors["model.layers.1.mlp.gate_proj"]  # FP8 beats NVFP4


def test_vllm_loader_fields(exported, tmp_path: Path) -> None:
    checkpoint = exported[0]
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    quant = read_quant_config(checkpoint)
    # The fields vLLM's ModelOpt MIXED_PRECISION loader reads are all there ...
    assert quant["quant_algo"] == "MIXED_PRECISION" and config["quant_method"].startswith("modelopt")
    assert quant["kv_cache_quant_algo"] is None and isinstance(quant.get("exclude_modules", []), list)
    assert all("quant_algo" in cfg for cfg in quant["quantized_layers"].values())
    # ... and the W4A8 / INT4_AWQ layers are exactly what it cannot serve.
    problems = vllm_problems(quant, config)
    assert {p.split(":")[0] for p in problems} == {n for n, f in MIXED.items() if f in ("W4A8", "INT4_AWQ")}
    served = {n: c for n, c in quant["quantized_layers"].items() if c["quant_algo"] in ("FP8", "NVFP4")}
    assert vllm_problems({**quant, "quantized_layers": served}, config) == []
    split = dict(served) | {"model.layers.1.self_attn.k_proj": {"quant_algo": "NVFP4", "group_size": 16}}
    assert any("qkv_proj: shards use different quant_algo" in p for p in vllm_problems({**quant, "quantized_layers": split}, config))


def test_converters_are_accepted_by_their_own_libraries() -> None:
    formats = MIXED | {"lm_head": "BF16"}
    quantized = {n for n, f in formats.items() if f != "BF16"}

    from modelopt.torch.quantization.config import QuantizeConfig

    modelopt_doc = to_modelopt(formats)
    parsed = QuantizeConfig(**config_from_json(json.dumps(modelopt_doc)))
    names = {e["quantizer_name"].rsplit(".", 1)[0] for e in parsed.model_dump()["quant_cfg"][1:]}
    assert names == quantized and parsed.algorithm == "max"  # mixed AWQ / non-AWQ: one algorithm

    recipe_yaml = to_llmcompressor(formats)
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(recipe_yaml)
    kinds = [type(m).__name__ for m in recipe.modifiers]
    assert kinds == ["AWQModifier", "QuantizationModifier"]
    groups = recipe.modifiers[1].config_groups
    assert {t for g in groups.values() for t in g.targets} == quantized
    assert groups["nvfp4"].weights.group_size == 16 and groups["w4a8"].input_activations.type == "float"

    quark_doc = to_quark(formats)
    from quark.torch.quantization.config import config as quark_config
    from quark.torch.quantization.config import template as quark_template

    parsed_quark = quark_config.QConfig.from_dict(json.loads(json.dumps(quark_doc)))
    assert set(parsed_quark.layer_quant_config) == quantized and "model.layers.1.self_attn.o_proj" in parsed_quark.exclude
    assert quark_doc["layer_quant_config"]["model.layers.0.self_attn.o_proj"] == quark_template.FP8Scheme().config.to_dict()
    nvfp4 = quark_template.FP4Block16ScaleE4M3Scheme().config.to_dict()
    assert quark_doc["layer_quant_config"]["model.layers.0.self_attn.q_proj"] == nvfp4


@pytest.mark.parametrize("head", [None, "BF16", "NVFP4"])
def test_converters_never_list_a_layer_as_both_ignored_and_quantized(head: str | None) -> None:
    """An unplanned or BF16 lm_head is left alone; a planned quantized one is quantized, not also ignored."""
    formats = MIXED | ({} if head is None else {"lm_head": head})
    quantized = {n for n, f in formats.items() if f != "BF16"}
    recipe = yaml.safe_load(to_llmcompressor(formats))["default_stage"]["default_modifiers"]["QuantizationModifier"]
    targets = {t for group in recipe["config_groups"].values() for t in group["targets"]}
    quark = to_quark(formats)
    for ignored, listed in ((set(recipe["ignore"]), targets), (set(quark["exclude"]), set(quark["layer_quant_config"]))):
        assert listed == quantized
        assert ("lm_head" in ignored) is (head != "NVFP4")
        assert ignored == {n for n, f in formats.items() if f == "BF16"} | ({"lm_head"} if head is None else set())


def test_converters_name_the_layers_they_cannot_express(monkeypatch: pytest.MonkeyPatch) -> None:
    exotic = Format("MXFP6", "not expressible", "nvfp4", "nvfp4", 32, False, "max", None, None, ())
    monkeypatch.setitem(FORMATS, "MXFP6", exotic)
    formats = {"model.layers.0.mlp.down_proj": "MXFP6", "model.layers.0.mlp.up_proj": "FP8"}
    for convert in (to_llmcompressor, to_quark):
        with pytest.raises(AutoqError, match=r"cannot express model.layers.0.mlp.down_proj \(MXFP6\)"):
            convert(formats)


def test_plan_show_and_diff(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = Plan(layers={"x": LayerPlan("FP8", params=100, bits=804), "y": LayerPlan("W4A8", params=256, bits=1100)})
    b = copy.deepcopy(a)
    b.layers["y"] = LayerPlan("BF16", params=256, bits=4096)
    b.layers["z"] = LayerPlan("NVFP4", params=64, bits=352)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert main(["plan", "show", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "356 params, 1904 bits: 5.3483 effective bits" in out and "# FP8: 1, W4A8: 1" in out
    table = diff_plans(a, b)
    assert table[["layer", "a", "b"]].values.tolist() == [["y", "W4A8", "BF16"], ["z", "-", "NVFP4"]]
    assert table.bits_a.fillna(-1).tolist() == [1100, -1] and table.bits_b.tolist() == [4096, 352]
    assert main(["plan", "diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["layer", "a", "b", "bits_a", "bits_b"]
    assert lines[1][:3] == ["y", "W4A8", "BF16"] and lines[2][:3] == ["z", "-", "NVFP4"]
    assert lines[-1] == ["#", "2", "layer(s)", "differ"]
    assert diff_plans(a, a).empty


def test_verify_checks_kv_cache_flag_and_lm_head(exported, tmp_path: Path) -> None:
    checkpoint = exported[0]
    formats = checkpoint_formats(checkpoint)

    def edited(name: str, edit) -> Path:
        copy_dir = tmp_path / name
        shutil.copytree(checkpoint, copy_dir)
        config = json.loads((copy_dir / "hf_quant_config.json").read_text())
        edit(config["quantization"])
        (copy_dir / "hf_quant_config.json").write_text(json.dumps(config))
        return copy_dir

    kv = edited("kv", lambda q: q.update(kv_cache_quant_algo="FP8"))
    assert any("k_scale/v_scale" in p for p in verify_checkpoint(kv, formats).problems)
    head = edited("head", lambda q: q["quantized_layers"].update(lm_head={"quant_algo": "FP8"}))
    assert any("lm_head is not planned but hf_quant_config lists it" in p for p in verify_checkpoint(head, formats).problems)
