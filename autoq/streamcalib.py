"""The calibration state a plan's streamed export needs: the search's, completed by one streamed pass.

``state_for_plan`` finds the state the plan's search saved (``plan.calibration.state_key``: an
entry of the score cache) and keeps it only if it describes this model, dtype and calibration
data. ``complete_state`` computes what the plan needs beyond it (planned layers without input
statistics, or without the AWQ pre-scale of their planned format) with the scoring engine's own
calibration pass (``SensitivityEngine.calibrate``) over those layers only, the model's decoder
blocks read from disk one at a time (``autoq.diskmodel``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from autoq.calibstate import CalibrationState
from autoq.data import TokenData
from autoq.errors import log
from autoq.model import DTYPES, ModelSource
from autoq.plan import Plan


def state_source(source: ModelSource, dtype: str, calibration: TokenData) -> dict:
    """What a calibration state's statistics depend on (compared before one is reused)."""
    return {"model": source.fingerprint(), "dtype": dtype, "data": calibration.fingerprint, "calibration": calibration.describe()}


def state_for_plan(plan: Plan, cache_root: Path, expected: dict) -> CalibrationState | None:
    """The calibration state of the search that made ``plan``, if it is for ``expected``'s model,
    dtype and data (``state_source``); None otherwise (saying why)."""
    key = plan.calibration.get("state_key")
    if not key:
        return None
    directory = Path(cache_root) / "scores" / str(key)  # autoq.cache.ScoreCache's entry
    if not CalibrationState.exists(directory):
        log(f"the plan's calibration state ({directory}) is not in the cache: calibrating what the plan needs")
        return None
    state = CalibrationState.load(directory)
    differ = [part for part in ("model", "dtype", "data") if state.source.get(part) != expected[part]]
    if differ:
        log(f"the plan's calibration state ({directory}) was collected with another {' and '.join(differ)}: not reused")
        return None
    log(f"reusing the search's calibration state ({directory})")
    return state


def complete_state(
    state: CalibrationState | None, formats: dict[str, str], source: ModelSource, calibration: TokenData, dtype: str, device: str,
    batch_size: int, progress: bool = True,
) -> CalibrationState:  # fmt: skip
    """``state`` with every statistic ``formats`` needs, the missing ones computed in one pass."""
    from autoq.decoder import DecoderStructure
    from autoq.diskmodel import DiskLoadUnsupported, load_skeleton
    from autoq.model import load_model
    from autoq.search_space import all_layers
    from autoq.sensitivity import ScoringOptions, SensitivityEngine

    state = state or CalibrationState({}, source=state_source(source, dtype, calibration))
    needed = state.missing(formats)
    if not needed:
        return state
    weights = None
    try:
        model, weights = load_skeleton(source.path, DTYPES[dtype])
    except DiskLoadUnsupported as err:
        log(f"{err}; loading the whole model to calibrate")
        model = load_model(source, dtype=dtype)
    layers = {layer.name: layer for layer in all_layers(model)}
    unknown = [name for name in needed if name not in layers]
    if unknown:  # the export's own plan check names them; here only what is calibrated matters
        needed = {name: fmt for name, fmt in needed.items() if name in layers}
    log(f"calibrating {len(needed)} planned layer(s) the calibration state lacks, in one pass over the model"
        + (" (blocks read from disk one at a time)" if weights is not None else ""))  # fmt: skip
    DecoderStructure(model)  # an unsupported architecture fails here, before any work
    choices = [replace(layers[name], candidates=(fmt,)) for name, fmt in needed.items()]
    options = ScoringOptions(batch_size=batch_size, device=device, stream_blocks=weights is not None, progress=progress)
    engine = SensitivityEngine(model, choices, options, weights=weights)
    stats = engine.calibrate(calibration.batches(batch_size))
    computed = CalibrationState.from_stats(stats, engine.structure.input_norms, engine.structure.norms, state_source(source, dtype, calibration))
    return state.merged(computed)
