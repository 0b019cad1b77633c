"""A search or sweep directory reopened for measuring plans (``autoq refine``, ``frontier --measured``).

``read_run`` reads what needs no model (scores, provenance), so bad arguments fail in
milliseconds. ``open_workspace`` rebuilds the rest from the run's provenance (model path,
calibration source and shape; any of it can be overridden): the reference model, the
``SwitchableModel`` and two held-out slices of the calibration source, both after the calibration
tokens and disjoint:

* the *searched* slice: the ``eval_samples`` rows right after the calibration rows, the slice
  ``autoq eval`` and ``autoq sweep`` measure on, so a trial's metric equals ``autoq eval``'s;
* the *unseen* slice: the ``unseen_samples`` rows after that, measured only for the final report.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from autoq.data import TokenData, load_tokens
from autoq.default_model import is_synthetic
from autoq.errors import AutoqError
from autoq.measure import HeldoutSlice, SwitchableModel
from autoq.model import load_model, load_tokenizer, resolve_model
from autoq.pipeline import log
from autoq.plan import Plan, load_plan, plan_from_solution
from autoq.solver import Options

DEFAULT_EVAL_SAMPLES = 32  # as `autoq eval`


@dataclass
class ModelSettings:
    """How to rebuild the model and data; ``None`` takes the run's own provenance."""

    model: str | None = None
    calib: str | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    eval_samples: int | None = None
    unseen_samples: int | None = None  # default: eval_samples
    batch_size: int = 4
    dtype: str | None = None
    device: str | None = None
    progress: bool = True
    trust_remote_code: bool = False  # run the model's own code (--trust-remote-code)


@dataclass
class Run:
    """A directory written by ``autoq search`` (search.json) or ``autoq sweep`` (sweep.json)."""

    dir: Path
    table: pd.DataFrame
    options: Options
    info: dict
    fingerprint: str  # of the score table

    @property
    def budgets(self) -> list[float]:
        return sorted(float(b) for b in self.info.get("budgets") or self.info.get("plans") or [])

    def budget(self, bits: float | None) -> float:
        """``bits``, or the run's only budget when not given."""
        if bits is not None:
            return float(bits)
        if len(self.budgets) != 1:
            shown = ", ".join(f"{b:g}" for b in self.budgets) or "none"
            raise AutoqError(f"pass --bits (the run {self.dir} has plans at: {shown})")
        return self.budgets[0]


def read_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    scores = run_dir / "scores.parquet"
    if not scores.is_file():
        raise AutoqError(f"{run_dir} has no scores.parquet (run `autoq search` first)")
    info_file = next((run_dir / f for f in ("search.json", "sweep.json") if (run_dir / f).is_file()), None)
    if info_file is None:
        raise AutoqError(f"{run_dir} has no search.json or sweep.json (not written by `autoq search` or `autoq sweep`)")
    table = pd.read_parquet(scores)
    if "group" not in table:
        raise AutoqError(f"{scores} has no group column (not written by `autoq search`)")
    fingerprint = hashlib.sha256(scores.read_bytes()).hexdigest()[:16]
    return Run(run_dir, table, Options.from_table(table), json.loads(info_file.read_text()), fingerprint)


@dataclass
class Workspace:
    run: Run
    settings: ModelSettings  # resolved: no None left but device
    device: str
    model_info: dict
    total_params: int
    calibration: TokenData
    switchable: SwitchableModel
    search: HeldoutSlice
    unseen: HeldoutSlice
    build_seconds: float
    layer_group: dict[str, str] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return self.model_info["id"] + (" (SYNTHETIC random weights)" if self.model_info.get("synthetic") else "")

    def formats(self, choice: dict[str, str]) -> dict[str, str]:
        """Layer -> format for a group -> format choice."""
        return {layer: choice[group] for layer, group in self.layer_group.items()}

    def bits(self, choice: dict[str, str]) -> float:
        """Stored bits per searched weight of a group -> format choice."""
        options = self.run.options
        used = sum(b[f.index(choice[g])] for g, f, b in zip(options.groups, options.formats, options.bits))
        return float(used) / options.params

    def measure(self, choice: dict[str, str], heldout: HeldoutSlice) -> dict[str, float]:
        return heldout.measure(self.switchable.use(self.formats(choice)))

    def plan(self, choice: dict[str, str], budget: float) -> Plan:
        """The plan file for a choice, with the run's provenance."""
        existing = sorted(self.run.dir.glob("plan*.json")) + sorted(self.run.dir.glob("plans/autoq-*.json"))
        space = load_plan(existing[0]).search_space if existing else {"name": self.run.info.get("search_space")}
        return plan_from_solution(
            self.run.table, choice, budget_bits=budget, total_params=self.total_params, model=self.model_info,
            search_space=space, objective=self.run.info.get("objective"), calibration=self.calibration.describe(),
        )  # fmt: skip


