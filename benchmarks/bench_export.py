"""Export engines compared: the streamed file-to-file export (``autoq apply --engine stream``) against
the ModelOpt engine (``--engine modelopt``): wall time and peak RSS of each, and how their checkpoints
compare (tensor names, dtypes, shapes, bytes; logits of the dequantized checkpoints).

Each engine runs as its own ``autoq apply`` process; its peak RSS is the kernel's ``ru_maxrss`` of
that process (``os.wait4``), so nothing of this script's own memory counts. The streamed engine is
also measured in its two phases, each a process of its own: the streamed calibration pass (blocks
read from disk; what a hand-written plan needs that no search state holds) and the export itself.

A random model (``--random 1b|8b``) is written to disk tensor by tensor (bf16, ``--shards`` files
with an index; never whole in memory), with a hand-written mixed plan over every format (NVFP4, FP8,
W4A8, INT4_AWQ, BF16). A real model is given with ``--model DIR`` and ``--plan plan.json`` (from
``autoq search``; pass its ``--cache-dir`` so the streamed engine reuses the search's state).

    python benchmarks/bench_export.py --random 1b --shards 4 --engines stream,modelopt --compare
    python benchmarks/bench_export.py --random 8b --shards 4 --engines stream --phases
    python benchmarks/bench_export.py --random 8b --shards 4 --rotation NVFP4,FP8,BF16 --engines stream,modelopt \
        --phases --timeout 1800     # max-calibrated formats only; ModelOpt recorded as it stands at 30 min
    python benchmarks/bench_export.py --model DIR --plan run/plan.json --cache-dir CACHE \\
        --calib-samples 32 --seq-len 256 --engines stream,modelopt --compare

Rows are appended to ``--csv`` (default reports/benchmarks/bench_export.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

# Llama-3.x shapes (untied embeddings: every tensor written, as the 8B checkpoint has them).
SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
# A mixed plan: per block, one format for the fused q/k/v, one for o_proj, one for the fused gate/up,
# one for down_proj, rotating so that every format meets every kind of layer.
ROTATION = ["NVFP4", "FP8", "W4A8", "INT4_AWQ", "BF16"]
FIELDS = ["model", "params_b", "source_gib", "shards", "engine", "phase", "wall_s", "peak_rss_gib", "out_gib", "machine", "note"]


def write_random_model(path: Path, shape: dict, shards: int, seed: int = 0) -> Path:
    """A random Llama with ``shape`` in bf16, in ``shards`` safetensors files with an index, written
    one tensor at a time (``autoq.shardwriter``), plus the synthetic model's tokenizer."""
    from transformers import AutoConfig

    from autoq.default_model import train_tokenizer
    from autoq.diskmodel import meta_model, state_shapes
    from autoq.shardwriter import ShardWriter, TensorSpec

    if (path / "model.safetensors.index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model("llama", tie_word_embeddings=False, max_position_embeddings=4096, **shape)
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shapes = state_shapes(meta_model(tmp, torch.bfloat16))
    specs = [TensorSpec(key, torch.bfloat16, shape) for key, shape in shapes.items()]
    total = sum(spec.nbytes for spec in specs)
    writer = ShardWriter(tmp, specs, max_shard_bytes=math.ceil(total / shards))
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        rows = max(1, (1 << 24) // max(1, math.prod(spec.shape[1:])))
        for start in range(0, spec.shape[0], rows):
            chunk_shape = (min(rows, spec.shape[0] - start), *spec.shape[1:])
            if spec.name.endswith("norm.weight"):  # norms near one, unequal (AWQ folds into them)
                chunk = 1 + 0.1 * torch.rand(chunk_shape, generator=generator)
            else:
                chunk = 0.02 * torch.randn(chunk_shape, generator=generator)
            writer.write(spec.name, chunk.to(torch.bfloat16), start)
    writer.finish()
    tmp.rename(path)
    return path


def mixed_plan(model_dir: Path, path: Path, rotation: list[str] = ROTATION) -> Path:
    """The rotating mixed plan (``rotation``, default ``ROTATION``) over the model's decoder linears."""
    from autoq.diskmodel import meta_model
    from autoq.plan import LayerPlan, Plan
    from autoq.search_space import all_layers

    formats = {}
    for layer in all_layers(meta_model(model_dir, torch.bfloat16)):
        if ".layers." not in layer.name:
            continue
        block = int(layer.name.split(".layers.")[1].split(".")[0])
        kind = next(i for i, marks in enumerate((("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)))
                    if layer.name.rsplit(".", 1)[1] in marks)  # fmt: skip
        formats[layer.name] = rotation[(block + kind) % len(rotation)]
    Plan(layers={name: LayerPlan(format=fmt) for name, fmt in formats.items()}).save(path)
    return path


class TimedOut(Exception):
    """A measured command ran past its time limit and was killed; its wall time and peak RSS so far."""

    def __init__(self, wall: float, rss: float) -> None:
        super().__init__(f"killed at the time limit after {wall:.0f} s (peak RSS {rss:.2f} GiB)")
        self.wall, self.rss = wall, rss


def measured(command: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stderr tail) of ``command`` run as a child process; past
    ``timeout`` seconds it is killed and ``TimedOut`` carries what it had used."""
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: nothing blocks while we wait with a timeout
        process = subprocess.Popen(command, stderr=log, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        timed_out = False
        while True:  # reaped by wait4 alone, which gives the kernel's peak RSS of the child, killed or not
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - start > timeout:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                timed_out = True
                break
            time.sleep(0.5)
        process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
        wall = time.perf_counter() - start
        log.seek(0)
        err = log.read().decode(errors="replace")
    if timed_out:
        raise TimedOut(wall, usage.ru_maxrss / 2**20)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, err[-2000:]


def dir_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**30


# ------------------------------------------------------------- phases of the streamed engine, in-process
def phase_calibrate(model_dir: str, plan_file: str, state_dir: str, samples: int, seq_len: int) -> None:
    """The streamed calibration pass alone: every statistic the plan needs, blocks read from disk."""
    from autoq.pipeline import load_sources
    from autoq.plan import load_plan
    from autoq.streamcalib import complete_state

    source, _, calibration = load_sources(model_dir, "default", int(samples), int(seq_len))
    state = complete_state(None, load_plan(Path(plan_file)).formats(), source, calibration, "bfloat16", "cpu", 4, progress=False)
    state.save(Path(state_dir))


def phase_export(model_dir: str, plan_file: str, state_dir: str, out: str) -> None:
    """The streamed export alone, from a saved calibration state."""
    from autoq.calibstate import CalibrationState
    from autoq.export import stream_export
    from autoq.model import ModelSource, load_tokenizer
    from autoq.plan import load_plan

    source = ModelSource(Path(model_dir), Path(model_dir).name)
    state = CalibrationState.load(Path(state_dir))
    stream_export(source.path, load_plan(Path(plan_file)), state, Path(out), load_tokenizer(source), overwrite=True, progress=False)


# ------------------------------------------------------------------------------ comparison
def compare(ours: Path, theirs: Path, model_dir: Path, samples: int, seq_len: int) -> dict:
    """Tensor-by-tensor comparison (read one at a time) and, for models that fit, logits."""
    from safetensors import safe_open

    from autoq.codec import read_headers

    a, b = read_headers(ours), read_headers(theirs)
    same_layout = {k: (v.dtype, tuple(v.shape)) for k, v in a.items()} == {k: (v.dtype, tuple(v.shape)) for k, v in b.items()}
    equal = differing_bytes = total_bytes = 0
    worst: tuple[float, str] = (0.0, "")
    for key in sorted(a.keys() & b.keys()):
        with safe_open(str(ours / a[key].shard), "pt") as fa, safe_open(str(theirs / b[key].shard), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        if x.shape != y.shape or x.dtype != y.dtype:
            continue
        bx, by = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        differ = int((bx != by).sum())
        equal += differ == 0
        differing_bytes += differ
        total_bytes += bx.numel()
        if differ:
            fraction = differ / bx.numel()
            worst = max(worst, (fraction, key))
    result = {
        "same_names_dtypes_shapes": same_layout, "tensors": len(a), "tensors_byte_equal": equal,
        "differing_byte_fraction": differing_bytes / max(1, total_bytes), "worst_tensor": worst[1], "worst_fraction": worst[0],
    }  # fmt: skip
    for name in ("hf_quant_config.json",):
        result[f"{name}_equal"] = json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text())
    result["quantization_config_equal"] = (
        json.loads((ours / "config.json").read_text()).get("quantization_config")
        == json.loads((theirs / "config.json").read_text()).get("quantization_config")
    )
    params = sum(math.prod(v.shape) for v in read_headers(model_dir).values())
    if params < 5e8:  # logits: both dequantized checkpoints and the source in memory
        result |= logits_agreement(ours, theirs, model_dir, samples, seq_len)
    return result


def logits_agreement(ours: Path, theirs: Path, model_dir: Path, samples: int, seq_len: int) -> dict:
    """Relative logit distances and mean token KL of the two dequantized checkpoints, to each other
    and to the source model, on held-out text (WikiText-2 test when ../shared has it)."""
    import torch.nn.functional as F

    from autoq.checkpoint import load_fake_quant_model
    from autoq.data import load_tokens
    from autoq.model import ModelSource, load_model, load_tokenizer

    source = ModelSource(model_dir, model_dir.name)
    wikitext = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
    wikitext = next((p for p in (wikitext, Path("/work/shared/data/wikitext2/wiki.test.raw")) if p.is_file()), None)
    tokenizer = load_tokenizer(source)
    if wikitext:  # the first samples x seq_len tokens of the test split
        ids = torch.tensor(tokenizer(wikitext.read_text()[:400_000])["input_ids"][: samples * seq_len]).reshape(samples, seq_len)
    else:
        ids = load_tokens("default", tokenizer, samples, seq_len).tokens

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(input_ids=ids[i : i + 4]).logits.float() for i in range(0, len(ids), 4)])

    reference = logits(load_model(source))
    x, y = logits(load_fake_quant_model(ours)), logits(load_fake_quant_model(theirs))

    def distance(p: torch.Tensor, q: torch.Tensor) -> float:
        return ((p - q).norm() / q.norm()).item()

    def kl(p: torch.Tensor) -> float:
        return F.kl_div(p.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()

    return {
        "eval_text": "wikitext2 test" if wikitext else "bundled default text", "eval_tokens": int(ids.numel()),
        "logit_distance_stream_vs_modelopt": distance(x, y), "logit_distance_stream_vs_bf16": distance(x, reference),
        "logit_distance_modelopt_vs_bf16": distance(y, reference), "kl_stream_to_bf16": kl(x), "kl_modelopt_to_bf16": kl(y),
        "top1_agreement_stream_modelopt": (x.argmax(-1) == y.argmax(-1)).float().mean().item(),
    }  # fmt: skip


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line), "?")
    memory = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    return f"{os.cpu_count()} cores {cpu}, {memory / 2**20:.0f} GiB RAM, {platform.system()}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_phase":  # a measured child process
        {"calibrate": phase_calibrate, "export": phase_export}[sys.argv[2]](*sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--random", choices=list(SHAPES), help="a random model of these shapes, written to --work")
    what.add_argument("--model", type=Path, help="an HF model directory (safetensors)")
    parser.add_argument("--plan", type=Path, help="plan.json (default with --random: the rotating mixed plan)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--engines", default="stream,modelopt")
    parser.add_argument("--phases", action="store_true", help="also measure the streamed engine's calibration and export apart")
    parser.add_argument("--compare", action="store_true", help="compare the two engines' checkpoints")
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--cache-dir", type=Path, default=None, help="score cache of the plan's search (its calibration state)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_export"))
    parser.add_argument("--csv", type=Path, default=Path("reports/benchmarks/bench_export.csv"))
    parser.add_argument("--keep", action="store_true", help="keep the exported checkpoints")
    parser.add_argument("--label", default=None, help="the model's name in the CSV (default: its directory's)")
    parser.add_argument("--rotation", default=",".join(ROTATION), help="formats of the rotating mixed plan (random models)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per engine run; one past it is killed and recorded")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    if args.random:
        start = time.perf_counter()
        model_dir = write_random_model(args.work / f"random-{args.random}", SHAPES[args.random], args.shards)
        print(f"model {model_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
        label = f"random Llama {args.random} shapes (bf16, seed 0)"
    else:
        model_dir, label = args.model.resolve(), args.label or args.model.name
    rotation = args.rotation.split(",")
    suffix = "" if rotation == ROTATION else "-" + "-".join(f.lower() for f in rotation)
    plan = args.plan or mixed_plan(model_dir, args.work / f"plan-{model_dir.name}{suffix}.json", rotation)
    plan_note = f"plan {plan.name if args.plan else 'rotating ' + '/'.join(rotation)}; "
    from autoq.codec import read_headers

    headers = read_headers(model_dir)
    params = sum(math.prod(v.shape) for v in headers.values()) / 1e9
    shards = len({v.shard for v in headers.values()})
    common = {"model": label, "params_b": round(params, 3), "source_gib": round(dir_gib(model_dir), 3), "shards": shards, "machine": machine()}
    calib = ["--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]
    env = {"AUTOQ_CACHE": str(args.cache_dir)} if args.cache_dir else {}
    rows, outputs = [], {}
    # What any autoq process holds before it reads a weight: the interpreter and the libraries it imports.
    wall, rss, _ = measured([sys.executable, "-c", "import autoq.cli, autoq.export, autoq.apply, modelopt.torch.quantization"])
    rows.append(common | {"engine": "", "phase": "imports only (baseline)", "wall_s": round(wall, 1), "peak_rss_gib": round(rss, 3),
                          "out_gib": "", "note": "torch, transformers, modelopt imported; no weights"})  # fmt: skip
    print(rows[-1], flush=True)
    for engine in [e for e in args.engines.split(",") if e]:  # "" : none (e.g. only --phases)
        out = args.work / f"out-{model_dir.name}-{engine}"
        command = [sys.executable, "-m", "autoq", "apply", str(plan), "--model", str(model_dir), "--export", str(out),
                   "--engine", engine, "--device", "cpu", "--overwrite", "--no-progress", *calib]  # fmt: skip
        try:
            wall, rss, err = measured(command, env, args.timeout)
        except TimedOut as stopped:  # recorded, not lost: how long it ran and what it held by then
            rows.append(common | {"engine": engine, "phase": "autoq apply (end to end)", "wall_s": round(stopped.wall, 1),
                                  "peak_rss_gib": round(stopped.rss, 3), "out_gib": "",
                                  "note": f"{plan_note}did not finish: {stopped}; {args.calib_samples} x {args.seq_len} tokens"})  # fmt: skip
            print(rows[-1], flush=True)
            continue
        reused = "reusing the search's calibration state" in err
        note = f"{plan_note}{'calibration state reused' if reused else 'calibrated in the same run'}; {args.calib_samples} x {args.seq_len} tokens"
        rows.append(common | {"engine": engine, "phase": "autoq apply (end to end)", "wall_s": round(wall, 1),
                              "peak_rss_gib": round(rss, 3), "out_gib": round(dir_gib(out), 3), "note": note})  # fmt: skip
        print(rows[-1], flush=True)
        outputs[engine] = out
    if args.phases:
        state, out = args.work / f"state-{model_dir.name}", args.work / f"out-{model_dir.name}-phases"
        me = [sys.executable, str(Path(__file__).resolve()), "_phase"]
        wall, rss, _ = measured([*me, "calibrate", str(model_dir), str(plan), str(state), str(args.calib_samples), str(args.seq_len)])
        rows.append(common | {"engine": "stream", "phase": "streamed calibration (blocks from disk)", "wall_s": round(wall, 1),
                              "peak_rss_gib": round(rss, 3), "out_gib": "", "note": f"{plan_note}{args.calib_samples} x {args.seq_len} tokens"})  # fmt: skip
        print(rows[-1], flush=True)
        wall, rss, _ = measured([*me, "export", str(model_dir), str(plan), str(state), str(out)])
        rows.append(common | {"engine": "stream", "phase": "streamed export (from the saved state)", "wall_s": round(wall, 1),
                              "peak_rss_gib": round(rss, 3), "out_gib": round(dir_gib(out), 3), "note": plan_note.rstrip("; ")})  # fmt: skip
        print(rows[-1], flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if args.compare and {"stream", "modelopt"} <= outputs.keys():
        result = compare(outputs["stream"], outputs["modelopt"], model_dir, 8, 256)
        result |= {"model": label, "plan": str(plan), "machine": machine()}
        print(json.dumps(result, indent=1))
        target = args.csv.with_name(f"bench_export_compare_{(args.label or model_dir.name).split()[0]}.json")
        target.write_text(json.dumps(result, indent=1) + "\n")
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new = not args.csv.exists()
    with args.csv.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    if not args.keep:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
