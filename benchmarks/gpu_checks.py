"""Numerical agreement with ModelOpt on CUDA (run on a GPU; prints a table, writes JSON).

0. autoq's fused (``torch.compile``) quantizers against the same functions run eagerly.
1. Fake quantization: autoq's pure-torch FP8 / W4A8 / NVFP4 / W4A16_NVFP4 / MXFP8 / INT8_SQ
   against ModelOpt's CUDA and Triton kernels on the same calibrated quantizers (weights,
   activations, layer outputs). ModelOpt's MXFP8 and NVFP4 fake quantization is CUDA-only: these
   rows are the equality test of those formats (on CPU, autoq compares MXFP8 with the exporter's
   ``MXFP8QTensor`` and NVFP4 with ``NVFP4QTensor``).
2. Checkpoints: NVFP4 / W4A16_NVFP4 / MXFP8 / FP8 / W4A8 weights dequantized from a unified HF
   checkpoint exported on CUDA against ModelOpt's fake-quantized weights of the same model.
3. A 1B random Llama (Llama-3.2-1B shapes, 4096-token vocabulary): ``autoq search`` over the
   ``vllm`` space (FP8, NVFP4, W4A16_NVFP4, MXFP8, BF16) at 6 bits, and a plan using all four
   quantized formats with an FP8 KV cache, applied, exported, verified and checked against vLLM's
   loader rules, timed.

    python benchmarks/gpu_checks.py --out reports/benchmarks/gpu_checks.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def fake_quant_agreement(device: str) -> list[dict]:
    import modelopt.torch.quantization as mtq

    from autoq.formats import FORMATS

    rows = []
    for name in ("FP8", "W4A8", "NVFP4", "W4A16_NVFP4", "MXFP8", "INT8_SQ"):
        fmt = FORMATS[name]
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(1024, 768, bias=False)).to(device, torch.bfloat16)
        with torch.no_grad():
            net[0].weight.mul_((torch.rand(1, 1024, device=device) * 4).to(torch.bfloat16))
        batches = [(torch.randn(8, 64, 1024, device=device) * torch.rand(1024, device=device) * 3).to(torch.bfloat16) for _ in range(4)]
        cfg = [{"quantizer_name": "*", "enable": False}]
        cfg += [{"quantizer_name": f"*{q}", "cfg": c} for q, c in fmt.modelopt_quantizer_cfgs().items() if c is not None]
        algorithm = {"method": "awq_lite", "alpha_step": 0.1} if fmt.awq else fmt.calibration
        mtq.quantize(net, {"quant_cfg": cfg, "algorithm": algorithm}, lambda m: [m(x) for x in batches])
        layer, x = net[0], batches[0]
        with torch.no_grad():
            ref_w = layer.weight_quantizer(layer.weight)
            ours_w = fmt.quantize_weight(layer.weight)  # ModelOpt smoothed the weight in place (AWQ, SmoothQuant)
            scale = layer.input_quantizer.pre_quant_scale
            scaled = x * scale if scale is not None else x
            ref_x = layer.input_quantizer(x)
            amax = layer.input_quantizer.amax  # None: dynamic (MXFP8) or no activation quantizer (W4A16_NVFP4)
            ours_x = fmt.quantize_input(scaled, None if amax is None else amax.float().reshape(1))
            ref_y, ours_y = layer(x), torch.nn.functional.linear(ours_x, ours_w)
        rows.append({
            "check": "fake-quant vs ModelOpt (CUDA kernels)", "format": name,
            "weight_mismatch_fraction": (ref_w != ours_w).float().mean().item(),
            "input_mismatch_fraction": (ref_x != ours_x).float().mean().item(),
            "output_max_abs_diff": (ref_y.float() - ours_y.float()).abs().max().item(),
        })  # fmt: skip
    return rows


def compiled_agreement(device: str) -> list[dict]:
    """The fused (``torch.compile``) quantizers against the same functions run eagerly on CUDA,
    on AWQ-smoothed-like weights of the shapes a 1B Llama has."""
    from autoq import fakequant

    rows = []
    for out_features, in_features in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)):
        torch.manual_seed(out_features + in_features)
        w = (torch.randn(out_features, in_features, device=device) * torch.rand(in_features, device=device) * 3).to(torch.bfloat16)
        amax = w.abs().amax().float()
        block_amax = fakequant.int_block_amax.__wrapped__(w, 128)
        row_amax = fakequant.int_block_amax.__wrapped__(w, in_features)
        pairs = {
            "int4 (group 128)": (fakequant.int_block(w, block_amax, 4, 128), fakequant.int_block.__wrapped__(w, block_amax, 4, 128)),
            "int4 block amax": (fakequant.int_block_amax(w, 128), block_amax),
            "int8 (per channel)": (fakequant.int_block(w, row_amax, 8, in_features), fakequant.int_block.__wrapped__(w, row_amax, 8, in_features)),
            "int8 (per tensor)": (fakequant.int_tensor(w, amax, 8), fakequant.int_tensor.__wrapped__(w, amax, 8)),
            "fp8": (fakequant.fp8_e4m3(w, amax), fakequant.fp8_e4m3.__wrapped__(w, amax)),
            "mxfp8": (fakequant.mxfp8(w, 32), fakequant.mxfp8.__wrapped__(w, 32)),
        }
        for name, (fused, eager) in pairs.items():
            rows.append({"check": "fused vs eager on CUDA", "format": name, "shape": f"{out_features}x{in_features}",
                         "mismatch_fraction": (fused != eager).float().mean().item()})  # fmt: skip
    return rows


def checkpoint_agreement(device: str) -> list[dict]:
    from autoq.apply import apply_plan, export_checkpoint
    from autoq.codec import dequantize_weight, read_layer_tensors
    from autoq.data import load_tokens
    from autoq.default_model import write_random_model
    from autoq.formats import FORMATS
    from autoq.model import ModelSource, load_model, load_tokenizer
    from autoq.plan import LayerPlan, Plan

    plan = {f"model.layers.0.self_attn.{p}_proj": "NVFP4" for p in "qkv"}
    plan |= {"model.layers.0.self_attn.o_proj": "FP8", "model.layers.0.mlp.down_proj": "W4A8"}
    plan |= {"model.layers.1.mlp.gate_proj": "NVFP4", "model.layers.1.mlp.up_proj": "NVFP4"}
    plan |= {f"model.layers.1.self_attn.{p}_proj": "MXFP8" for p in "qkv"}
    plan |= {"model.layers.1.self_attn.o_proj": "W4A16_NVFP4", "model.layers.1.mlp.down_proj": "MXFP8"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_model(Path(tmp) / "m", "llama", seed=0, hidden_size=512, intermediate_size=1536,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
        source = ModelSource(path, "m")
        tokenizer = load_tokenizer(source)
        model = apply_plan(load_model(source, device=device), plan, load_tokens("default", tokenizer, 8, 128).batches(4), progress=False)
        modules = dict(model.named_modules())
        with torch.no_grad():
            fake = {n: modules[n].weight_quantizer(modules[n].weight).float().cpu() for n in plan}
            autoq_fake = {n: FORMATS[f].quantize_weight(modules[n].weight, tensor_amax=modules[n].weight_quantizer.amax
                                                        if FORMATS[f].weight == "nvfp4" else None).float().cpu() for n, f in plan.items()}  # fmt: skip
        export_checkpoint(model, tokenizer, Plan(layers={n: LayerPlan(format=f) for n, f in plan.items()}), Path(tmp) / "ckpt")
        for name, fmt in plan.items():
            ours = dequantize_weight(FORMATS[fmt], read_layer_tensors(Path(tmp) / "ckpt", name)).to(torch.bfloat16).float()
            pure_torch = autoq_fake[name]
            rows.append({
                "check": "checkpoint dequantized vs ModelOpt fake-quant (CUDA)", "format": fmt, "layer": name,
                "weight_mismatch_fraction": (ours != fake[name]).float().mean().item(),
                "max_abs_diff": (ours - fake[name]).abs().max().item(),
                "max_abs_weight": fake[name].abs().max().item(),
                "vs_autoq_pure_torch_mismatch_fraction": (ours != pure_torch).float().mean().item(),
            })  # fmt: skip
    return rows


LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)


def one_billion_plan(device: str, shape: dict = LLAMA_1B) -> list[dict]:
    """``autoq search`` over the vllm space on a random 1B Llama at 6 bits, then a plan with every
    vLLM-served format (blocks take FP8 / NVFP4 / W4A16_NVFP4 / MXFP8 in turn) and an FP8 KV cache,
    applied, exported and verified, with vLLM's loader rules; each step timed."""
    from autoq import pipeline
    from autoq.checkpoint import read_quant_config
    from autoq.default_model import write_random_model
    from autoq.formats import KV_CACHE_FORMATS
    from autoq.interop.vllm import vllm_problems
    from autoq.plan import LayerPlan, Plan
    from autoq.sensitivity import ScoringOptions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = write_random_model(Path(tmp) / "llama-1b", "llama", seed=0, **shape)
        work = pipeline.prepare(str(path), "vllm", "default", 16, 256, kv_cache="fp8")
        written = time.perf_counter() - start
        scores = pipeline.score(work, ScoringOptions(device=device, progress=False), cache_dir=Path(tmp) / "cache")
        (searched,), _ = pipeline.make_plans(work, scores, [6.0], "fisher")
        rows.append({"check": "1B random Llama: autoq search, vllm space, 6 bits", "model_write_seconds": written,
                     "scoring_seconds": scores.seconds, "searched_bits": searched.achieved["searched_effective_bits"],
                     "format_share": json.dumps(searched.achieved["format_share"])})  # fmt: skip
        cycle = ("FP8", "NVFP4", "W4A16_NVFP4", "MXFP8")
        formats = {c.name: cycle[int(c.name.split(".")[2]) % len(cycle)] for c in work.choices}
        plan = Plan(layers={n: LayerPlan(format=f) for n, f in formats.items()}, kv_cache=KV_CACHE_FORMATS["FP8"].name)
        start = time.perf_counter()
        (Path(tmp) / "ckpt").mkdir()
        report = pipeline.export_plan(work, plan, "bfloat16", device, False, 4, Path(tmp) / "ckpt", progress=False)
        config = json.loads((Path(tmp) / "ckpt" / "config.json").read_text())
        problems = vllm_problems(read_quant_config(Path(tmp) / "ckpt"), config.get("quantization_config"), config.get("tie_word_embeddings", False))
        rows.append({"check": "1B random Llama: FP8/NVFP4/W4A16_NVFP4/MXFP8 plan + FP8 KV, apply+export+verify",
                     "seconds": time.perf_counter() - start, "stored_bits": report.effective_bits, "kv_cache": report.kv_cache,
                     "kv_layers": report.kv_layers, "verify_problems": len(report.problems), "vllm_problems": "; ".join(problems) or "none"})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/gpu_checks.json"))
    args = parser.parse_args()
    device = "cuda"
    rows = compiled_agreement(device) + fake_quant_agreement(device) + checkpoint_agreement(device) + one_billion_plan(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    for row in rows:
        print(" | ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
