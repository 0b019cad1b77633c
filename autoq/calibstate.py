"""Calibration state: what exporting a plan needs to know about the planned layers' inputs.

Scoring collects it anyway (pass 1 of ``autoq.sensitivity``), so ``autoq search`` saves it in its
score cache entry (``<cache>/scores/<key>/calibration.safetensors`` and ``calibration.json``), keyed
like the scores, and its plans point at it (``plan.calibration.state_key``). Any plan over the
searched layers and formats then exports without running the model (``autoq.export``); what a
hand-written plan needs beyond it is computed in one streamed pass (``autoq.diskmodel``).

Per layer, in safetensors (nothing is ever unpickled):
* ``<layer>:input_amax``: max |x| per input channel of its calibration inputs (float32); a single
  value where only the per-tensor amax is known (ModelOpt's max calibration);
* ``<layer>:pre_quant_scale:<format>``: per AWQ format, the pre-quantization scale ``p`` (float32;
  the weight is smoothed to ``W / p``) and ``<layer>:alpha:<format>``, the grid point it came from.
In JSON, the fused-layer rules and provenance:
* ``shared_input``: the first layer reading the same input tensor. Runtimes fuse such layers (q/k/v,
  gate/up), and ModelOpt's export makes their scales agree (``autoq.export``);
* ``input_norm``: the normalisation module whose output that input is (AWQ pre-scales of a fused
  group are folded into its weight), with whether it computes with ``1 + weight`` (Gemma);
* ``source``: the model fingerprint, dtype and calibration data the statistics come from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from autoq.errors import AutoqError, atomic_write
from autoq.formats import FORMATS

STATE_TENSORS = "calibration.safetensors"
STATE_JSON = "calibration.json"
STATE_VERSION = 1
# ModelOpt's ``is_layernorm`` and ``_layernorm_uses_weight_plus_one`` (modelopt.torch.export).
_NORM_CLASS_MARKS = ("LayerNorm", "RMSNorm")
_PLUS_ONE_NORMS = ("LayerNorm1P", "GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer ModelOpt's export may fold AWQ pre-scales into."""
    return any(mark in type(module).__name__ for mark in _NORM_CLASS_MARKS)


def norm_uses_weight_plus_one(module: nn.Module) -> bool:
    return any(name in type(module).__name__ for name in _PLUS_ONE_NORMS) or bool(getattr(module, "zero_centered_gamma", False))


@dataclass
class LayerCalibration:
    """What calibration learned about one layer's input."""

    input_amax: torch.Tensor | None  # float32 [in_features] (or [1]); None: never needed (INT4_AWQ alone)
    shared_input: str  # first layer reading the same input tensor (itself if none)
    input_norm: str | None = None  # the norm module whose output the input is
    pre_quant_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # per AWQ format, float32
    alpha: dict[str, float] = field(default_factory=dict)  # per AWQ format


