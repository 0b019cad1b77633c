"""The plan file: one format per linear layer, with where it came from.

``plan.json`` (schema ``autoq.plan``, version 1) is documented in the README. Only ``schema``,
``version`` and ``layers.<name>.format`` are required, so a plan can be written by hand; every
other field is provenance that autoq fills in, except ``kv_cache`` (``"FP8"``, ``"NVFP4"`` or
null), the KV-cache quantization ``autoq apply`` exports with the layers.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from autoq import __version__
from autoq.errors import AutoqError
from autoq.formats import KV_CACHE_FORMATS, get_format, get_kv_cache_format

SCHEMA = "autoq.plan"
VERSION = 1


@dataclass
class LayerPlan:
    format: str
    group: str | None = None
    score: float | None = None
    params: int | None = None
    bits: int | None = None


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    model: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    achieved: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)
    kv_cache: str | None = None  # KV_CACHE_FORMATS name; its bits are reported beside the weights', never in them

    def formats(self) -> dict[str, str]:
        return {name: layer.format for name, layer in self.layers.items()}

    def to_json(self) -> dict[str, Any]:
        layers = {name: {k: v for k, v in vars(layer).items() if v is not None} for name, layer in self.layers.items()}
        return {
            "schema": SCHEMA, "version": VERSION, "model": self.model, "search_space": self.search_space,
            "objective": self.objective, "budget": self.budget, "achieved": self.achieved,
            "calibration": self.calibration, "created": self.created, "kv_cache": self.kv_cache, "layers": layers,
        }  # fmt: skip

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


MAX_PLAN_BYTES = 64 << 20  # a plan has one small entry per layer: far below this for any model
_LAYER_NAME = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")  # a module path: word characters (any script), '-', dots
_PROVENANCE = ("model", "search_space", "budget", "achieved", "calibration", "created")


def load_plan(path: Path) -> Plan:
    """Read and validate a plan file; any problem is one clear ``AutoqError``.

    Strict JSON: duplicate keys (``json`` would keep the last one silently), NaN and infinities are
    errors; so are files over ``MAX_PLAN_BYTES`` and anything but a regular file (a FIFO would hang).
    """
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            raise AutoqError(f"cannot read plan file {path} (not a regular file)")
        size = path.stat().st_size
        if size > MAX_PLAN_BYTES:
            raise AutoqError(f"plan file {path} has {size} bytes; a plan has at most {MAX_PLAN_BYTES} (one entry per layer)")
        raw = json.loads(path.read_text(), object_pairs_hook=lambda pairs: _unique_keys(pairs, path),
                         parse_constant=lambda name: _no_constant(name, path))  # fmt: skip
    except FileNotFoundError:
        raise AutoqError(f"plan file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise AutoqError(f"cannot read plan file {path} ({type(err).__name__})") from None
    except json.JSONDecodeError as err:
        raise AutoqError(f"plan file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:  # an integer of more than 4300 digits; nesting deeper than the stack
        raise AutoqError(f"plan file {path} is not usable JSON ({type(err).__name__}: {str(err)[:80]})") from None
    return plan_from_json(raw, str(path))


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise AutoqError(f"plan file {path} has the key {ascii(duplicate)[:80]} twice in one object (JSON would keep the last silently)")
    return result


def _no_constant(name: str, path: Path) -> Any:
    raise AutoqError(f"plan file {path} holds {name}, which is not a number a plan may hold")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plan_from_json(raw: Any, origin: str) -> Plan:
    """A plan from parsed JSON, every field checked: wrong types never reach the code that uses them."""
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise AutoqError(f"{origin}: not an autoq plan (expected \"schema\": \"{SCHEMA}\")")
    version = raw.get("version")
    if type(version) is not int or version != VERSION:
        raise AutoqError(f"{origin}: plan version {ascii(version)[:40]} is not supported (this autoq reads {VERSION})")
    layers_raw = raw.get("layers")
    if not isinstance(layers_raw, dict) or not layers_raw:
        raise AutoqError(f"{origin}: 'layers' must map layer names to {{\"format\": ...}}")
    layers = {}
    for name, entry in layers_raw.items():
        shown = ascii(name)[:80]
        if not _LAYER_NAME.fullmatch(name):
            raise AutoqError(f"{origin}: layer name {shown} is not a module name (dot-separated words)")
        if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
            raise AutoqError(f"{origin}: layer {shown} has no \"format\"")
        get_format(entry["format"])
        for key in ("params", "bits"):
            value = entry.get(key)
            if value is not None and (type(value) is not int or not 0 <= value <= 2**53):
                raise AutoqError(f"{origin}: layer {shown}: {key} must be a whole number from 0 to 2**53 (got {ascii(value)[:40]})")
        if entry.get("score") is not None and not _is_number(entry["score"]):
            raise AutoqError(f"{origin}: layer {shown}: score must be a finite number (got {ascii(entry['score'])[:40]})")
        if entry.get("group") is not None and not isinstance(entry["group"], str):
            raise AutoqError(f"{origin}: layer {shown}: group must be a string (got {ascii(entry['group'])[:40]})")
        known = {k: entry.get(k) for k in ("group", "score", "params", "bits")}
        layers[name] = LayerPlan(format=entry["format"], **known)
    for key in _PROVENANCE:
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise AutoqError(f"{origin}: '{key}' must be an object (got {type(raw[key]).__name__})")
    if raw.get("objective") is not None and not isinstance(raw["objective"], str):
        raise AutoqError(f"{origin}: 'objective' must be a string")
    for section, key in (("budget", "effective_bits"), ("achieved", "searched_effective_bits"), ("achieved", "model_effective_bits")):
        value = (raw.get(section) or {}).get(key)
        if value is not None and not _is_number(value):
            raise AutoqError(f"{origin}: {section}.{key} must be a finite number (got {ascii(value)[:40]})")
    kv_cache = raw.get("kv_cache")
    if kv_cache is not None and not isinstance(kv_cache, str):
        raise AutoqError(f"{origin}: \"kv_cache\" must be null or one of {', '.join(KV_CACHE_FORMATS)}")
    kv_format = get_kv_cache_format(kv_cache)
    return Plan(layers=layers, **{k: raw.get(k) or {} for k in _PROVENANCE}, objective=raw.get("objective"),
                kv_cache=None if kv_format is None else kv_format.name)  # fmt: skip


def creation_info() -> dict[str, Any]:
    return {
        "tool": "autoq", "version": __version__,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["autoq", *sys.argv[1:]]) if Path(sys.argv[0]).name == "autoq" else None,
    }  # fmt: skip


def plan_from_solution(
    table: pd.DataFrame, choice: dict[str, str], *, budget_bits: float, total_params: int, **provenance: Any
) -> Plan:
    """Build a plan from a grouped score table and the solver's group -> format choice."""
    picked = table[table.format == table.group.map(choice)]
    layers = {
        row.layer: LayerPlan(format=row.format, group=row.group, score=float(row.score), params=int(row.params), bits=int(row.bits))
        for row in picked.itertuples()
    }
    searched_params = int(picked.params.sum())
    searched_bits = int(picked.bits.sum())
    # Everything not searched (embeddings, norms, unsearched linears) stays in 16 bits.
    model_bits = searched_bits + 16 * (total_params - searched_params)
    achieved = {
        "searched_effective_bits": searched_bits / searched_params,
        "model_effective_bits": model_bits / total_params,
        "searched_params": searched_params,
        "total_params": total_params,
        "total_score": float(picked.score.sum()),
        "format_share": {fmt: picked[picked.format == fmt].params.sum() / searched_params for fmt in sorted(set(picked.format))},
    }
    return Plan(layers=layers, budget={"effective_bits": budget_bits}, achieved=achieved, created=creation_info(), **provenance)


