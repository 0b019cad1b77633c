"""Data-parallel scoring on several GPUs of one host (issue 14), through the real command line.

Parts (``--parts``, any of them, in one call or in separate calls on the same warm machine; each
part replaces its own rows of the CSV):

* ``scaling``: a random-init model of each ``--sizes`` (default ``3b``: Llama-3.2-3B shapes, hidden
  3072, intermediate 8192, 28 layers, 24 heads, 8 KV heads, vocab 128256, bf16) is written to
  ``--work`` as safetensors, then searched with ``autoq search`` in N = ``--ranks`` processes
  (N = 1: one process; N > 1: ``--gpus N``), all with the same calibration: ``--batches`` batches
  of 4 x ``--seq-len`` tokens (default 64 x 4 x 512). Reported per N: the command's wall time, its
  scoring time without model loading (``scoring_s``), each GPU's peak memory
  (``torch.cuda.max_memory_allocated`` per rank), each rank's peak RSS, the host's peak used
  memory, and the agreement with N = 1 (largest relative score difference, identical plan).
* ``big``: a random-init Qwen2.5-32B-shape model (hidden 5120, intermediate 27648, 64 layers, 40
  heads, 8 KV heads, vocab 152064, untied, about 61 GiB bf16) written to ``--work`` in safetensors
  shards, searched with blocks streamed (``--stream-blocks``) on ``--gpus`` GPUs: wall time,
  per-GPU peak memory, per-rank peak RSS and the host's peak used memory.
* ``modelopt``: ModelOpt ``mtq.auto_quantize`` (gradient method, the same formats and batches) on
  the same 32B model on one GPU, in a subprocess with a time limit: its time and peak memory, or
  the error it hits (out of memory).

The calibration text is autoq's bundled corpus, repeated to give enough tokens (the models are
random: the text only has to be the same for every run). All rows go to ``--out/bench_multi_gpu.csv``
with ``time_ratio`` and ``mem_ratio`` against the row's ``baseline``: scaling rows against N = 1
of the same model (scoring time; largest per-GPU peak), the 32B autoq row against ModelOpt's 32B
run (empty when ModelOpt did not finish).

    # nvidia-h100-x2, one call per part so that each fits a 10-minute limit (the 32B model stays in
    # --work while the machine is warm; all three in one call: --parts scaling,big,modelopt)
    python benchmarks/bench_multi_gpu.py --parts scaling --work /tmp/autoq-bench --out reports/benchmarks
    python benchmarks/bench_multi_gpu.py --parts big --work /tmp/autoq-bench --out reports/benchmarks
    python benchmarks/bench_multi_gpu.py --parts modelopt --work /tmp/autoq-bench --out reports/benchmarks
    # nvidia-h100-x4: add N = 4 on the 3B model
    python benchmarks/bench_multi_gpu.py --parts scaling --ranks 1,2,4 --work /tmp/autoq-bench --out reports/benchmarks
    # CPU smoke test of this script (gloo processes, tiny models)
    python benchmarks/bench_multi_gpu.py --device cpu --sizes tiny --big tiny-qwen2 --batches 4 --seq-len 64 --out /tmp/bench-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

SHAPES = {
    "tiny": ("llama", {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": True}),
    "3b": ("llama", {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
                     "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "max_position_embeddings": 4096,
                     "rope_theta": 500000.0}),
    "tiny-qwen2": ("qwen2", {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False}),
    "32b": ("qwen2", {"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                      "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
                      "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}),
}  # fmt: skip
SHARD_BYTES = 4 << 30
COMPLETE = "bench_complete.json"  # written last: a model directory without it is rewritten


def write_model(name: str, path: Path, device: str, seed: int = 0) -> Path:
    """A random-init causal LM of ``SHAPES[name]`` as a HF directory (config, autoq's synthetic
    tokenizer, safetensors shards with an index), written tensor by tensor: it never exists whole
    in memory. Weights N(0, 0.02), norms 1, biases 0 (transformers' initialisation). Reused if
    already complete."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from autoq.default_model import train_tokenizer

    architecture, shape = SHAPES[name]
    if (path / COMPLETE).is_file() and json.loads((path / COMPLETE).read_text()) == {"shape": name, "seed": seed}:
        return path
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.safetensors"):
        old.unlink()
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(architecture, **shape, architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[architecture]])
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0
    writers = ThreadPoolExecutor(max_workers=4)  # shards are written while the next ones are drawn
    pending = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            pending.append(writers.submit(save_file, shard, str(path / file), metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

    for param_name, param in skeleton.named_parameters():  # tied weights appear once
        if param_name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=torch.bfloat16)
        elif param_name.endswith(".bias"):
            tensor = torch.zeros(param.shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(param.shape, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        if shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[param_name], shard_bytes, total = tensor, shard_bytes + tensor.nbytes, total + tensor.nbytes
    flush()
    for write in pending:
        write.result()
    writers.shutdown()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / COMPLETE).write_text(json.dumps({"shape": name, "seed": seed}))
    return path


def calibration_text(work: Path, tokens_needed: int) -> Path:
    """autoq's bundled corpus, repeated until it holds ``tokens_needed`` tokens (about 3 characters a token)."""
    from autoq.data import bundled_corpus

    corpus = bundled_corpus()
    path = work / "calibration.txt"
    path.write_text("\n".join([corpus] * (1 + 4 * tokens_needed // len(corpus))))
    return path


@contextlib.contextmanager
def host_memory(interval_s: float = 0.2) -> Iterator[dict[str, float]]:
    """The host's peak used memory (MemTotal - MemAvailable) above its level at the start, sampled
    while the ``with`` block runs: ``["peak_gib"]`` once it has ended."""

    def used() -> int:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(fields["MemTotal"].split()[0]) - int(fields["MemAvailable"].split()[0])) * 1024

    start, peak, stop = used(), [0], threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], used() - start)

    result: dict[str, float] = {}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_gib"] = max(peak[0], used() - start) / 2**30


def run_search(model: Path, out: Path, processes: int, args: argparse.Namespace, batches: int, stream: bool) -> dict:
    """One ``autoq search`` (fresh score cache), timed from the outside; its search.json inside."""
    command = [sys.executable, "-m", "autoq", "search", "--model", str(model), "--space", str(args.space), "--calib", str(args.calib),
               "--calib-samples", str(4 * batches), "--seq-len", str(args.seq_len), "--batch-size", "4", "--bits", args.bits,
               "--device", args.device, "--out", str(out), "--overwrite", "--cache-dir", str(out.parent / f"{out.name}-cache"),
               "--no-progress"]  # fmt: skip
    if processes > 1:
        command += ["--gpus", str(processes)]
    if stream:
        command.append("--stream-blocks")
    shutil.rmtree(out.parent / f"{out.name}-cache", ignore_errors=True)
    with host_memory() as host:
        start = time.perf_counter()
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        return {"status": f"failed ({result.returncode}): {(result.stderr.strip().splitlines() or [''])[-1][:200]}", "wall_s": wall}
    summary = json.loads((out / "search.json").read_text())
    ranks = summary["peak_memory_per_rank"]
    gpu = [r.get("cuda_allocated_gib", float("nan")) for r in ranks]
    return {
        "status": "ok", "wall_s": wall, "load_s": summary["model_load_seconds"],
        "scoring_s": summary["scoring_seconds"] - summary["model_load_seconds"],
        "gpu_peak_gib_per_rank": ";".join(f"{g:.2f}" for g in gpu), "gpu_peak_gib": max(gpu),
        "rss_gib_per_rank": ";".join(f"{r['cpu_rss_gib']:.2f}" for r in ranks), "host_used_peak_gib": host["peak_gib"],
    }  # fmt: skip


def agreement(reference: Path, other: Path) -> dict:
    key = ["layer", "format"]
    a = pd.read_parquet(reference / "scores.parquet").set_index(key).score
    b = pd.read_parquet(other / "scores.parquet").set_index(key).score
    rel = ((a - b).abs() / a.abs().where(a != 0, 1.0)).max()
    plans = [{n: layer["format"] for n, layer in json.loads((d / "plan.json").read_text())["layers"].items()} for d in (reference, other)]
    return {"score_max_rel_diff": float(rel), "plan_identical": plans[0] == plans[1]}


def params_of(model: Path) -> int:
    index = model / "model.safetensors.index.json"
    return json.loads(index.read_text())["metadata"]["total_size"] // 2  # bf16


def scaling(args: argparse.Namespace) -> list[dict]:
    rows = []
    ranks = [int(n) for n in args.ranks.split(",")]
    for size in args.sizes.split(","):
        model = write_model(size, args.work / f"model-{size}", args.generate_on)
        for n in sorted(set(ranks)):  # warm-up: kernels compiled (one step per rank), weights in the page cache
            run_search(model, args.work / "warmup", n, args, batches=4 * n, stream=False)
        results = {n: run_search(model, args.work / f"{size}-n{n}", n, args, args.batches, stream=False) for n in ranks}
        base = results.get(1, {})
        for n, result in results.items():
            row = {"part": "scaling", "model": size, "params": params_of(model), "processes": n, "device": args.device,
                   "calibration": f"{args.batches} x 4 x {args.seq_len}", "streamed": False, **result, "baseline": "autoq, 1 process"}  # fmt: skip
            if result["status"] == "ok" and base.get("status") == "ok":
                row |= agreement(args.work / f"{size}-n1", args.work / f"{size}-n{n}")
                row |= {"time_ratio": result["scoring_s"] / base["scoring_s"], "wall_ratio": result["wall_s"] / base["wall_s"],
                        "mem_ratio": result["gpu_peak_gib"] / base["gpu_peak_gib"] if args.device == "cuda" else None}  # fmt: skip
            rows.append(row)
    return rows


def big(args: argparse.Namespace) -> list[dict]:
    model = write_model(args.big, args.work / f"model-{args.big}", args.generate_on)
    result = run_search(model, args.work / f"{args.big}-streamed", args.gpus, args, args.big_batches, stream=True)
    return [{"part": "big", "model": args.big, "params": params_of(model), "processes": args.gpus, "device": args.device,
             "calibration": f"{args.big_batches} x 4 x {args.seq_len}", "streamed": True, **result,
             "baseline": "ModelOpt auto_quantize, 1 GPU"}]  # fmt: skip


def modelopt(args: argparse.Namespace) -> list[dict]:
    model = write_model(args.big, args.work / f"model-{args.big}", args.generate_on)
    command = [sys.executable, __file__, "--modelopt-worker", str(model), "--device", args.device, "--batches", str(args.big_batches),
               "--seq-len", str(args.seq_len), "--formats", args.formats, "--calib", str(args.calib)]  # fmt: skip
    if args.modelopt_eager:
        command.append("--modelopt-eager")
    with host_memory() as host:
        start = time.perf_counter()
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=args.modelopt_timeout)
            lines, status = done.stdout, None if done.returncode == 0 else f"failed ({done.returncode})"
        except subprocess.TimeoutExpired as expired:
            lines = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            status = f"timeout after {args.modelopt_timeout} s"
        wall = time.perf_counter() - start
    reports = [json.loads(line) for line in lines.splitlines() if line.startswith("{")]
    last = reports[-1] if reports else {}
    row = {"part": "modelopt", "model": args.big, "params": params_of(model), "processes": 1, "device": args.device,
           "calibration": f"{args.big_batches} x 4 x {args.seq_len}", "streamed": False, "wall_s": wall,
           "scoring_s": last.get("seconds"), "gpu_peak_gib": last.get("peak_gib"), "host_used_peak_gib": host["peak_gib"],
           "status": status or last.get("status", "no report")}  # fmt: skip
    if last.get("error"):
        row["status"] += f": {last['error'][:200]}"
    return [row]


def modelopt_worker(args: argparse.Namespace) -> None:
    """In its own process: load the model on one device, run ModelOpt's auto_quantize, print JSON lines."""
    import torch

    if args.modelopt_eager:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext.extension = None
        extensions.get_cuda_ext_fp8.extension = None
    from autoq.data import load_tokens
    from autoq.decoder import DecoderStructure
    from autoq.interop.modelopt import run_auto_quantize
    from autoq.model import ModelSource, load_model, load_tokenizer
    from autoq.search_space import parse_search_space, select_layers

    def report(**fields) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        print(json.dumps({"peak_gib": peak, **fields}), flush=True)

    source = ModelSource(Path(args.modelopt_worker), "bench")
    formats = args.formats.split(",")
    try:
        data = load_tokens(str(args.calib), load_tokenizer(source), 4 * args.batches, args.seq_len)
        model = load_model(source, device=args.device)
        report(status="loaded")
        space = parse_search_space(f"formats: [{', '.join(formats)}, BF16]", "bench")
        names = [c.name for c in select_layers(model, space, DecoderStructure(model).lm_head_name)]
        _, seconds = run_auto_quantize(model, names, formats, data.batches(4), 16.0)
        report(status="ok", seconds=seconds)
    except torch.cuda.OutOfMemoryError as err:
        report(status="out of memory", error=str(err).splitlines()[0])
    except Exception as err:  # noqa: BLE001 - whatever stops ModelOpt is the result
        report(status=type(err).__name__, error=str(err).splitlines()[0] if str(err) else "")


def save(rows: list[dict], out: Path, args: argparse.Namespace) -> pd.DataFrame:
    """Merge ``rows`` into the CSV: a part's new rows replace its old ones (same model, processes, device)."""
    path = out / "bench_multi_gpu.csv"
    table = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        key = ["part", "model", "processes", "device"]
        keep = ~old.set_index(key).index.isin(table.set_index(key).index)
        table = pd.concat([old[keep], table], ignore_index=True)
    big_rows = (table.part == "big") & (table.model == args.big)
    reference = table[(table.part == "modelopt") & (table.model == args.big) & (table.status == "ok")]
    if big_rows.any() and len(reference):  # the 32B autoq row against ModelOpt's 32B run
        ours = table.loc[big_rows].iloc[0]
        table.loc[big_rows, "time_ratio"] = ours.scoring_s / reference.scoring_s.iloc[0]
        table.loc[big_rows, "mem_ratio"] = ours.gpu_peak_gib / reference.gpu_peak_gib.iloc[0]
    table.to_csv(path, index=False)
    return table


def environment(args: argparse.Namespace) -> dict:
    import torch

    import autoq

    cuda = args.device == "cuda" and torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__, "autoq": autoq.__version__,
            "host_memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "formats": args.formats, "bits": args.bits, "seq_len": args.seq_len, "batches": args.batches, "big_batches": args.big_batches,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="scaling,big,modelopt", help="comma-separated: scaling, big, modelopt")
    parser.add_argument("--sizes", default="3b", help=f"scaling models: {', '.join(SHAPES)}")
    parser.add_argument("--ranks", default="1,2", help="process counts N for scaling (1 is the baseline)")
    parser.add_argument("--big", default="32b", help="the model streamed on --gpus GPUs and given to ModelOpt")
    parser.add_argument("--gpus", type=int, default=2, help="processes for the big model")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo processes (a smoke test of this script)")
    parser.add_argument("--batches", type=int, default=64, help="scaling calibration: batches of 4 x --seq-len tokens")
    parser.add_argument("--big-batches", type=int, default=16, help="big model / ModelOpt calibration batches")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--formats", default="NVFP4,FP8,W4A8")
    parser.add_argument("--bits", default="4.8")
    parser.add_argument("--modelopt-timeout", type=int, default=420, help="seconds ModelOpt may run (loading included)")
    parser.add_argument("--modelopt-eager", action="store_true", help="ModelOpt's PyTorch fallbacks instead of JIT-compiled CUDA extensions")
    parser.add_argument("--work", type=Path, default=Path("/tmp/autoq-bench"), help="models and runs (local disk, ~70 GB for 32b)")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks"))
    parser.add_argument("--modelopt-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--calib", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.modelopt_worker:
        modelopt_worker(args)
        return
    args.generate_on = args.device
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    args.calib = calibration_text(args.work, 4 * max(args.batches, args.big_batches) * args.seq_len)
    args.space = args.work / "space.yaml"
    args.space.write_text(f"formats: [{', '.join(args.formats.split(','))}, BF16]\n")
    parts = {"scaling": scaling, "big": big, "modelopt": modelopt}
    rows = []
    for part in args.parts.split(","):
        rows += parts[part](args)
        table = save(rows, args.out, args)
    info_path = args.out / "bench_multi_gpu.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.update(dict.fromkeys(args.parts.split(","), environment(args)))  # per part: its last run's machine and settings
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    pd.set_option("display.width", 250)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
