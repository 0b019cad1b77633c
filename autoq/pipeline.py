"""The search pipeline: model + data + search space -> scores -> plans (-> checkpoint).

``score`` never loads weights when the score cache already holds the answer: layers are found on
a weightless (meta-device) copy of the model, and the cache key is built from file fingerprints.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from autoq import __version__, distributed
from autoq.apply import apply_plan, check_kv_cache_fits_model, export_checkpoint, write_checkpoint
from autoq.cache import ScoreCache
from autoq.data import TokenData, load_tokens
from autoq.default_model import cache_root, is_synthetic
from autoq.devices import default_device
from autoq.errors import AutoqError, atomic_output_dir, check_apart, check_output_dir, first_line, log  # noqa: F401 (log: the CLI calls pipeline.log)
from autoq.formats import KVCacheFormat, get_kv_cache_format
from autoq.model import (
    TIED_HEAD_REASON,
    ModelSource,
    check_causal_lm,
    lm_head_is_tied,
    load_model,
    load_tokenizer,
    resolve_model,
)
from autoq.plan import Plan, plan_from_solution
from autoq.search_space import LayerChoice, Protect, SearchSpace, load_search_space, select_layers
from autoq.sensitivity import ENGINE_VERSION, ScoringOptions, SensitivityEngine
from autoq.solver import Options, assign_groups, frontier, solve
from autoq.verify import VerifyReport


@dataclass
class Workload:
    """Everything scoring needs, resolved and validated before any heavy work."""

    source: ModelSource
    tokenizer: object
    space: SearchSpace
    calibration: TokenData
    choices: list[LayerChoice]
    total_params: int
    architecture: str
    model: nn.Module | None = None  # the real model, once loaded
    kv_cache: KVCacheFormat | None = None  # exported with every plan; not part of scoring

    @property
    def synthetic(self) -> bool:
        return self.source.synthetic or is_synthetic(self.source.path)

    def model_info(self) -> dict:
        info = {
            "id": self.source.name, "path": str(self.source.path), "fingerprint": self.source.fingerprint(),
            "architecture": self.architecture, "total_params": self.total_params, "synthetic": self.synthetic,
        }  # fmt: skip
        if self.source.weights_from:  # e.g. dequantized from a quantized GGUF: plans and reports say so
            info.update(weights_from=self.source.weights_from, caveat=self.source.caveat)
        return info


def load_sources(
    model: str | None, calib: str, samples: int, seq_len: int, trust_remote_code: bool = False
) -> tuple[ModelSource, object, TokenData]:
    """The model (``--model``, else the default), its tokenizer and the calibration tokens; no weights."""
    for flag, value in (("--model", model), ("--calib", calib)):
        if value is not None and not value.strip():
            raise AutoqError(f"{flag} is empty")
    source = resolve_model(model, trust_remote_code)  # None: the default model
    if source.weights_from:
        log(f"model {source.name}: weights {source.weights_from}" + (f"; caveat: {source.caveat}" if source.caveat else ""))
    check_causal_lm(source.path, source.trust_remote_code)
    tokenizer = load_tokenizer(source)
    return source, tokenizer, load_tokens(calib, tokenizer, samples, seq_len)


def prepare(
    model: str | None, space: str, calib: str, samples: int, seq_len: int, trust_remote_code: bool = False,
    protect: str | None = None, kv_cache: str | None = None,
) -> Workload:  # fmt: skip
    """Resolve the model, tokenizer, search space (with ``--protect`` over its own) and calibration
    tokens; find the layers; check that the model has the attention layers ``--kv-cache`` needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from autoq.decoder import DecoderStructure

    search_space = load_search_space(space)
    if protect is not None:
        search_space = search_space.with_protect(Protect.parse(protect))
    kv_format = get_kv_cache_format(kv_cache)
    source, tokenizer, calibration = load_sources(model, calib, samples, seq_len, trust_remote_code)
    trust = source.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust)
        with torch.device("meta"):  # module names, classes and shapes, without reading weights
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
            skeleton.tie_weights()  # as loading does (some transformers versions leave a meta skeleton untied)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # a config transformers cannot build
        raise AutoqError(f"cannot build the model described by {source.path / 'config.json'}: {first_line(err)}") from None
    structure = DecoderStructure(skeleton)
    tied = lm_head_is_tied(skeleton)
    if tied and search_space.search_lm_head:
        log(f"{structure.lm_head_name} is not searched: {TIED_HEAD_REASON}")
    choices = select_layers(skeleton, search_space, structure.lm_head_name, lm_head_tied=tied)
    check_kv_cache_fits_model(skeleton, kv_format)
    total = sum(p.numel() for p in skeleton.parameters())
    return Workload(source, tokenizer, search_space, calibration, choices, total, type(skeleton).__name__, kv_cache=kv_format)


