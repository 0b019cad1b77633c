"""The formats and switches of issue 13: MXFP8, W4A16_NVFP4, INT8_SQ, the quantized KV cache,
per-space LM-head candidates and protected blocks.

Each format: honest bits equal to the exported checkpoint's bytes, quantizer bit-exact with
ModelOpt's CPU code (MXFP8 against the exporter's ``MXFP8QTensor``, INT8_SQ against ModelOpt's
SmoothQuant calibration and INT8 quantizers; MXFP8 / NVFP4 fake-quant kernels are CUDA-only:
``benchmarks/gpu_checks.py``), verify rules, vLLM serveability and converters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import modelopt.torch.quantization as mtq
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import stored_tensor_bits

from autoq import fakequant, smoothquant
from autoq.apply import apply_plan, check_kv_cache_fits_model, export_checkpoint
from autoq.checkpoint import load_fake_quant_model, read_quant_config
from autoq.cli import main
from autoq.codec import dequantize_weight, read_layer_tensors
from autoq.data import load_tokens
from autoq.errors import AutoqError
from autoq.formats import FORMATS, KV_CACHE_FORMATS, get_kv_cache_format
from autoq.interop.llmcompressor import to_llmcompressor
from autoq.interop.quark import to_quark
from autoq.interop.vllm import vllm_problems
from autoq.model import ModelSource, load_model, load_tokenizer
from autoq.plan import LayerPlan, Plan, load_plan
from autoq.search_space import parse_search_space, select_layers
from autoq.verify import verify_checkpoint

FAST = ["--calib-samples", "8", "--seq-len", "64", "--no-progress"]
NEW = ("MXFP8", "W4A16_NVFP4", "INT8_SQ")
ATTN = ("q_proj", "k_proj", "v_proj")
# Every new format next to FP8 and NVFP4 on the tiny Llama (hidden 128, intermediate 256).
PLAN = (
    {f"model.layers.0.self_attn.{p}": "MXFP8" for p in ATTN}
    | {"model.layers.0.self_attn.o_proj": "W4A16_NVFP4", "model.layers.0.mlp.down_proj": "FP8"}
    | {"model.layers.0.mlp.gate_proj": "INT8_SQ", "model.layers.0.mlp.up_proj": "INT8_SQ"}
    | {f"model.layers.1.self_attn.{p}": "NVFP4" for p in ATTN}
    | {"model.layers.1.self_attn.o_proj": "MXFP8", "model.layers.1.mlp.down_proj": "INT8_SQ"}
    | {"model.layers.1.mlp.gate_proj": "W4A16_NVFP4", "model.layers.1.mlp.up_proj": "W4A16_NVFP4"}
)
VLLM_SERVED = ("FP8", "NVFP4", "W4A16_NVFP4", "MXFP8")


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):
    """PLAN with an FP8 KV cache, applied by ModelOpt and exported; also the unquantized weights,
    ModelOpt's fake-quantized INT8_SQ weights, the calibrated k/v amax and the in-memory logits."""
    source = ModelSource(tiny_llama, "tiny")
    tokenizer = load_tokenizer(source)
    batches = load_tokens("default", tokenizer, 8, 64).batches(4)
    original = load_model(source)
    weights = {n: original.get_submodule(n).weight.detach().clone() for n in PLAN}
    model = apply_plan(original, PLAN, batches, progress=False, kv_cache=KV_CACHE_FORMATS["FP8"])
    modules = dict(model.named_modules())
    kv_amax = {n: (m.k_bmm_quantizer.amax.float(), m.v_bmm_quantizer.amax.float()) for n, m in modules.items() if n.endswith("self_attn")}
    with torch.no_grad():
        logits = model(input_ids=batches[0]).logits.float()
        int8 = {n: modules[n].weight_quantizer(modules[n].weight) for n, f in PLAN.items() if f == "INT8_SQ"}
    out = tmp_path_factory.mktemp("export") / "ckpt"
    export_checkpoint(model, tokenizer, Plan(layers={n: LayerPlan(format=f) for n, f in PLAN.items()}, kv_cache="FP8"), out)
    return out, weights | {f'{n}:modelopt': w for n, w in int8.items()}, kv_amax, logits, batches