def resolve_settings(run: Run, settings: ModelSettings) -> ModelSettings:
    calib = run.info.get("calibration", {})
    eval_samples = settings.eval_samples or run.info.get("config", {}).get("eval_samples") or DEFAULT_EVAL_SAMPLES
    resolved = replace(
        settings,
        model=settings.model or run.info.get("model", {}).get("path"),
        calib=settings.calib or calib.get("source"),
        calib_samples=settings.calib_samples or calib.get("samples"),
        seq_len=settings.seq_len or calib.get("seq_len"),
        eval_samples=eval_samples,
        unseen_samples=settings.unseen_samples or eval_samples,
        # The dtype the run computed in (search.json, or a sweep's configuration), else bfloat16.
        dtype=settings.dtype or run.info.get("dtype") or run.info.get("config_key", {}).get("dtype") or "bfloat16",
    )
    missing = [k for k in ("model", "calib", "calib_samples", "seq_len") if getattr(resolved, k) is None]
    if missing:
        raise AutoqError(f"{run.dir}: the run does not record {', '.join(missing)}; pass --{missing[0].replace('_', '-')}")
    for name in ("eval_samples", "unseen_samples", "batch_size"):
        if getattr(resolved, name) <= 0:
            raise AutoqError(f"--{name.replace('_', '-')} must be positive")
    return resolved


def open_workspace(run: Run, settings: ModelSettings) -> Workspace:
    """Load the model and data the run was scored with, and build the switchable model."""
    start = time.perf_counter()
    s = resolve_settings(run, settings)
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = resolve_model(s.model, s.trust_remote_code)
    recorded = run.info.get("model", {})
    if recorded.get("fingerprint") and source.fingerprint() != recorded["fingerprint"]:
        log(f"model {source.name} differs from the one {run.dir} was scored with ({recorded.get('id')})")
    tokenizer = load_tokenizer(source)
    calibration = load_tokens(s.calib, tokenizer, s.calib_samples, s.seq_len)
    if run.info.get("calibration", {}).get("fingerprint") not in (None, calibration.fingerprint):
        log(f"calibration tokens differ from the ones {run.dir} was scored with")
    search = load_tokens(s.calib, tokenizer, s.eval_samples, s.seq_len, skip_samples=s.calib_samples, purpose="held-out (searched)")
    unseen = load_tokens(s.calib, tokenizer, s.unseen_samples, s.seq_len, skip_samples=s.calib_samples + s.eval_samples,
                         purpose="held-out (unseen)")  # fmt: skip
    reference = load_model(source, dtype=s.dtype, device=device)
    total_params = sum(p.numel() for p in reference.parameters())
    model_info = {**recorded, "id": source.name, "path": str(source.path), "fingerprint": source.fingerprint(),
                  "total_params": total_params, "synthetic": source.synthetic or is_synthetic(source.path)}  # fmt: skip
    search_slice = HeldoutSlice(reference, search.batches(s.batch_size), {**search.describe(), "skip_samples": s.calib_samples})
    unseen_slice = HeldoutSlice(reference, unseen.batches(s.batch_size),
                                {**unseen.describe(), "skip_samples": s.calib_samples + s.eval_samples})  # fmt: skip
    layer_group = dict(zip(run.table.layer, run.table.group))
    options = run.options
    candidates = {layer: options.formats[options.groups.index(group)] for layer, group in layer_group.items()}
    log(f"quantizing {len(candidates)} layers once per format ({', '.join(sorted({f for c in candidates.values() for f in c}))})")
    # The reference's log-probs are held by the slices; the model itself becomes the switchable one.
    switchable = SwitchableModel(reference, candidates, calibration.batches(s.batch_size), progress=s.progress)
    del reference
    return Workspace(run, s, device, model_info, total_params, calibration, switchable, search_slice, unseen_slice,
                     time.perf_counter() - start, layer_group)  # fmt: skip