def layer_table(plan: Plan) -> pd.DataFrame:
    """One row per planned layer: layer, format, params, bits."""
    rows = [{"layer": n, "format": layer.format, "params": layer.params, "bits": layer.bits} for n, layer in plan.layers.items()]
    return pd.DataFrame(rows, columns=["layer", "format", "params", "bits"])


def describe_plan(plan: Plan) -> str:
    """``autoq plan show``: the layer table, then totals and the format counts."""
    table = layer_table(plan)
    lines = [table.to_string(index=False)]
    known = table.dropna(subset=["params", "bits"])
    if len(known):
        lines.append(f"# {len(table)} layers, {int(known.params.sum())} params, {int(known.bits.sum())} bits: "
                     f"{known.bits.sum() / known.params.sum():.4f} effective bits")  # fmt: skip
    lines.append("# " + ", ".join(f"{fmt}: {count}" for fmt, count in table.format.value_counts().items()))
    return "\n".join(lines)


def diff_plans(a: Plan, b: Plan) -> pd.DataFrame:
    """The layers whose format differs (or that only one plan names), with both formats and bits."""
    rows = []
    for name in sorted(set(a.layers) | set(b.layers)):
        la, lb = a.layers.get(name), b.layers.get(name)
        if la is None or lb is None or la.format != lb.format:
            rows.append({"layer": name, "a": la.format if la else "-", "b": lb.format if lb else "-",
                         "bits_a": la.bits if la else None, "bits_b": lb.bits if lb else None})  # fmt: skip
    return pd.DataFrame(rows, columns=["layer", "a", "b", "bits_a", "bits_b"])


def describe_diff(a: Plan, b: Plan) -> str:
    """``autoq plan diff``: the differing layers, each plan's size, and how many layers differ."""
    table = diff_plans(a, b)
    lines = [table.to_string(index=False) if len(table) else "# identical formats"]
    for label, plan in (("a", a), ("b", b)):
        bits = plan.achieved.get("searched_effective_bits")
        lines.append(f"# {label}: {len(plan.layers)} layers" + (f", {bits:.4f} effective bits" if bits is not None else ""))
    lines.append(f"# {len(table)} layer(s) differ")
    return "\n".join(lines)