def test_registry_entries_match_what_modelopt_0_47_exports() -> None:
    cfgs = {name: FORMATS[name].modelopt_quantizer_cfgs() for name in (*NEW, "NVFP4")}
    assert cfgs["W4A16_NVFP4"] == {"weight_quantizer": cfgs["NVFP4"]["weight_quantizer"], "input_quantizer": None}
    assert cfgs["MXFP8"]["weight_quantizer"]["num_bits"] == (4, 3)
    assert cfgs["MXFP8"]["weight_quantizer"]["block_sizes"] == {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}
    assert cfgs["INT8_SQ"]["weight_quantizer"] == {"num_bits": 8, "axis": 0}
    assert cfgs["INT8_SQ"]["input_quantizer"]["num_bits"] == 8
    assert [FORMATS[n].hf_quant_algo for n in NEW] == ["MXFP8", "W4A16_NVFP4", "W8A8_SQ_PER_CHANNEL"]
    # Honest bits of a 4096 x 4096 linear: MXFP8 one E8M0 byte per 32, W4A16_NVFP4 NVFP4's weight
    # tensors without input_scale, INT8_SQ a float32 scale per row, a bf16 pre-scale per column and input_scale.
    assert FORMATS["MXFP8"].storage_bits(4096, 4096) / 4096**2 == 8.25
    assert FORMATS["W4A16_NVFP4"].storage_bits(4096, 4096) == FORMATS["NVFP4"].storage_bits(4096, 4096) - 32
    assert FORMATS["INT8_SQ"].storage_bits(4096, 4096) == 8 * 4096**2 + 32 * 4096 + 16 * 4096 + 32
    assert not FORMATS["MXFP8"].supports(64, 48) and FORMATS["MXFP8"].supports(64, 96)


def test_mxfp8_is_bit_exact_with_modelopts_exporter() -> None:
    """MXFP8QTensor (ModelOpt's export quantizer, CPU): same E8M0 bytes, same E4M3 codes, same values;
    mismatch fraction 0 over 1.6M bf16 weights with amaxes spread over 30 binades, zero blocks included."""
    from modelopt.torch.quantization.qtensor import MXFP8QTensor

    torch.manual_seed(0)
    weight = torch.randn(1024, 1536) * torch.exp2(torch.randint(-20, 10, (1024, 48, 1)).float()).repeat_interleave(32, -1).reshape(1024, 1536)
    weight[3, :64] = 0
    weight = weight.to(torch.bfloat16)
    qtensor, scales = MXFP8QTensor.quantize(weight)
    ours_scales = fakequant.mxfp8_exponents(weight)
    assert torch.equal(ours_scales, scales) and ours_scales[3, :2].tolist() == [0, 0]
    assert torch.equal(fakequant.mxfp8_codes(weight, ours_scales).view(torch.uint8), qtensor._quantized_data.view(torch.uint8))
    reference = qtensor.dequantize(dtype=torch.float32, scale=scales)
    ours = FORMATS["MXFP8"].quantize_weight(weight).float()
    assert (ours != reference).float().mean().item() == 0.0
    # Dynamic activations: every 32 inputs get their own scale (nothing calibrated, nothing stored).
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(FORMATS["MXFP8"].quantize_input(x, None), fakequant.mxfp8(x))
    assert (fakequant.mxfp8(x).float() - x.float()).abs().max() <= x.float().abs().amax() / 8


def test_w4a16_nvfp4_weight_is_modelopts_nvfp4_export_and_activations_stay_bf16() -> None:
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(1)
    weight = (torch.randn(96, 256) * torch.rand(256) * 0.05).to(torch.bfloat16)
    packed, block_scale, global_scale = NVFP4QTensor.quantize(weight, 16)
    reference = packed.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    assert torch.equal(FORMATS["W4A16_NVFP4"].quantize_weight(weight), reference.to(torch.bfloat16))
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    assert FORMATS["W4A16_NVFP4"].quantize_input(x, None) is x


