"""CUDA checks of issue 11 (file-to-file export, scoring from disk), for one H100/H200.

``nvfp4``: the streamed export (CUDA) against ModelOpt's ``export_hf_checkpoint`` after ModelOpt's
CUDA calibration (its own NVFP4 kernels), the streamed exporter given the calibration ModelOpt chose
(``autoq.apply.modelopt_calibration_state``), as ``tests/test_export.py`` does on the CPU. Prints,
per stored tensor kind, the fraction of differing bytes, and the logits of both dequantized
checkpoints against each other and the unquantized model.

``disk-scoring``: ``autoq search --stream-blocks`` on a random model with Qwen2.5-14B shapes (Llama
architecture, bf16, about 29.5 GB in 6 shards, written to the device's disk in the same call) under a
GPU-memory cap smaller than its weights; reports peak RSS and peak GPU memory (``search.json``) and
exports the 4.8-bit plan with the streamed engine (its peak RSS too).

    python benchmarks/gpu_export_checks.py nvfp4 --out reports/benchmarks/gpu_export_nvfp4.json
    python benchmarks/gpu_export_checks.py disk-scoring --cap-gib 20 --work /tmp/w14 \\
        --out reports/benchmarks/gpu_disk_scoring_14b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_export import measured, write_random_model

QWEN25_14B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                  vocab_size=152064)  # fmt: skip


def nvfp4_check() -> dict:
    from safetensors.torch import load_file

    from autoq.apply import apply_plan, export_checkpoint, modelopt_calibration_state
    from autoq.checkpoint import load_fake_quant_model
    from autoq.data import load_tokens
    from autoq.default_model import write_random_model as write_small
    from autoq.export import stream_export
    from autoq.model import ModelSource, load_model, load_tokenizer
    from autoq.plan import LayerPlan, Plan
    from autoq.search_space import all_layers

    work = Path(tempfile.mkdtemp())
    model_dir = write_small(work / "model", "llama", seed=0, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    source = ModelSource(model_dir, "random")
    tokenizer = load_tokenizer(source)
    batches = [b.cuda() for b in load_tokens("default", tokenizer, 16, 256).batches(4)]
    names = [layer.name for layer in all_layers(load_model(source)) if ".layers." in layer.name]
    results = {}
    for label, formats in (("NVFP4", dict.fromkeys(names, "NVFP4")),
                           ("mixed", {n: ("NVFP4", "FP8", "W4A8", "INT4_AWQ")[int(n.split(".layers.")[1].split(".")[0]) % 4] for n in names})):  # fmt: skip
        plan = Plan(layers={n: LayerPlan(format=f) for n, f in formats.items()})
        model = apply_plan(load_model(source, device="cuda"), formats, batches, progress=False)
        state = modelopt_calibration_state(model, formats, batches[0][:1, :16])
        export_checkpoint(model, tokenizer, plan, work / label / "modelopt")
        del model
        stream_export(model_dir, plan, state, work / label / "streamed", tokenizer, device="cuda", progress=False)
        theirs = load_file(work / label / "modelopt" / "model.safetensors")
        ours = load_file(work / label / "streamed" / "model.safetensors")
        by_kind: dict[str, list[int]] = {}
        for key, tensor in theirs.items():
            kind = key.rsplit(".", 1)[1] + (f" ({formats[key.rsplit('.', 1)[0]]})" if key.rsplit(".", 1)[0] in formats else "")
            a, b = ours[key].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            counts = by_kind.setdefault(kind, [0, 0])
            counts[0] += int((a != b).sum())
            counts[1] += a.numel()
        ids = batches[-1][:2]
        with torch.no_grad():
            x, y = (load_fake_quant_model(work / label / e).cuda()(input_ids=ids).logits.float() for e in ("streamed", "modelopt"))
            reference = load_model(source, device="cuda")(input_ids=ids).logits.float()
        results[label] = {
            "same_names_dtypes_shapes": {k: (str(v.dtype), tuple(v.shape)) for k, v in ours.items()}
            == {k: (str(v.dtype), tuple(v.shape)) for k, v in theirs.items()},
            "differing_byte_fraction": {kind: d / n for kind, (d, n) in sorted(by_kind.items())},
            "configs_equal": all(
                json.loads((work / label / "streamed" / f).read_text()) == json.loads((work / label / "modelopt" / f).read_text())
                for f in ("hf_quant_config.json", "config.json")
            ),
            "logit_distance_stream_vs_modelopt": ((x - y).norm() / y.norm()).item(),
            "logit_distance_stream_vs_bf16": ((x - reference).norm() / reference.norm()).item(),
            "logit_distance_modelopt_vs_bf16": ((y - reference).norm() / reference.norm()).item(),
        }
        print(label, json.dumps(results[label], indent=1), flush=True)
    return results


def disk_scoring(work: Path, cap_gib: float) -> dict:
    start = time.perf_counter()
    model_dir = write_random_model(work / "random-14b", QWEN25_14B, shards=6)
    written = time.perf_counter() - start
    total = torch.cuda.get_device_properties(0).total_memory
    run, cache = work / "run", work / "cache"
    search = ["search", "--model", str(model_dir), "--bits", "4.8", "--stream-blocks", "--device", "cuda", "--calib-samples", "16",
              "--seq-len", "512", "--out", str(run), "--overwrite", "--no-progress", "--cache-dir", str(cache)]  # fmt: skip
    capped = (f"import torch, sys; torch.cuda.set_per_process_memory_fraction({cap_gib * 2**30 / total}); "
              f"from autoq.cli import main; sys.exit(main({search!r}))")  # fmt: skip
    wall, rss, _ = measured([sys.executable, "-c", capped])
    summary = json.loads((run / "search.json").read_text())
    weights_gib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**30
    export = [sys.executable, "-m", "autoq", "apply", str(run / "plan.json"), "--model", str(model_dir), "--export", str(work / "ckpt"),
              "--engine", "stream", "--device", "cuda", "--calib-samples", "16", "--seq-len", "512", "--overwrite", "--no-progress"]  # fmt: skip
    export_wall, export_rss, err = measured(export, {"AUTOQ_CACHE": str(cache)})
    return {
        "model": "random, Qwen2.5-14B shapes (Llama architecture), bf16", "weights_gib": weights_gib, "write_s": written,
        "gpu": torch.cuda.get_device_name(0), "gpu_cap_gib": cap_gib,
        "search_wall_s": wall, "search_peak_rss_gib": rss, "search_peak_memory": summary["peak_memory"],
        "scoring_seconds": summary["scoring_seconds"],
        "export_wall_s": export_wall, "export_peak_rss_gib": export_rss,
        "export_reused_state": "reusing the search's calibration state" in err,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["nvfp4", "disk-scoring"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "autoq-gpu-export")
    parser.add_argument("--cap-gib", type=float, default=20.0, help="GPU memory cap for disk-scoring (below the weights' size)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    os.environ.setdefault("AUTOQ_OFFLINE", "1")
    result = nvfp4_check() if args.check == "nvfp4" else disk_scoring(args.work, args.cap_gib)
    result["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
