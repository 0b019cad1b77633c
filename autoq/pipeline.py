"""The search pipeline: model + data + search space -> scores -> plans (-> checkpoint).

``score`` never loads weights when the score cache already holds the answer: layers are found on
a weightless (meta-device) copy of the model, and the cache key is built from file fingerprints.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from autoq import __version__
from autoq.cache import ScoreCache
from autoq.data import TokenData, load_tokens
from autoq.default_model import cache_root, default_model, is_synthetic
from autoq.errors import AutoqError, atomic_output_dir, check_output_dir
from autoq.model import TIED_HEAD_REASON, ModelSource, check_causal_lm, lm_head_is_tied, load_model, load_tokenizer, resolve_model
from autoq.plan import Plan, plan_from_solution
from autoq.search_space import LayerChoice, SearchSpace, load_search_space, select_layers
from autoq.sensitivity import ENGINE_VERSION, ScoringOptions, SensitivityEngine
from autoq.solver import Options, assign_groups, frontier, solve


def log(message: str) -> None:
    print(f"autoq: {message}", file=sys.stderr, flush=True)


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

    @property
    def synthetic(self) -> bool:
        return self.source.synthetic or is_synthetic(self.source.path)

    def model_info(self) -> dict:
        return {
            "id": self.source.name, "path": str(self.source.path), "fingerprint": self.source.fingerprint(),
            "architecture": self.architecture, "total_params": self.total_params, "synthetic": self.synthetic,
        }  # fmt: skip


def prepare(model: str | None, space: str, calib: str, samples: int, seq_len: int) -> Workload:
    """Resolve the model, tokenizer, search space and calibration tokens; find the layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from autoq.model import DecoderStructure

    source = resolve_model(model) if model else default_model()
    check_causal_lm(source.path)
    search_space = load_search_space(space)
    tokenizer = load_tokenizer(source)
    calibration = load_tokens(calib, tokenizer, samples, seq_len)
    config = AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):  # module names, classes and shapes, without reading weights
        skeleton = AutoModelForCausalLM.from_config(config)
    structure = DecoderStructure(skeleton)
    tied = lm_head_is_tied(skeleton)
    if tied and search_space.search_lm_head:
        log(f"{structure.lm_head_name} is not searched: {TIED_HEAD_REASON}")
    choices = select_layers(skeleton, search_space, structure.lm_head_name, lm_head_tied=tied)
    total = sum(p.numel() for p in skeleton.parameters())
    return Workload(source, tokenizer, search_space, calibration, choices, total, type(skeleton).__name__)


def ensure_model(work: Workload, dtype: str, device: str) -> nn.Module:
    if work.model is None:
        work.model = load_model(work.source, dtype=dtype, device=device)
    return work.model


@dataclass
class ScoreResult:
    table: pd.DataFrame  # grouped score table (SCORE_COLUMNS + group)
    cache: ScoreCache
    from_cache: bool
    seconds: float
    peak_memory: dict[str, float] = field(default_factory=dict)


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
    cache = ScoreCache(Path(cache_dir) if cache_dir else cache_root(), key)
    start = time.perf_counter()
    table = cache.load_table()
    from_cache = table is not None
    if table is None:
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = ensure_model(work, dtype, "cpu" if options.stream_blocks else device)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        table = SensitivityEngine(model, work.choices, options, cache).run(work.calibration.batches(options.batch_size))
    seconds = time.perf_counter() - start
    return ScoreResult(assign_groups(table, work.space), cache, from_cache, seconds, peak_memory())


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
                search_space={"name": work.space.name, "formats": list(work.space.formats), "sha256": work.space.fingerprint},
                objective=objective, calibration=work.calibration.describe(),
            )
        )  # fmt: skip
    low, high = options.min_bits(), options.max_bits()
    grid = sorted({round(low + (high - low) * k / 40, 4) for k in range(41)} | set(budgets))
    return plans, frontier(options, [b for b in grid if b >= low])


def plan_filename(budget: float, many: bool) -> str:
    return f"plan-{budget:g}bits.json" if many else "plan.json"


def write_search_outputs(
    out: Path, overwrite: bool, scores: ScoreResult, plans: list[Plan], curve: pd.DataFrame, summary: dict
) -> None:
    with atomic_output_dir(out, overwrite) as tmp:
        scores.table.to_parquet(tmp / "scores.parquet", index=False)
        scores.table.to_csv(tmp / "scores.csv", index=False)
        curve.to_csv(tmp / "frontier.csv", index=False)
        for plan in plans:
            plan.save(tmp / plan_filename(plan.budget["effective_bits"], len(plans) > 1))
        (tmp / "search.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_summary(work: Workload, scores: ScoreResult, options: ScoringOptions, plans: list[Plan]) -> dict:
    return {
        "autoq": __version__,
        "model": work.model_info(),
        "search_space": work.space.name,
        "calibration": work.calibration.describe(),
        "objective": options.objective,
        "scores_from_cache": scores.from_cache,
        "cache_key": scores.cache.key,
        "scoring_seconds": round(scores.seconds, 3),
        "peak_memory": scores.peak_memory,
        "device": options.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "plans": {plan.budget["effective_bits"]: plan.achieved for plan in plans},
    }


def preflight_outputs(*dirs_and_flags: tuple[Path | None, bool]) -> None:
    for path, overwrite in dirs_and_flags:
        if path is not None:
            check_output_dir(Path(path), overwrite)


def require_single_budget(budgets: list[float], what: str) -> float:
    if len(budgets) != 1:
        raise AutoqError(f"{what} needs exactly one --bits value (got {len(budgets)})")
    return budgets[0]
