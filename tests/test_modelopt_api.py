"""The ModelOpt internals autoq relies on (listed in the README), checked so that a ModelOpt
release that renames or reshapes them fails here, loudly, rather than deep inside a run."""

from __future__ import annotations

import inspect
import subprocess
import sys
from importlib.metadata import version

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers
from modelopt.torch.quantization.algorithms import _resolve_best_recipe
from modelopt.torch.quantization.nn import TensorQuantizer, is_registered_quant_backend, register_quant_backend
from packaging.version import Version

from autoq.formats import FORMATS


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_pinned_modelopt_is_installed() -> None:
    assert Version("0.47") <= Version(version("nvidia-modelopt")) < Version("0.48")


def test_private_and_deep_functions_keep_their_signatures() -> None:
    assert _parameters(_resolve_best_recipe) == ["search_state", "constraints", "verbose"]
    assert _parameters(requantize_resmooth_fused_llm_layers) == ["model"]
    assert _parameters(register_quant_backend) == ["name", "entrypoint"]
    assert _parameters(is_registered_quant_backend) == ["name"]
    assert _parameters(mtq.set_quantizer_by_cfg_context)[:2] == ["quant_model", "quant_cfg"]
    assert {"dtype", "export_dir"} <= set(_parameters(export_hf_checkpoint))
    used = {"constraints", "quantization_formats", "data_loader", "forward_step", "loss_func", "num_calib_steps",
            "num_score_steps", "disabled_layers", "verbose"}  # fmt: skip
    assert used <= set(_parameters(mtq.auto_quantize))


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.modelopt_preset])
def test_presets_have_the_quant_cfg_entries_autoq_reads(fmt) -> None:
    entries = getattr(mtq, fmt.modelopt_preset)["quant_cfg"]
    assert all("quantizer_name" in e for e in entries)
    assert fmt.modelopt_quantizer_cfgs()["weight_quantizer"] is not None


def test_tensor_quantizer_attributes_the_cpu_nvfp4_backend_sets() -> None:
    quantizer = TensorQuantizer()
    for attribute in ("backend", "block_sizes", "num_bits", "amax"):
        assert hasattr(quantizer, attribute), attribute


def test_auto_quantize_search_state_layout() -> None:
    """``formats_from_auto_quantize`` and ``storable_candidates`` read these keys of the state."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.ReLU(), torch.nn.Linear(128, 128, bias=False))
    data = [torch.randn(4, 128) for _ in range(2)]
    _, state = mtq.auto_quantize(
        model, constraints={"effective_bits": 12.0}, quantization_formats=["FP8_DEFAULT_CFG"], data_loader=data,
        forward_step=lambda m, x: m(x), loss_func=lambda out, _x: out.float().square().mean(), num_calib_steps=2,
        num_score_steps=2, verbose=False,
    )  # fmt: skip
    assert "recipe" in state["best"] and state["method"] == "gradient"
    for stats in state["candidate_stats"].values():
        assert {"formats", "scores", "costs", "module_names"} <= set(stats)
        assert len(stats["formats"]) == len(stats["scores"]) == len(stats["costs"])
    recipes = _resolve_best_recipe(state, {"effective_bits": 16.0})
    assert set(recipes) == set(state["candidate_stats"])


def test_a_model_searched_or_applied_by_modelopt_is_freed_when_deleted(tiny_llama: Path) -> None:
    """PuLP, which ModelOpt's AutoQuantize imports, keeps its failed optional imports' exceptions,
    whose tracebacks held the whole stack of the first import, the model in it (a 1.5B sweep ran
    out of memory). In a fresh process, where that import happens inside the search: both the
    searched and the applied model are gone once deleted."""
    script = f"""
import gc, weakref, torch
from pathlib import Path
from autoq.apply import apply_plan
from autoq.interop.modelopt import run_auto_quantize
from autoq.model import ModelSource, load_model
from autoq.search_space import all_layers
source = ModelSource(Path({str(tiny_llama)!r}), "tiny")
batches = [torch.randint(0, 100, (2, 32)) for _ in range(2)]
model = load_model(source, dtype="float32")
names = [layer.name for layer in all_layers(model) if ".layers." in layer.name]
run_auto_quantize(model, names, ["NVFP4", "FP8", "BF16"], batches, 16.0)
searched = weakref.ref(model)
del model
model = load_model(source, dtype="float32")
apply_plan(model, dict.fromkeys(names, "FP8"), batches, progress=False)
applied = weakref.ref(model)
del model
gc.collect()
print("alive:", searched() is not None, applied() is not None)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "alive: False False" in result.stdout, result.stdout