def ensure_model(work: Workload, dtype: str, device: str) -> nn.Module:
    if work.model is None:
        work.model = load_model(work.source, dtype=dtype, device=device)
    return work.model


def model_for_apply(work: Workload, dtype: str, device: str, stream_blocks: bool) -> nn.Module:
    """The loaded model with every tensor on one device, ready for ModelOpt's calibration.

    Streamed scoring leaves the decoder blocks on the CPU and the rest on the device, and a model
    scored with ``--stream-blocks`` may not fit the device at all: it is applied on the CPU.
    """
    target = "cpu" if stream_blocks else device
    model = ensure_model(work, dtype, target)
    if {p.device for p in model.parameters()} != {torch.device(target)}:
        if stream_blocks:
            log("--stream-blocks: the model is applied and evaluated on the CPU (it may not fit the device whole)")
        model.to(target)
    return model


ENGINES = ("auto", "stream", "modelopt")


# Formats the streamed exporter writes (autoq.export); the newer ones (MXFP8, W4A16_NVFP4, INT8_SQ)
# and a quantized KV cache are exported through ModelOpt for now.
STREAMED_FORMATS = frozenset({"FP8", "NVFP4", "W4A8", "INT4_AWQ", "BF16"})


def choose_engine(requested: str, source: ModelSource, formats: dict[str, str], dtype: str, kv_cache: str | None = None) -> str:
    """The export engine: ``stream`` (``autoq.export``) or ``modelopt`` (``autoq.apply``).

    ``auto`` streams whenever the streamed export applies (dense models whose checkpoint stores
    every tensor under the module's own name, plans over nn.Linear layers) and says why not
    otherwise. Bad input (a shard missing, a shape config.json contradicts) is an error either way.
    """
    from autoq.export import unsupported_reason

    if requested == "modelopt":
        return "modelopt"
    others = sorted(set(formats.values()) - STREAMED_FORMATS)
    if others or kv_cache is not None:  # documented (README): these plans go through ModelOpt
        if requested == "stream":
            what = f"{', '.join(others)} layers" if others else "a KV cache"
            raise AutoqError(f"--engine stream cannot export this: it does not write {what} yet (use --engine modelopt)")
        return "modelopt"
    reason = unsupported_reason(source.path, formats, dtype)
    if reason is None:
        return "stream"
    if requested == "stream":
        raise AutoqError(f"--engine stream cannot export this: {reason} (use --engine modelopt)")
    log(f"exporting with ModelOpt (the model in memory): {reason}")
    return "modelopt"


def _streamed_state(plan: Plan, source: ModelSource, calibration: TokenData, dtype: str, device: str, batch_size: int,
                    cache_dir: Path | None, progress: bool):  # fmt: skip
    """The plan's calibration state: its search's, completed by one streamed pass (``autoq.streamcalib``)."""
    from autoq.streamcalib import complete_state, state_for_plan, state_source

    state = state_for_plan(plan, Path(cache_dir) if cache_dir else cache_root(), state_source(source, dtype, calibration))
    return complete_state(state, plan.formats(), source, calibration, dtype, device, batch_size, progress)


def export_plan(work: Workload, plan: Plan, dtype: str, device: str, stream_blocks: bool, batch_size: int, directory: Path,
                progress: bool = True, engine: str = "auto", cache_dir: Path | None = None) -> VerifyReport:  # fmt: skip
    """Apply ``plan`` to the workload's model and write the verified checkpoint into the empty
    ``directory``: streamed from the search's calibration state, or with ModelOpt (calibrated again)."""
    if choose_engine(engine, work.source, plan.formats(), dtype, plan.kv_cache) == "stream":
        from autoq.export import StreamedExport

        state = _streamed_state(plan, work.source, work.calibration, dtype, device, batch_size, cache_dir, progress)
        return StreamedExport(work.source.path, plan, state, dtype, device).write(directory, work.tokenizer, progress=progress)
    model = model_for_apply(work, dtype, device, stream_blocks)
    apply_plan(model, plan.formats(), work.calibration.batches(batch_size), progress=progress, kv_cache=get_kv_cache_format(plan.kv_cache))
    work.model = None  # ModelOpt packed its weights in place
    return write_checkpoint(model, work.tokenizer, plan, directory)


