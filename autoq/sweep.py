"""Sweeps: autoq plans at several budgets next to baselines, all evaluated the same way.

Rows: BF16; uniform FP8 / W4A8 / NVFP4 by default, or any other registry format named in
``baselines`` (every searched layer in one format where it fits); ModelOpt ``auto_quantize`` at
the same honest bits as each autoq budget; and autoq at each budget. Every quantized row is
applied with ``autoq.apply`` (ModelOpt calibration on the same calibration batches; with
``--kv-cache``, the KV cache too) and exported; the exported checkpoint is what gets evaluated
(dequantized weights, fake-quantized activations and KV cache: what a runtime computes) against
the BF16 model on held-out tokens and lm-eval tasks, next to its size, stored bits and KV-cache
bits per cached element (the BF16 row keeps a 16-bit cache: it is the unquantized reference).

A sweep directory is a resumable workspace: each finished row is ``rows/<row>.json`` (written
atomically) with a fingerprint of everything its result depends on (model, dtype, device,
calibration and held-out tokens, evaluation settings, the row's formats). A rerun skips the rows
whose fingerprint still matches and evaluates the others again, saying so. Every row's plan is
checked against the model before the first row runs; a row that fails while running is recorded
as failed, with its error, and the sweep goes on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from autoq.apply import apply_plan, check_plan_fits_model, export_checkpoint
from autoq.checkpoint import load_fake_quant_model
from autoq.data import TokenData
from autoq.diskmodel import release_memory
from autoq.errors import AutoqError, atomic_write, disk_full
from autoq.evaluate import PROXY_TASKS, EvalSpec, evaluate, heldout_tokens
from autoq.formats import FORMATS, KVCacheFormat
from autoq.model import DTYPES, checkpoint_dtype
from autoq.plan import LayerPlan, Plan, creation_info
from autoq.search_space import LayerChoice

MODELOPT = "ModelOpt auto_quantize"
# Formats whose fake quantization ModelOpt runs with CUDA kernels only (its auto_quantize needs a GPU for them).
_CUDA_ONLY = {"nvfp4", "mxfp8"}


def baseline_names() -> list[str]:
    """What ``--baselines`` accepts: bf16, modelopt, and every quantized format (a uniform row)."""
    return ["bf16", "modelopt"] + [name.lower() for name, fmt in FORMATS.items() if fmt.quantized]


def _uniform_format(baseline: str) -> str | None:
    return next((name for name, fmt in FORMATS.items() if fmt.quantized and name.lower() == baseline), None)


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
    engine: str = "auto"  # how quantized rows are exported: autoq.pipeline.choose_engine

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
    error: str | None = None  # known to fail before it runs (e.g. the search it comes from failed)

    def fingerprint(self, config_key: dict[str, Any]) -> str:
        """Changes whenever anything the row's result depends on changes."""
        spec = {"config": config_key, "method": self.method, "budget": self.budget, "formats": self.formats}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def uniform_formats(choices: list[LayerChoice], fmt: str) -> dict[str, str]:
    """Every searched layer in ``fmt`` where its shape allows, else BF16 (a pinned layer keeps its pin)."""
    return {
        c.name: c.candidates[0] if len(c.candidates) == 1 else (fmt if c.supports(fmt) else "BF16")
        for c in choices
    }


def searched_bits(formats: dict[str, str], choices: list[LayerChoice]) -> float:
    """Stored bits per weight of the searched layers in ``formats`` (missing: BF16); fused experts count every expert."""
    return sum(c.storage_bits(formats.get(c.name, "BF16")) for c in choices) / sum(c.params for c in choices)