@dataclass
class CalibrationState:
    layers: dict[str, LayerCalibration]
    norms: dict[str, bool] = field(default_factory=dict)  # norm module -> computes with (1 + weight)
    source: dict[str, Any] = field(default_factory=dict)  # model fingerprint, dtype, data

    @classmethod
    def from_stats(cls, stats: dict, input_norms: dict[str, str | None], norms: dict[str, bool], source: dict) -> CalibrationState:
        """From the sensitivity engine's ``LayerStats`` (per layer) and the norms feeding the layers."""
        layers = {}
        for name, s in stats.items():
            alpha = {fmt: float(a) for fmt, a in s.alpha.items()}
            layers[name] = LayerCalibration(
                input_amax=s.channel_amax.detach().float().cpu(), shared_input=s.shared_input or name,
                input_norm=input_norms.get(name), pre_quant_scale={f: p.detach().float().cpu() for f, p in s.pre_quant_scale.items()},
                alpha=alpha,
            )  # fmt: skip
        return cls(layers, {n: norms[n] for n in {i for i in input_norms.values() if i}}, dict(source))

    def missing(self, formats: dict[str, str]) -> dict[str, str]:
        """The planned layers (name -> planned format) whose statistics are not all here: which input
        it reads (every layer, BF16 too: fused layers must agree), input amax for a quantized
        activation, the AWQ pre-scale for an AWQ format."""
        needed = {}
        for name, fmt_name in formats.items():
            fmt = FORMATS[fmt_name]
            layer = self.layers.get(name)
            if layer is None or (fmt.activation is not None and layer.input_amax is None) or (
                fmt.awq and fmt_name not in layer.pre_quant_scale
            ):
                needed[name] = fmt_name
        return needed

    def merged(self, other: CalibrationState) -> CalibrationState:
        """This state with ``other``'s layers added (``other`` wins where both have a statistic);
        layers that either state says read one input stay in one group."""
        layers = {name: LayerCalibration(**vars(layer)) for name, layer in self.layers.items()}
        for name, layer in other.layers.items():
            mine = layers.get(name)
            if mine is None:
                layers[name] = LayerCalibration(**vars(layer))
                continue
            mine.input_amax = layer.input_amax if layer.input_amax is not None else mine.input_amax
            mine.input_norm = layer.input_norm or mine.input_norm
            mine.pre_quant_scale = {**mine.pre_quant_scale, **layer.pre_quant_scale}
            mine.alpha = {**mine.alpha, **layer.alpha}
        groups = _union(
            list(layers), [(n, l.shared_input) for n, l in self.layers.items()] + [(n, l.shared_input) for n, l in other.layers.items()]
        )
        for name, layer in layers.items():
            layer.shared_input = groups[name]
        return CalibrationState(layers, {**self.norms, **other.norms}, {**other.source, **self.source})

    def fused_groups(self, names: list[str]) -> list[list[str]]:
        """``names`` grouped by the input they read, each group in the order of ``names``."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(self.layers[name].shared_input, []).append(name)
        return list(groups.values())

    # ----------------------------------------------------------------- files
    def save(self, directory: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"version": STATE_VERSION, "source": self.source, "norms": self.norms, "layers": {}}
        for name, layer in self.layers.items():
            if layer.input_amax is not None:
                tensors[f"{name}:input_amax"] = layer.input_amax
            for fmt, scale in layer.pre_quant_scale.items():
                tensors[f"{name}:pre_quant_scale:{fmt}"] = scale
                if fmt in layer.alpha:
                    tensors[f"{name}:alpha:{fmt}"] = torch.tensor([layer.alpha[fmt]], dtype=torch.float32)
            meta["layers"][name] = {"shared_input": layer.shared_input, "input_norm": layer.input_norm}
        cpu = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        directory = Path(directory)
        atomic_write(directory / STATE_TENSORS, lambda p: save_file(cpu, str(p)))
        atomic_write(directory / STATE_JSON, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / STATE_TENSORS).is_file() and (Path(directory) / STATE_JSON).is_file()

    @classmethod
    def load(cls, directory: Path) -> CalibrationState:
        directory = Path(directory)
        try:
            meta = json.loads((directory / STATE_JSON).read_text())
            tensors = load_file(str(directory / STATE_TENSORS))
        except (OSError, ValueError) as err:
            raise AutoqError(f"cannot read the calibration state in {directory} ({type(err).__name__}: {err})") from None
        if meta.get("version") != STATE_VERSION:
            raise AutoqError(f"{directory / STATE_JSON}: calibration state version {meta.get('version')!r}, this autoq reads {STATE_VERSION}")
        layers = {}
        for name, info in meta["layers"].items():
            scales = {k.rpartition(":")[2]: v for k, v in tensors.items() if k.startswith(f"{name}:pre_quant_scale:")}
            alphas = {k.rpartition(":")[2]: v.item() for k, v in tensors.items() if k.startswith(f"{name}:alpha:")}
            layers[name] = LayerCalibration(tensors.get(f"{name}:input_amax"), info["shared_input"], info.get("input_norm"), scales, alphas)
        return cls(layers, meta.get("norms", {}), meta.get("source", {}))


def _union(names: list[str], links: list[tuple[str, str]]) -> dict[str, str]:
    """Each name's group representative (the group's first name in ``names`` order) under ``links``."""
    parent = {name: name for name in names}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb, key=_order(names))] = min(ra, rb, key=_order(names))
    return {name: root(name) for name in names}


def _order(names: list[str]):
    index = {name: i for i, name in enumerate(names)}
    return lambda name: index.get(name, len(index))
