"""CUDA check for ``sweep --stream-blocks`` / ``search --stream-blocks --export``.

After streamed scoring the model is split (decoder blocks on the CPU, the rest on the GPU). The
sweep used to hand that model to ``apply_plan`` as is; ``pipeline.model_for_apply`` puts it on one
device first. Prints the parameter devices and whether ModelOpt's calibration runs on each.

    python benchmarks/gpu_stream_apply.py

Result on one H100 (torch 2.11, transformers 5.17, ModelOpt 0.47.0, random tiny Llama):
streamed -> ['cpu', 'cuda:0']; old path apply_plan: RuntimeError "Expected all tensors to be on the
same device"; model_for_apply -> ['cpu'], apply_plan OK.
"""

import copy
import tempfile
from pathlib import Path

from autoq import pipeline
from autoq.apply import apply_plan
from autoq.default_model import write_random_model
from autoq.sensitivity import ScoringOptions

path = write_random_model(Path(tempfile.mkdtemp()) / "m", "llama", seed=0, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
work = pipeline.prepare(str(path), "fp8_w4a8", "default", 8, 64)
streamed = ScoringOptions(device="cuda", stream_blocks=True, progress=False)
pipeline.score(work, streamed, cache_dir=Path(tempfile.mkdtemp()))  # a fresh cache: scoring really runs
print("after streamed scoring, parameter devices:", sorted({str(p.device) for p in work.model.parameters()}))
old = pipeline.ensure_model(work, "bfloat16", "cuda")  # what the sweep used before
print("old sweep path (ensure_model) devices:", sorted({str(p.device) for p in old.parameters()}))
model = pipeline.model_for_apply(work, "bfloat16", "cuda", stream_blocks=True)
print("model_for_apply devices:", sorted({str(p.device) for p in model.parameters()}))
batches = work.calibration.batches(4)
formats = {c.name: "FP8" for c in work.choices}
split = pipeline.prepare(str(path), "fp8_w4a8", "default", 8, 64)
pipeline.score(split, streamed, cache_dir=Path(tempfile.mkdtemp()))
for label, candidate in (("old split model", pipeline.ensure_model(split, "bfloat16", "cuda")), ("model_for_apply", model)):
    try:
        apply_plan(copy.deepcopy(candidate), formats, batches, progress=False)
        print(label, ": apply_plan OK")
    except Exception as err:  # noqa: BLE001 - the point is to show the failure
        print(label, ": apply_plan FAILED:", type(err).__name__, str(err)[:200])