def build_rows(work, plans: list[Plan], config: SweepConfig, modelopt: dict | str | None) -> list[Row]:
    """The sweep's rows; ``modelopt``: ModelOpt's search state, or why that search failed, or None
    (no ModelOpt rows)."""
    rows = []
    if "bf16" in config.baselines:
        rows.append(Row("bf16", "BF16", None, {c.name: "BF16" for c in work.choices}))
    for fmt in filter(None, map(_uniform_format, config.baselines)):
        rows.append(Row(f"uniform-{fmt}", f"uniform {fmt}", None, uniform_formats(work.choices, fmt)))
    shapes = {c.name: (c.out_features, c.in_features) for c in work.choices}
    for plan in plans:
        budget = plan.budget["effective_bits"]
        rows.append(Row(f"autoq-{budget:g}", "autoq", budget, plan.formats()))
        if isinstance(modelopt, str):
            rows.append(Row(f"modelopt-{budget:g}", MODELOPT, budget, {}, error=modelopt))
        elif modelopt is not None:
            rows.append(modelopt_row(modelopt, shapes, budget))
    return rows


def modelopt_row(state: dict, shapes: dict[str, tuple[int, int]], budget: float) -> Row:
    """ModelOpt's own search re-solved at ``budget`` honest bits, over the formats each layer can store."""
    from autoq.interop.modelopt import formats_at_honest_bits

    formats, nominal, dropped = formats_at_honest_bits(state, shapes, budget)
    notes: dict[str, Any] = {"modelopt_nominal_bits": nominal}
    if dropped:
        notes["modelopt_note"] = (
            "re-solved over the formats each layer can store; ModelOpt also offered "
            + "; ".join(f"{fmt} for {len(names)} layer(s) ({names[0]}{', ...' if len(names) > 1 else ''})" for fmt, names in dropped.items())
        )  # fmt: skip
    return Row(f"modelopt-{budget:g}", MODELOPT, budget, formats, notes)


def check_rows_fit(model: nn.Module, rows: list[Row], sample_ids: torch.Tensor) -> None:
    """Every row's plan against the model (layers, shapes, fused groups), before any row runs."""
    problems = []
    for row in rows:
        if row.error is None:
            try:
                check_plan_fits_model(model, row.formats, sample_ids)
            except AutoqError as err:
                problems.append(f"{row.id}: {err}")
    if problems:
        raise AutoqError(f"{len(problems)} sweep row(s) cannot be applied to this model: {'; '.join(problems)}")


def failed_record(row: Row, error: str, device: str, seconds: float = 0.0) -> dict[str, Any]:
    return {"row": row.id, "method": row.method, "budget_bits": row.budget, "status": "failed", "error": error,
            "wall_seconds": seconds, "device": device, **row.notes}  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


@dataclass
class StreamedRows:
    """What exporting a row with the streamed engine needs: the checkpoint on disk and the search's
    calibration state (``plan.calibration['state_key']``), so that no row is calibrated again."""

    export: Callable[[Plan, Path], float]  # (plan, empty target directory) -> stored bits
    calibration: dict[str, Any]  # the plans' calibration block, naming the search's state


