"""Sweeps: autoq plans at several budgets next to baselines, all evaluated the same way.

Rows: BF16; uniform FP8 / W4A8 / NVFP4 (every searched layer in one format where it fits);
ModelOpt ``auto_quantize`` at the same honest bits as each autoq budget; and autoq at each
budget. Every quantized row is applied with ``autoq.apply`` (ModelOpt calibration on the same
calibration batches) and exported; the exported checkpoint is what gets evaluated (dequantized
weights, fake-quantized activations: what a runtime computes) against the BF16 model on held-out
tokens and lm-eval tasks, next to its size and stored bits.

A sweep directory is a resumable workspace: each finished row is ``rows/<row>.json`` (written
atomically), and a rerun skips finished rows.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from autoq.apply import apply_plan, export_checkpoint
from autoq.cache import _atomic_write
from autoq.checkpoint import load_fake_quant_model
from autoq.errors import AutoqError
from autoq.data import TokenData
from autoq.evaluate import PROXY_TASKS, EvalSpec, evaluate, heldout_tokens
from autoq.formats import FORMATS
from autoq.plan import LayerPlan, Plan, creation_info
from autoq.search_space import LayerChoice

UNIFORM_BASELINES = ("FP8", "W4A8", "NVFP4")


@dataclass
class SweepConfig:
    budgets: list[float]
    tasks: list[str] = field(default_factory=lambda: list(PROXY_TASKS))
    baselines: list[str] = field(default_factory=lambda: ["bf16", "fp8", "w4a8", "nvfp4", "modelopt"])
    eval_samples: int = 32
    eval_data: str | None = None
    few_shot: int | None = None
    limit: int | None = None
    max_length: int | None = None
    batch_size: int = 4
    keep_checkpoints: bool = False

    def eval_spec(self) -> EvalSpec:
        return EvalSpec.parse(self.tasks, self.eval_data, default_shots=self.few_shot, limit=self.limit, batch_size=self.batch_size,
                              max_length=self.max_length)  # fmt: skip


@dataclass
class Row:
    """One sweep row: a method at a budget, and the layer formats it evaluates."""

    id: str
    method: str
    budget: float | None
    formats: dict[str, str]
    notes: dict[str, Any] = field(default_factory=dict)


def uniform_formats(choices: list[LayerChoice], fmt: str) -> dict[str, str]:
    """Every searched layer in ``fmt`` where its shape allows, else BF16 (a pinned layer keeps its pin)."""
    return {
        c.name: c.candidates[0] if len(c.candidates) == 1 else (fmt if c.supports(fmt) else "BF16")
        for c in choices
    }


def searched_bits(formats: dict[str, str], choices: list[LayerChoice]) -> float:
    """Stored bits per weight of the searched layers in ``formats`` (missing: BF16); fused experts count every expert."""
    return sum(c.storage_bits(formats.get(c.name, "BF16")) for c in choices) / sum(c.params for c in choices)


def build_rows(work, plans: list[Plan], config: SweepConfig, modelopt_state: dict | None) -> list[Row]:
    rows = []
    if "bf16" in config.baselines:
        rows.append(Row("bf16", "BF16", None, {c.name: "BF16" for c in work.choices}))
    for fmt in UNIFORM_BASELINES:
        if fmt.lower() in config.baselines:
            rows.append(Row(f"uniform-{fmt}", f"uniform {fmt}", None, uniform_formats(work.choices, fmt)))
    shapes = {c.name: (c.out_features, c.in_features) for c in work.choices}
    for plan in plans:
        budget = plan.budget["effective_bits"]
        rows.append(Row(f"autoq-{budget:g}", "autoq", budget, plan.formats()))
        if modelopt_state is not None:
            from autoq.interop.modelopt import formats_at_honest_bits

            formats, nominal = formats_at_honest_bits(modelopt_state, shapes, budget)
            rows.append(Row(f"modelopt-{budget:g}", "ModelOpt auto_quantize", budget, formats, {"modelopt_nominal_bits": nominal}))
    return rows


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def evaluate_row(
    row: Row,
    reference: nn.Module,
    tokenizer,
    calib_batches: list[torch.Tensor],
    heldout: TokenData,
    spec: EvalSpec,
    checkpoint_dir: Path | None,
    progress: bool,
) -> dict[str, Any]:
    """Quantize a copy of ``reference`` as the row says, export it, and evaluate the exported
    checkpoint as a runtime computes it (``load_fake_quant_model``): one result record. The BF16 row
    is exported and reloaded too, and measured by the same ``evaluate`` (its KL comes out ~0)."""
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    quantized = any(FORMATS[f].quantized for f in row.formats.values())
    device = next(reference.parameters()).device
    with tempfile.TemporaryDirectory(prefix="autoq-export-") as tmp:
        target = checkpoint_dir or Path(tmp) / "checkpoint"
        if quantized:
            model = apply_plan(copy.deepcopy(reference), row.formats, calib_batches, progress=progress)
            plan = Plan(layers={n: LayerPlan(format=f) for n, f in row.formats.items()}, created=creation_info())
            stored_bits = export_checkpoint(model, tokenizer, plan, target, overwrite=True).effective_bits
            del model
        else:
            reference.save_pretrained(target, safe_serialization=True)
            tokenizer.save_pretrained(target)
            stored_bits = 16.0
        model = load_fake_quant_model(target, device=device)
        size_bytes = _dir_bytes(target)
        metrics = evaluate(model, reference, tokenizer, heldout, spec).metrics
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "row": row.id, "method": row.method, "budget_bits": row.budget,
        "formats": {fmt: int(n) for fmt, n in pd.Series(row.formats).value_counts().items()},
        "size_bytes": size_bytes, "stored_bits": stored_bits,
        **metrics, "wall_seconds": time.perf_counter() - start, "peak_cuda_gib": peak, "device": str(device), **row.notes,
    }  # fmt: skip


def run_sweep(work, scores, config: SweepConfig, out: Path, dtype: str, device: str, objective: str, progress: bool) -> pd.DataFrame:
    """Run (or resume) a sweep into ``out``; returns the results table."""
    from autoq.pipeline import ensure_model, make_plans

    out.mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    scores.table.to_parquet(out / "scores.parquet", index=False)
    plans, curve = make_plans(work, scores, config.budgets, objective)
    curve.to_csv(out / "frontier.csv", index=False)
    reference = ensure_model(work, dtype, device)
    reference.requires_grad_(False)
    calib_batches = work.calibration.batches(config.batch_size)
    spec = config.eval_spec()
    heldout = heldout_tokens(work.calibration, work.tokenizer, config.eval_samples)

    modelopt_state = None
    if "modelopt" in config.baselines:
        modelopt_state = _modelopt_state(work, reference, calib_batches, config, out)
    from autoq.refine import refined_rows

    rows = build_rows(work, plans, config, modelopt_state) + refined_rows(out)  # `autoq refine` run on this sweep
    info = {
        "model": work.model_info(), "search_space": work.space.name, "budgets": config.budgets, "config": asdict(config),
        "calibration": work.calibration.describe(), "heldout": heldout.describe(), "objective": objective,
        "rows": [r.id for r in rows], "created": creation_info(),
        "scoring": {"seconds": scores.seconds, "from_cache": scores.from_cache, "peak_memory_gib": scores.peak_memory},
    }  # fmt: skip
    _atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
    for plan in plans:
        plan.save(out / "plans" / f"autoq-{plan.budget['effective_bits']:g}.json")
    for row in tqdm(rows, desc="autoq sweep", disable=not progress):
        path = out / "rows" / f"{row.id}.json"
        if path.is_file():
            continue
        if row.method != "autoq":
            Plan(layers={n: LayerPlan(format=f) for n, f in row.formats.items()}).save(out / "plans" / f"{row.id}.json")
        keep = out / "checkpoints" / row.id if config.keep_checkpoints else None
        record = evaluate_row(row, reference, work.tokenizer, calib_batches, heldout, spec, keep, progress)
        record["searched_bits"] = searched_bits(row.formats, work.choices)
        _atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=2, default=float)))
    table = collect_results(out)
    info["complete"] = len(table) == len(rows)
    _atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
    return table


def _modelopt_state(work, reference: nn.Module, calib_batches: list[torch.Tensor], config: SweepConfig, out: Path) -> dict | None:
    """Run ModelOpt's search once (its state re-solves for every budget)."""
    from autoq.interop.modelopt import run_auto_quantize

    if "NVFP4" in work.space.formats and not torch.cuda.is_available():
        (out / "modelopt_skipped.txt").write_text("ModelOpt auto_quantize needs CUDA for NVFP4 fake quantization\n")
        return None
    model = copy.deepcopy(reference)
    # Scores do not depend on the budget; 16 nominal bits is always feasible, and every row's
    # plan is then re-solved from this state at matched honest bits.
    state, seconds = run_auto_quantize(model, [c.name for c in work.choices], list(work.space.formats), calib_batches, 16.0)
    del model
    _atomic_write(out / "modelopt_search.json", lambda p: p.write_text(json.dumps({"seconds": seconds})))
    return state


def collect_results(out: Path) -> pd.DataFrame:
    """The results table from every finished row (CSV and parquet next to them)."""
    records = [json.loads(p.read_text()) for p in sorted((Path(out) / "rows").glob("*.json"))]
    if not records:
        raise AutoqError(f"{out} has no finished sweep rows")
    table = pd.DataFrame(records)
    table["formats"] = table["formats"].map(lambda f: ", ".join(f"{k}:{v}" for k, v in sorted(f.items())))
    first = ["row", "method", "budget_bits", "searched_bits", "stored_bits", "size_bytes"]
    table = table[first + [c for c in table.columns if c not in first]].sort_values(["method", "searched_bits"])
    _atomic_write(Path(out) / "results.csv", lambda p: table.to_csv(p, index=False))
    _atomic_write(Path(out) / "results.parquet", lambda p: table.to_parquet(p, index=False))
    return table