def test_int8_smoothquant_is_bit_exact_with_modelopt_on_cpu() -> None:
    """ModelOpt's INT8_SMOOTHQUANT_CFG calibration (smoothquant, CPU) against ours: the same
    pre-scale from the per-channel input amax, the same smoothed weight codes and activations, the
    same layer output."""
    fmt = FORMATS["INT8_SQ"]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 384, bias=False)).to(torch.bfloat16)
    with torch.no_grad():
        net[0].weight.mul_((torch.rand(1, 256) * 4).to(torch.bfloat16))
    original = net[0].weight.detach().clone()
    batches = [(torch.randn(4, 32, 256) * torch.rand(256) * 3).to(torch.bfloat16) for _ in range(4)]
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    quant_cfg += [{"quantizer_name": f"*{q}", "cfg": c} for q, c in fmt.modelopt_quantizer_cfgs().items()]
    mtq.quantize(net, {"quant_cfg": quant_cfg, "algorithm": "smoothquant"}, lambda m: [m(x) for x in batches])
    layer, x = net[0], batches[0]
    channel_amax = torch.stack([b.abs().reshape(-1, 256).amax(0) for b in batches]).amax(0).float()
    ours_scale = smoothquant.pre_quant_scale(channel_amax, original)
    modelopt_scale = layer.input_quantizer.pre_quant_scale
    assert torch.equal(ours_scale.to(modelopt_scale.dtype), modelopt_scale)
    assert modelopt_scale.float().std() > 0  # SmoothQuant really ran
    with torch.no_grad():
        # ModelOpt smoothed the weight in place (W * (1 / p)); we smooth the original the same way.
        assert torch.equal(fmt.smooth(original, ours_scale), layer.weight)
        assert torch.equal(fmt.quantize_weight(original, ours_scale), layer.weight_quantizer(layer.weight))
        ours_x = fmt.quantize_input(x, channel_amax, ours_scale)
        assert torch.equal(ours_x, layer.input_quantizer(x))
        assert torch.equal(torch.nn.functional.linear(ours_x, fmt.quantize_weight(original, ours_scale)), layer(x))


def test_honest_bits_equal_the_exported_checkpoints_bytes(exported, tiny_llama: Path) -> None:
    """Every layer's registry bits are exactly its tensors' bytes in the exported files, and the
    KV-cache scales are reported beside the weight bits, not in them."""
    checkpoint = exported[0]
    report = verify_checkpoint(checkpoint, PLAN, kv_cache="FP8")
    assert report.problems == []
    tensor_bits = stored_tensor_bits(checkpoint)
    model = load_model(ModelSource(tiny_llama, "tiny"))
    for name, fmt in PLAN.items():
        out_features, in_features = model.get_submodule(name).weight.shape
        stored = sum(bits for key, bits in tensor_bits.items() if key.rpartition(".")[0] == name and not key.endswith((".k_scale", ".v_scale")))
        assert FORMATS[fmt].storage_bits(out_features, in_features) == stored == report.layer_bits[name], name
    mxfp8 = report.layer_bits["model.layers.1.self_attn.o_proj"] / report.layer_params["model.layers.1.self_attn.o_proj"]
    assert mxfp8 == 8.25
    kv_scale_bits = sum(bits for key, bits in tensor_bits.items() if key.endswith((".k_scale", ".v_scale")))
    assert kv_scale_bits == 2 * 2 * 32  # two float32 scalars in each of the two attention layers
    assert report.effective_bits == sum(report.layer_bits.values()) / sum(report.layer_params.values())
    assert report.kv_cache == "FP8" and report.kv_layers == 2 and report.kv_bits_per_element == 8.0


def test_checkpoint_decodes_to_the_formats_quantizers(exported) -> None:
    """MXFP8 and W4A16_NVFP4 layers, as ModelOpt's exporter wrote them, decode bit for bit to our
    quantizers of the original weight. INT8_SQ layers decode to ModelOpt's own (CPU) fake-quantized
    smoothed weight but for 0.03-0.05% of weights (measured), each within 1.5 INT8 steps: the exporter
    divides by the scale in bf16 before rounding (two roundings; its fake quantization, and ours, one)."""
    checkpoint, weights = exported[:2]
    mismatch = {}
    for name, fmt_name in PLAN.items():
        fmt = FORMATS[fmt_name]
        if fmt_name not in NEW:
            continue
        tensors = read_layer_tensors(checkpoint, name)
        decoded = dequantize_weight(fmt, tensors).to(torch.bfloat16)
        if fmt_name == "INT8_SQ":
            reference = weights[f"{name}:modelopt"]
            step = tensors["weight_scale"].float().unsqueeze(-1)
            assert ((decoded.float() - reference.float()).abs() <= step * 1.5).all(), name  # measured: at most 1.28 steps
        else:
            tensor_amax = None
            if fmt.weight == "nvfp4":  # the exporter's global scale: a fused group's maximum amax
                tensor_amax = tensors["weight_scale_2"].float().reshape(()) * (6 * 448)
            reference = fmt.quantize_weight(weights[name], tensor_amax=tensor_amax)
        mismatch[name] = (decoded != reference).float().mean().item()
    assert {n: m for n, m in mismatch.items() if PLAN[n] != "INT8_SQ" and m} == {}
    int8 = [m for n, m in mismatch.items() if PLAN[n] == "INT8_SQ"]
    assert len(int8) == 3 and all(m < 0.002 for m in int8), mismatch