def evaluate_row(
    row: Row,
    reference: nn.Module,
    tokenizer,
    calib_batches: list[torch.Tensor],
    heldout: TokenData,
    spec: EvalSpec,
    checkpoint_dir: Path | None,
    progress: bool,
    kv_cache: KVCacheFormat | None = None,
    streamed: StreamedRows | None = None,
    save_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Quantize the row's layers (its KV cache as ``kv_cache`` says), export them, and evaluate the
    exported checkpoint as a runtime computes it (``load_fake_quant_model``): one result record.

    With ``streamed``, the checkpoint is written file to file from the search's calibration state
    (``autoq.export``); otherwise a copy of ``reference`` is calibrated by ModelOpt and exported.
    The BF16 row is saved (in ``save_dtype``, default the reference's) and reloaded too, and measured
    by the same ``evaluate`` (its KL comes out ~0)."""
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    quantized = any(FORMATS[f].quantized for f in row.formats.values())
    device, compute_dtype = next(reference.parameters()).device, next(reference.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="autoq-export-") as tmp:
        target = checkpoint_dir or Path(tmp) / "checkpoint"
        kv_cache = kv_cache if quantized else None
        if quantized:
            plan = Plan(layers={n: LayerPlan(format=f) for n, f in row.formats.items()}, created=creation_info(),
                        kv_cache=None if kv_cache is None else kv_cache.name,
                        calibration=streamed.calibration if streamed else {})  # fmt: skip
            if streamed is not None:
                stored_bits = streamed.export(plan, target)
            else:
                model = apply_plan(copy.deepcopy(reference), row.formats, calib_batches, progress=progress, kv_cache=kv_cache)
                stored_bits = export_checkpoint(model, tokenizer, plan, target, overwrite=True).effective_bits
                del model
        else:
            # Saved as the source stores it (a bf16 model computed in float32 holds bf16 values, so
            # the round trip is exact), so that its size is the deployable checkpoint's.
            reference.to(save_dtype or compute_dtype).save_pretrained(target, safe_serialization=True)
            reference.to(compute_dtype)
            tokenizer.save_pretrained(target)
            stored_bits = 16.0
        model = load_fake_quant_model(target, device=device, dtype=compute_dtype)
        size_bytes = _dir_bytes(target)
        metrics = evaluate(model, reference, tokenizer, heldout, spec).metrics
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {
        "row": row.id, "method": row.method, "budget_bits": row.budget, "status": "ok",
        "formats": {fmt: int(n) for fmt, n in pd.Series(row.formats).value_counts().items()},
        "size_bytes": size_bytes, "stored_bits": stored_bits,
        "kv_cache": None if kv_cache is None else kv_cache.name, "kv_bits": 16.0 if kv_cache is None else kv_cache.bits_per_element,
        "export_engine": ("stream" if streamed else "modelopt") if quantized else "save_pretrained",
        **metrics, "wall_seconds": time.perf_counter() - start, "peak_cuda_gib": peak, "device": str(device), **row.notes,
    }  # fmt: skip


def run_sweep(
    work, scores, config: SweepConfig, out: Path, dtype: str, device: str, objective: str, progress: bool,
    stream_blocks: bool = False,
) -> pd.DataFrame:  # fmt: skip
    """Run (or resume) a sweep into ``out``; returns the results table."""
    from autoq.pipeline import choose_engine, log, make_plans, model_for_apply
    from autoq.refine import refined_rows

    out.mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    scores.table.to_parquet(out / "scores.parquet", index=False)
    plans, curve = make_plans(work, scores, config.budgets, objective)
    curve.to_csv(out / "frontier.csv", index=False)
    reference = model_for_apply(work, dtype, device, stream_blocks)
    reference.requires_grad_(False)
    device = str(next(reference.parameters()).device)
    calib_batches = work.calibration.batches(config.batch_size)
    spec = config.eval_spec()
    heldout = heldout_tokens(work.calibration, work.tokenizer, config.eval_samples)
    sample_ids = calib_batches[0][:1, :64].to(device)

    rows = build_rows(work, plans, config, None)
    check_rows_fit(reference, rows, sample_ids)  # before any long work: a sweep never dies late on this
    if "modelopt" in config.baselines:
        # ModelOpt's search quantizes the loaded model in place, and the reference is read again
        # afterwards: one model in memory at a time, not a copy beside it (a 1.5B model in float32
        # on a 24 GiB CPU machine ran out of memory with the copy).
        state = _modelopt_state(work, reference, calib_batches, out)
        del reference
        work.model = None
        release_memory()
        reference = model_for_apply(work, dtype, device, stream_blocks)
        reference.requires_grad_(False)
        rows = build_rows(work, plans, config, state)
        check_rows_fit(reference, [r for r in rows if r.method == MODELOPT], sample_ids)
    rows += refined_rows(out)  # plans `autoq refine` wrote into this sweep directory
    config_key = {
        "model": work.model_info()["fingerprint"], "dtype": dtype, "device": device, "search_space": work.space.fingerprint,
        "calibration": work.calibration.describe(), "heldout": heldout.describe(),
        "evaluation": {k: v for k, v in asdict(config).items() if k not in ("budgets", "baselines", "keep_checkpoints", "engine")},
    }  # fmt: skip
    if work.kv_cache is not None:  # only then: sweeps made before --kv-cache keep their fingerprints
        config_key["kv_cache"] = work.kv_cache.name
    if config.engine != "modelopt":  # likewise: sweeps made before --engine exported every row with ModelOpt
        config_key["export_engine"] = config.engine
    # Checkpoints are written as the source stores its weights (a bf16 model computed in float32 stays bf16).
    export_dtype = checkpoint_dtype(work.source) or dtype
    streamed = _streamed_rows(work, scores, dtype, export_dtype, device, config.batch_size, progress)
    info = {
        "model": work.model_info(), "search_space": work.space.name, "budgets": config.budgets, "config": asdict(config),
        "calibration": work.calibration.describe(), "heldout": heldout.describe(), "objective": objective,
        "rows": [r.id for r in rows], "created": creation_info(), "config_key": config_key,
        "config_fingerprint": hashlib.sha256(json.dumps(config_key, sort_keys=True, default=str).encode()).hexdigest()[:24],
        "scoring": {"seconds": scores.seconds, "from_cache": scores.from_cache, "peak_memory_gib": scores.peak_memory},
    }  # fmt: skip
    fingerprints = {row.id: row.fingerprint(config_key) for row in rows}
    _forget_other_configurations(out, fingerprints, config_key, log)
    atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
    for plan in plans:
        plan.save(out / "plans" / f"autoq-{plan.budget['effective_bits']:g}.json")
    for row in tqdm(rows, desc="autoq sweep", disable=not progress):
        path = out / "rows" / f"{row.id}.json"
        if path.is_file() and json.loads(path.read_text()).get("status") == "ok":
            continue  # finished under this configuration (_forget_other_configurations removed the rest)
        if row.method != "autoq" and row.error is None:
            Plan(layers={n: LayerPlan(format=f) for n, f in row.formats.items()}).save(out / "plans" / f"{row.id}.json")
        keep = out / "checkpoints" / row.id if config.keep_checkpoints else None
        start = time.perf_counter()
        try:
            if row.error is not None:
                raise AutoqError(row.error)
            engine = choose_engine(config.engine, work.source, row.formats, dtype, work.kv_cache and work.kv_cache.name)
            record = evaluate_row(row, reference, work.tokenizer, calib_batches, heldout, spec, keep, progress, work.kv_cache,
                                  streamed if engine == "stream" else None, DTYPES[export_dtype])  # fmt: skip
        except Exception as err:  # noqa: BLE001 - one row's failure is recorded; the other rows still run
            if disk_full(err):  # not the row's failure: every later row would fail too
                raise
            message = str(err) if isinstance(err, AutoqError) else f"{type(err).__name__}: {err}"
            log(f"sweep row {row.id} failed: {message}")
            record = failed_record(row, message, device, time.perf_counter() - start)
        record["searched_bits"] = searched_bits(row.formats, work.choices) if row.formats else None
        record["fingerprint"] = fingerprints[row.id]
        atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=2, default=float)))
        release_memory()  # the row's models are gone; give their memory back before the next row loads its own
    table = collect_results(out)
    info["complete"] = int((table.status == "ok").sum()) == len(rows)
    atomic_write(out / "sweep.json", lambda p: p.write_text(json.dumps(info, indent=2, default=str)))
    return table


def _streamed_rows(work, scores, dtype: str, export_dtype: str, device: str, batch_size: int, progress: bool) -> StreamedRows:
    """The streamed exporter for this sweep's rows, reading the search's calibration state from
    ``scores.cache`` (completed by one streamed pass for any statistic a row needs that it lacks);
    checkpoints are written in ``export_dtype``, the model computes in ``dtype``."""
    from autoq.calibstate import CalibrationState
    from autoq.export import StreamedExport
    from autoq.streamcalib import complete_state

    calibration = {**work.calibration.describe(), "state_key": scores.cache.key}
    # This sweep's own scoring collected the state, on its model, dtype and calibration tokens.
    entry = Path(scores.cache.dir)
    state = [CalibrationState.load(entry) if CalibrationState.exists(entry) else None]  # completed as rows need more

    def export(plan: Plan, target: Path) -> float:
        state[0] = complete_state(state[0], plan.formats(), work.source, work.calibration, dtype, device, batch_size, progress)
        target.mkdir(parents=True, exist_ok=True)
        writer = StreamedExport(work.source.path, plan, state[0], export_dtype, device)
        return writer.write(target, work.tokenizer, progress=progress).effective_bits

    return StreamedRows(export, calibration)


def _forget_other_configurations(out: Path, fingerprints: dict[str, str], config_key: dict[str, Any], log) -> None:
    """Delete finished rows that another configuration (or another set of rows) produced, saying so:
    the results table describes one configuration only."""
    previous = json.loads((out / "sweep.json").read_text()).get("config_key", {}) if (out / "sweep.json").is_file() else {}
    changed = sorted(k for k in set(previous) | set(config_key) if previous.get(k) != config_key.get(k))
    stale = []
    for path in sorted((out / "rows").glob("*.json")):
        if json.loads(path.read_text()).get("fingerprint") != fingerprints.get(path.stem):
            stale.append(path)
    if stale:
        why = f"the configuration changed ({', '.join(changed)})" if previous and changed else "they were made with other settings or rows"
        log(f"sweep {out}: {len(stale)} finished row(s) are not reused, because {why}; "
            f"rows of this configuration are evaluated again: {', '.join(p.stem for p in stale)}")  # fmt: skip
        for path in stale:
            path.unlink()


def _modelopt_state(work, model: nn.Module, calib_batches: list[torch.Tensor], out: Path) -> dict | str | None:
    """Run ModelOpt's search once (its state re-solves for every budget); why it failed, if it did.
    It quantizes ``model`` in place: the caller loads the reference again afterwards."""
    from autoq.interop.modelopt import run_auto_quantize

    # Scores do not depend on the budget; 16 nominal bits is always feasible, and every row's
    # plan is then re-solved from this state at matched honest bits.
    try:
        state, seconds = run_auto_quantize(model, [c.name for c in work.choices], list(work.space.formats), calib_batches, 16.0)
    except Exception as err:  # noqa: BLE001 - recorded as the ModelOpt rows' failure; the other rows still run
        return f"ModelOpt auto_quantize failed: {type(err).__name__}: {err}"
    atomic_write(out / "modelopt_search.json", lambda p: p.write_text(json.dumps({"seconds": seconds})))
    return state


def collect_results(out: Path) -> pd.DataFrame:
    """The results table from every finished row (CSV and parquet next to them)."""
    records = [json.loads(p.read_text()) for p in sorted((Path(out) / "rows").glob("*.json"))]
    if not records:
        raise AutoqError(f"{out} has no finished sweep rows")
    table = pd.DataFrame(records)
    table["formats"] = table["formats"].map(lambda f: ", ".join(f"{k}:{v}" for k, v in sorted(f.items())) if isinstance(f, dict) else "")
    first = ["row", "method", "budget_bits", "searched_bits", "stored_bits", "size_bytes", "status"]
    table = table.reindex(columns=first + [c for c in table.columns if c not in first]).sort_values(["method", "searched_bits"])
    atomic_write(Path(out) / "results.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(Path(out) / "results.parquet", lambda p: table.to_parquet(p, index=False))
    return table