def apply_and_export(
    plan: Plan, model: str | None, calib: str, samples: int, seq_len: int, dtype: str, device: str, batch_size: int,
    export: Path, overwrite: bool = False, progress: bool = True, engine: str = "auto", cache_dir: Path | None = None,
    trust_remote_code: bool = False,
) -> VerifyReport:  # fmt: skip
    """``autoq apply``: a plan (and its KV cache) applied to a model, calibrated, exported and verified, all or nothing."""
    check_output_dir(Path(export), overwrite)
    source, tokenizer, calibration = load_sources(model, calib, samples, seq_len, trust_remote_code)
    check_outputs_apart(source, export)
    if choose_engine(engine, source, plan.formats(), dtype, plan.kv_cache) == "stream":
        from autoq.export import stream_export

        state = _streamed_state(plan, source, calibration, dtype, device, batch_size, cache_dir, progress)
        return stream_export(source.path, plan, state, Path(export), tokenizer, overwrite, dtype, device, progress=progress)
    loaded = load_model(source, dtype=dtype, device=device)
    apply_plan(loaded, plan.formats(), calibration.batches(batch_size), progress=progress, kv_cache=get_kv_cache_format(plan.kv_cache))
    return export_checkpoint(loaded, tokenizer, plan, Path(export), overwrite)


@dataclass
class ScoreResult:
    table: pd.DataFrame  # grouped score table (SCORE_COLUMNS + group)
    cache: ScoreCache  # in a data-parallel run, a distributed.RankZeroCache (rank 0 reads and writes it)
    from_cache: bool
    seconds: float
    peak_memory: dict[str, float] = field(default_factory=dict)
    load_seconds: float = 0.0  # of ``seconds``: loading the model
    peak_memory_per_rank: list[dict[str, float]] = field(default_factory=list)  # data-parallel: every rank's, in rank order


def score(work: Workload, options: ScoringOptions, dtype: str = "bfloat16", cache_dir: Path | None = None) -> ScoreResult:
    """Scores for every searched layer and candidate format, from the cache when possible."""
    key = {
        "engine": ENGINE_VERSION,
        "model": work.source.fingerprint(),
        "dtype": dtype,
        "data": work.calibration.fingerprint,
        "layers": [[c.name, list(c.candidates)] for c in work.choices],
        "formats": {f: _format_fingerprint(f) for c in work.choices for f in c.candidates},
        **options.cache_key_parts(),
    }
    parallel = distributed.current()
    cache = parallel.shared_cache(ScoreCache(Path(cache_dir) if cache_dir else cache_root(), key))  # data-parallel: rank 0's
    start = time.perf_counter()
    table = cache.load_table()
    from_cache, load_seconds = True, 0.0
    if table is None:
        with cache.locked():  # one process scores an entry; another one waits here, then reads its table
            table = cache.load_table()
            if table is None:
                from_cache = False
                device = options.device or default_device()
                model, weights = _model_for_scoring(work, dtype, device, options.stream_blocks)
                load_seconds = time.perf_counter() - start
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                engine = SensitivityEngine(model, work.choices, options, cache, weights)
                table = engine.run(work.calibration.batches(options.batch_size))
                if parallel.is_main and engine.stats:  # what exporting any plan over these layers needs (autoq.calibstate)
                    from autoq.calibstate import CalibrationState
                    from autoq.streamcalib import state_source

                    s = engine.structure
                    state = CalibrationState.from_stats(engine.stats, s.input_norms, s.norms, state_source(work.source, dtype, work.calibration))
                    state.save(cache.dir)
    seconds = time.perf_counter() - start
    per_rank = parallel.gather(peak_memory(), "reporting peak memory")
    return ScoreResult(assign_groups(table, work.space), cache, from_cache, seconds, per_rank[parallel.rank], load_seconds, per_rank)