def test_kv_cache_scales_are_exported_as_modelopt_calibrates_them(exported, tiny_llama: Path) -> None:
    checkpoint, _, kv_amax, logits, batches = exported
    quant = read_quant_config(checkpoint)
    assert quant["kv_cache_quant_algo"] == "FP8"
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    tensors = load_file(checkpoint / "model.safetensors")
    for attention, (k_amax, v_amax) in kv_amax.items():
        k_scale, v_scale = tensors[f"{attention}.k_proj.k_scale"], tensors[f"{attention}.v_proj.v_scale"]
        assert k_scale.dtype == v_scale.dtype == torch.float32 and k_scale.numel() == 1
        assert torch.allclose(k_scale.reshape(()), k_amax.reshape(()) / 448) and torch.allclose(v_scale.reshape(()), v_amax.reshape(()) / 448)
    # The checkpoint, run as a runtime computes it (fake-quantized keys and values included), gives
    # the in-memory ModelOpt model's logits; without its KV cache it is measurably further away.
    with torch.no_grad():
        with_kv = load_fake_quant_model(checkpoint)(input_ids=batches[0]).logits.float()
    no_kv = checkpoint.parent / "no-kv"
    shutil.copytree(checkpoint, no_kv)
    save_file({k: v for k, v in tensors.items() if not k.endswith(("k_scale", "v_scale"))}, no_kv / "model.safetensors", metadata={"format": "pt"})
    hf_quant = json.loads((no_kv / "hf_quant_config.json").read_text())
    hf_quant["quantization"]["kv_cache_quant_algo"] = None
    (no_kv / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    with torch.no_grad():
        without_kv = load_fake_quant_model(no_kv)(input_ids=batches[0]).logits.float()
    error_with, error_without = ((with_kv - logits).norm() / logits.norm()).item(), ((without_kv - logits).norm() / logits.norm()).item()
    assert error_with < 0.05 and error_with < error_without and not torch.equal(with_kv, without_kv)


def test_verify_rules_of_the_new_formats_and_kv_cache(exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = exported[0]
    assert main(["verify", str(checkpoint)]) == 0
    assert "# KV cache FP8: 8 bits per cached element, k/v scales for 2 attention layers" in capsys.readouterr().out

    def damaged(name: str, edit) -> Path:
        copy_dir = tmp_path / name
        shutil.copytree(checkpoint, copy_dir)
        tensors = load_file(copy_dir / "model.safetensors")
        edit(tensors)
        save_file(tensors, copy_dir / "model.safetensors", metadata={"format": "pt"})
        return copy_dir

    def nan_e8m0(t: dict) -> None:
        t["model.layers.1.self_attn.o_proj.weight_scale"][0, 0] = 255

    cases = {
        "e8m0": (nan_e8m0, "model.layers.1.self_attn.o_proj (MXFP8): weight_scale has NaN (0xFF) E8M0 scales"),
        "int8 scale": (lambda t: t["model.layers.1.mlp.down_proj.weight_scale"].mul_(-1), "model.layers.1.mlp.down_proj (INT8_SQ)"),
        "sq prescale": (lambda t: t.pop("model.layers.0.mlp.up_proj.pre_quant_scale"), "model.layers.0.mlp.up_proj (INT8_SQ): missing pre_quant_scale"),
        "w4a16 scale2": (lambda t: t.pop("model.layers.1.mlp.gate_proj.weight_scale_2"), "model.layers.1.mlp.gate_proj (W4A16_NVFP4): missing weight_scale_2"),
        "k_scale": (lambda t: t.pop("model.layers.1.self_attn.k_proj.k_scale"), "model.layers.1.self_attn: kv_cache_quant_algo is FP8 but k_scale/v_scale"),
        "v_scale dtype": (lambda t: t.update({"model.layers.0.self_attn.v_proj.v_scale": t["model.layers.0.self_attn.v_proj.v_scale"].to(torch.bfloat16)}),
                          "model.layers.0.self_attn.v_proj.v_scale is BF16[], expected a float32 scalar"),
    }  # fmt: skip
    for case, (edit, message) in cases.items():
        path = damaged(case.replace(" ", "-"), edit)
        assert main(["verify", str(path)]) == 1, case
        assert message in capsys.readouterr().err, case
    assert verify_checkpoint(checkpoint, PLAN, kv_cache=None).problems == ["kv_cache_quant_algo is 'FP8', expected None"]


def test_vllm_serves_the_four_formats_with_an_fp8_kv_cache(exported, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plan with FP8, NVFP4, W4A16_NVFP4 and MXFP8 layers and an FP8 KV cache passes
    ``verify --runtime vllm``; the INT8_SQ layers are exactly what vLLM would load as unquantized."""
    checkpoint = exported[0]
    quant = read_quant_config(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    problems = vllm_problems(quant, config["quantization_config"])
    assert {p.split(":")[0] for p in problems} == {n for n, f in PLAN.items() if f == "INT8_SQ"}
    served = {n for n, f in PLAN.items() if f in VLLM_SERVED}
    assert {FORMATS[PLAN[n]].name for n in served} == set(VLLM_SERVED)
    vllm_dir = tmp_path / "vllm"
    shutil.copytree(checkpoint, vllm_dir)
    (vllm_dir / "autoq_manifest.json").unlink()  # this test edits the export: its hashes no longer hold
    for path in (vllm_dir / "hf_quant_config.json", vllm_dir / "config.json"):
        doc = json.loads(path.read_text())
        section = doc["quantization"] if "quantization" in doc else doc["quantization_config"]
        section["quantized_layers"] = {n: c for n, c in section["quantized_layers"].items() if n in served}
        path.write_text(json.dumps(doc))
    tensors = load_file(vllm_dir / "model.safetensors")
    # INT8_SQ layers out: put the unquantized layer back (a bf16 weight) as a BF16 plan would.
    for name, fmt in PLAN.items():
        if fmt == "INT8_SQ":
            stored = {k[len(name) + 1 :]: tensors.pop(k) for k in list(tensors) if k.rpartition(".")[0] == name}
            tensors[f"{name}.weight"] = dequantize_weight(FORMATS[fmt], stored).to(torch.bfloat16).contiguous()
    save_file(tensors, vllm_dir / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(vllm_dir), "--runtime", "vllm"]) == 0, capsys.readouterr().err
    assert "KV cache FP8" in capsys.readouterr().out
    tied = vllm_problems({**quant, "quantized_layers": {"lm_head": {"quant_algo": "FP8"}}}, None, tied_embeddings=True)
    assert any(p.startswith("lm_head: quantized, but tie_word_embeddings") for p in tied)


def test_converters_express_the_new_formats_in_their_own_libraries() -> None:
    formats = {"model.layers.0.self_attn.o_proj": "MXFP8", "model.layers.0.mlp.down_proj": "W4A16_NVFP4",
               "model.layers.0.mlp.up_proj": "INT8_SQ", "model.layers.0.mlp.gate_proj": "INT8_SQ", "lm_head": "BF16"}  # fmt: skip
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(to_llmcompressor(formats))
    assert [type(m).__name__ for m in recipe.modifiers] == ["SmoothQuantModifier", "QuantizationModifier"]
    assert recipe.modifiers[0].smoothing_strength == smoothquant.ALPHA
    groups = recipe.modifiers[1].config_groups
    assert groups["mxfp8"].weights.group_size == 32 and groups["mxfp8"].input_activations.dynamic is True
    assert groups["w4a16_nvfp4"].input_activations is None and groups["w4a16_nvfp4"].weights.group_size == 16
    int8 = groups["int8_sq"]
    assert (int8.weights.type, int8.weights.strategy, int8.input_activations.strategy, int8.input_activations.dynamic) == ("int", "channel", "tensor", False)
    assert set(int8.targets) == {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj"}

    from quark.torch.quantization.config import config as quark_config

    doc = to_quark(formats)
    parsed = quark_config.QConfig.from_dict(json.loads(json.dumps(doc)))
    assert set(parsed.layer_quant_config) == {n for n, f in formats.items() if f != "BF16"}
    mx = parsed.layer_quant_config["model.layers.0.self_attn.o_proj"]
    assert mx.weight.group_size == 32 and mx.input_tensors.is_dynamic
    assert parsed.layer_quant_config["model.layers.0.mlp.down_proj"].input_tensors is None
    assert str(parsed.layer_quant_config["model.layers.0.mlp.up_proj"].weight.qscheme).endswith("per_channel")


def test_kv_cache_switch_reaches_plan_checkpoint_and_sweep_rows(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, checkpoint = tmp_path / "run", tmp_path / "ckpt"
    argv = ["search", "--model", str(tiny_llama), "--space", "vllm", "--bits", "6", "--out", str(out), "--export", str(checkpoint)]
    assert main([*argv, "--kv-cache", "nvfp4", *FAST]) == 0
    assert "KV cache NVFP4: 4.5 bits per cached element" in capsys.readouterr().err
    plan = load_plan(out / "plan.json")
    assert plan.kv_cache == "NVFP4" and read_quant_config(checkpoint)["kv_cache_quant_algo"] == "NVFP4"
    # apply --kv-cache overrides the plan's, "none" included.
    assert main(["apply", str(out / "plan.json"), "--model", str(tiny_llama), "--export", str(tmp_path / "none"), "--kv-cache", "none", *FAST]) == 0
    assert read_quant_config(tmp_path / "none")["kv_cache_quant_algo"] is None
    assert verify_checkpoint(tmp_path / "none", plan.formats()).kv_layers == 0
    assert get_kv_cache_format("FP8") is KV_CACHE_FORMATS["FP8"] and get_kv_cache_format("none") is None


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-3 fuses q/k/v into one ``qkv_proj``: no ``k_proj`` / ``v_proj`` for the exporter to write k/v scales under."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from autoq.default_model import train_tokenizer

    tokenizer = train_tokenizer()
    config = AutoConfig.for_model("phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=len(tokenizer), pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-phi3"
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_kv_cache_needs_attention_layers_the_exporter_knows(tiny_phi3: Path, tiny_llama: Path) -> None:
    phi3, llama = (load_model(ModelSource(p, p.name)) for p in (tiny_phi3, tiny_llama))
    check_kv_cache_fits_model(phi3, None)
    check_kv_cache_fits_model(llama, KV_CACHE_FORMATS["NVFP4"])
    with pytest.raises(AutoqError, match="--kv-cache fp8: Phi3ForCausalLM has no attention layers the exporter writes KV-cache scales for"):
        check_kv_cache_fits_model(phi3, KV_CACHE_FORMATS["FP8"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_protected_blocks_and_lm_head_candidates(tiny_llama: Path, tmp_path: Path) -> None:
    """protect pins the first / last blocks (counted in the bits); lm_head gets its own candidates."""
    from autoq.decoder import DecoderStructure

    model = load_model(ModelSource(tiny_llama, "tiny"))
    space = parse_search_space("formats: [NVFP4, FP8, BF16]\nprotect: {first_blocks: 1, format: FP8}\nlm_head: {formats: [MXFP8, BF16]}\n", "t")
    choices = {c.name: c.candidates for c in select_layers(model, space, DecoderStructure(model).lm_head_name)}
    assert all(choices[n] == ("FP8",) for n in choices if n.startswith("model.layers.0."))
    assert all(choices[n] == ("NVFP4", "FP8", "BF16") for n in choices if n.startswith("model.layers.1."))
    assert choices["lm_head"] == ("MXFP8", "BF16") and len(choices) == 15
    # --protect on the command line (over the space's none): block 0 stays BF16, and still counts in the bits.
    out = tmp_path / "run"
    assert main(["search", "--model", str(tiny_llama), "--space", "vllm", "--bits", "11", "--out", str(out), "--protect", "first=1", *FAST]) == 0
    plan = load_plan(out / "plan.json")
    assert {l.format for n, l in plan.layers.items() if n.startswith("model.layers.0.")} == {"BF16"}
    searched_bits = sum(l.bits for l in plan.layers.values()) / sum(l.params for l in plan.layers.values())
    assert searched_bits == pytest.approx(plan.achieved["searched_effective_bits"]) and 10.25 <= searched_bits <= 11


BAD = {
    "MXFP8 pinned on 48 inputs": (["search", "--bits", "6", "--model", "{model48}", "--space", "{space_mx}"],
                                  "model.layers.0.self_attn.q_proj (48x48) is pinned to MXFP8, which cannot store that shape"),
    "MXFP8 planned on 48 inputs": (["apply", "{plan_mx}", "--model", "{model48}", "--export", "{out}"], "model.layers.0.self_attn.q_proj"),
    "--kv-cache unknown": (["search", "--bits", "6", "--model", "{model}", "--kv-cache", "int4"], "argument --kv-cache: invalid choice"),
    "kv_cache unknown in a plan": (["apply", "{plan_kv}", "--model", "{model}", "--export", "{out}"], "unknown KV-cache format 'INT4'"),
    "--kv-cache without k_proj/v_proj": (["search", "--bits", "12", "--model", "{phi3}", "--kv-cache", "fp8"],
                                         "--kv-cache fp8: Phi3ForCausalLM has no attention layers the exporter writes KV-cache scales for"),
    "--protect garbage": (["search", "--bits", "6", "--model", "{model}", "--protect", "first=x"], "--protect first must be a non-negative integer"),
    "--protect unknown format": (["search", "--bits", "6", "--model", "{model}", "--protect", "first=1,format=FP6"], "unknown format 'FP6'"),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_llama_48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input sizes of 48: no MXFP8 (blocks of 32) layer fits."""
    from autoq.default_model import write_random_model

    shape = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-llama-48", "llama", seed=4, **shape)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_formats_and_switches_exit_2_with_one_line_and_write_nothing(
    case: str, tiny_llama: Path, tiny_llama_48: Path, tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def plan(layers: dict[str, str], **extra) -> str:
        return json.dumps({"schema": "autoq.plan", "version": 1, "layers": {n: {"format": f} for n, f in layers.items()}, **extra})

    files = {
        "space_mx": ("space.yaml", "formats: [FP8, BF16]\npin: {'*q_proj': MXFP8}\n"),
        "plan_mx": ("plan.json", plan({"model.layers.0.self_attn.q_proj": "MXFP8"})),
        "plan_kv": ("plan.json", plan({"model.layers.0.mlp.up_proj": "FP8"}, kv_cache="INT4")),
    }
    values = {"model": str(tiny_llama), "model48": str(tiny_llama_48), "phi3": str(tiny_phi3), "out": str(tmp_path / "out")}
    for key, (filename, text) in files.items():
        values[key] = str(_write(tmp_path / f"{key}-{filename}", text))
    argv, message = BAD[case]
    argv = [a.format(**values) for a in argv] + (["--out", str(tmp_path / "out")] if argv[0] == "search" else []) + FAST
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoq: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_sweep_rows_carry_the_kv_cache_and_new_uniform_baselines(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--kv-cache fp8 quantizes every quantized row's KV cache (the BF16 row keeps 16 bits); the same
    rows without it are not reused, and measure a smaller KL."""
    import pandas as pd

    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(tiny_llama), "--space", "fp8_w4a8", "--bits", "6", "--baselines", "bf16,mxfp8", "--out", str(out),
            "--calib-samples", "8", "--seq-len", "64", "--eval-samples", "4", "--tasks", "ppl,kl", "--no-progress"]  # fmt: skip
    assert main([*argv, "--kv-cache", "fp8"]) == 0
    with_kv = pd.read_csv(out / "results.csv").set_index("row")
    assert with_kv.loc["bf16", "kv_bits"] == 16 and pd.isna(with_kv.loc["bf16", "kv_cache"])
    assert (with_kv.loc[["autoq-6", "uniform-MXFP8"], "kv_cache"] == "FP8").all() and (with_kv.loc[["autoq-6", "uniform-MXFP8"], "kv_bits"] == 8).all()
    assert with_kv.loc["uniform-MXFP8", "stored_bits"] == 8.25
    capsys.readouterr()
    assert main(argv) == 0
    assert "not reused, because the configuration changed (kv_cache)" in capsys.readouterr().err
    without_kv = pd.read_csv(out / "results.csv").set_index("row")
    assert (without_kv.loc[["autoq-6", "uniform-MXFP8"], "kv_bits"] == 16).all()
    assert (with_kv.loc[["autoq-6", "uniform-MXFP8"], "kl"] > without_kv.loc[["autoq-6", "uniform-MXFP8"], "kl"]).all()
