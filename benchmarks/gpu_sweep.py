"""A sweep on the GPU: a ~1B-parameter random Llama, autoq at several budgets against BF16, uniform
FP8 / W4A8 / NVFP4 and ModelOpt auto_quantize, then the report.

    python benchmarks/gpu_sweep.py --out runs/gpu-sweep --report reports/sweep-llama-1b

``--modelopt-eager`` makes ModelOpt use its PyTorch fallbacks for FP8 / INT4 fake quantization
instead of JIT-compiling its CUDA extensions (minutes on a fresh machine); ``gpu_checks.py``
shows both give the same numbers as autoq's quantizers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-sweep"))
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="a model directory (default: a random 1B Llama)")
    parser.add_argument("--bits", default="4.8,6")
    parser.add_argument("--calib-samples", default="32")
    parser.add_argument("--eval-samples", default="16")
    parser.add_argument("--modelopt-eager", action="store_true")
    args = parser.parse_args()
    if args.modelopt_eager:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext.extension = None
        extensions.get_cuda_ext_fp8.extension = None
    from autoq.cli import main as autoq
    from autoq.default_model import write_random_model

    model = args.model
    if model is None:
        model = args.out.parent / "random-llama-1b"
        if not model.exists():
            write_random_model(model, "llama", seed=0, **LLAMA_1B)
    code = autoq(["sweep", "--model", str(model), "--bits", args.bits, "--out", str(args.out), "--calib-samples", args.calib_samples,
                  "--eval-samples", args.eval_samples, "--no-progress"])  # fmt: skip
    if code == 0 and args.report is not None:
        autoq(["report", str(args.out), "--out", str(args.report), "--overwrite"])


if __name__ == "__main__":
    main()