def _model_for_scoring(work: Workload, dtype: str, device: str, stream_blocks: bool):
    """The model to score, and with ``stream_blocks`` the files its blocks are read from: a skeleton
    whose decoder blocks stay on disk (``autoq.diskmodel``), or, for a checkpoint that does not
    store the modules' own tensors, the whole model in CPU memory (streamed from there)."""
    if stream_blocks:
        from autoq.diskmodel import DiskLoadUnsupported, load_skeleton
        from autoq.model import DTYPES

        try:
            return load_skeleton(work.source.path, DTYPES[dtype])
        except DiskLoadUnsupported as err:
            log(f"--stream-blocks: {err}; loading the whole model into CPU memory instead")
    return ensure_model(work, dtype, "cpu" if stream_blocks else device), None


def _format_fingerprint(name: str) -> str:
    from autoq.formats import FORMATS

    return FORMATS[name].fingerprint()


def peak_memory() -> dict[str, float]:
    """Peak resident CPU memory of this process and peak CUDA allocation, in GiB."""
    peak = {"cpu_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        peak["cuda_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return peak


def make_plans(work: Workload, scores: ScoreResult, budgets: list[float], objective: str) -> tuple[list[Plan], pd.DataFrame]:
    """One plan per budget, plus the frontier over a grid of budgets, from one score table."""
    options = Options.from_table(scores.table)
    plans = []
    for budget in budgets:
        solution = solve(options, budget)
        plans.append(
            plan_from_solution(
                scores.table, solution.choice, budget_bits=budget, total_params=work.total_params,
                model=work.model_info(),
                search_space=space_summary(work.space),
                objective=objective, calibration={**work.calibration.describe(), "state_key": scores.cache.key},
                kv_cache=None if work.kv_cache is None else work.kv_cache.name,
            )
        )  # fmt: skip
    low, high = options.min_bits(), options.max_bits()
    grid = sorted({round(low + (high - low) * k / 40, 4) for k in range(41)} | set(budgets))
    return plans, frontier(options, [b for b in grid if b >= low])


def space_summary(space: SearchSpace) -> dict:
    """What a plan records about the search space it was solved in."""
    summary = {"name": space.name, "formats": list(space.formats), "sha256": space.fingerprint}
    if space.lm_head_formats is not None:
        summary["lm_head_formats"] = list(space.lm_head_formats)
    if space.protect is not None:
        summary["protect"] = space.protect.describe()
    return summary


def plan_filename(budget: float, many: bool) -> str:
    return f"plan-{budget:g}bits.json" if many else "plan.json"


def write_search_outputs(directory: Path, scores: ScoreResult, plans: list[Plan], curve: pd.DataFrame, summary: dict) -> None:
    """A search's results into the (staged, empty) ``directory``."""
    scores.table.to_parquet(directory / "scores.parquet", index=False)
    scores.table.to_csv(directory / "scores.csv", index=False)
    curve.to_csv(directory / "frontier.csv", index=False)
    for plan in plans:
        plan.save(directory / plan_filename(plan.budget["effective_bits"], len(plans) > 1))
    (directory / "search.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_summary(work: Workload, scores: ScoreResult, options: ScoringOptions, plans: list[Plan]) -> dict:
    return {
        "autoq": __version__,
        "model": work.model_info(),
        "search_space": work.space.name,
        "calibration": work.calibration.describe(),
        "objective": options.objective,
        "dtype": scores.cache.key_parts.get("dtype"),  # what the model computed in (refine and eval default to it)
        "scores_from_cache": scores.from_cache,
        "cache_key": scores.cache.key,
        "calibration_state": str(scores.cache.dir),  # autoq.calibstate, read by `autoq apply --engine stream`
        "scoring_seconds": round(scores.seconds, 3),
        "model_load_seconds": round(scores.load_seconds, 3),
        "peak_memory": scores.peak_memory,
        "device": options.device or default_device(),
        "processes": len(scores.peak_memory_per_rank),
        "peak_memory_per_rank": scores.peak_memory_per_rank,
        "plans": {plan.budget["effective_bits"]: plan.achieved for plan in plans},
    }


def preflight_outputs(*dirs_and_flags: tuple[Path | None, bool]) -> None:
    for path, overwrite in dirs_and_flags:
        if path is not None:
            check_output_dir(Path(path), overwrite)


def check_outputs_apart(source: ModelSource, *outputs: Path | None) -> None:
    """Outputs neither are, contain nor lie inside the input model (so an export never overwrites it)."""
    check_apart(list(outputs), source.local_paths())


def require_single_budget(budgets: list[float], what: str) -> float:
    if len(budgets) != 1:
        raise AutoqError(f"{what} needs exactly one --bits value (got {len(budgets)})")
    return budgets[0]
