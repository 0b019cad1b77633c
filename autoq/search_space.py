"""Search spaces: which layers are searched, over which formats, and which must agree.

A search space is a YAML file (see ``search_spaces/*.yaml`` and the README). Patterns use shell
wildcards (``*``, ``?``) and match a layer's qualified module name or, failing that, its class
name, as in ModelOpt/TAO quantize configs. Skips win over includes; the first matching pin wins.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from autoq.errors import AutoqError
from autoq.experts import fused_projections
from autoq.formats import FORMATS, get_format

_KEYS = {"name", "description", "formats", "include", "skip", "search_lm_head", "pin", "groups"}
_GROUP_KEYS = {"shared_input", "rules"}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    formats: tuple[str, ...]
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    search_lm_head: bool = False
    pin: tuple[tuple[str, str], ...] = ()  # (pattern, format), first match wins
    group_by_shared_input: bool = True  # layers reading the same tensor (q/k/v, gate/up) share a format
    group_rules: tuple[str, ...] = ()  # regexes; layers whose first capture group is equal share a format
    description: str = ""
    source_text: str = field(default="", compare=False)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()[:16]

    def pinned_format(self, name: str, class_name: str) -> str | None:
        return next((fmt for pattern, fmt in self.pin if _matches(pattern, name, class_name)), None)

    def is_selected(self, name: str, class_name: str) -> bool:
        included = any(_matches(p, name, class_name) for p in self.include)
        return included and not any(_matches(p, name, class_name) for p in self.skip)

    def group_rule_key(self, name: str) -> str | None:
        for index, rule in enumerate(self.group_rules):
            match = re.search(rule, name)
            if match:
                return f"rule{index}:{match.group(1) if match.groups() else match.group(0)}"
        return None


def _matches(pattern: str, name: str, class_name: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(class_name, pattern)


def builtin_spaces() -> dict[str, str]:
    """Names of the search spaces shipped with autoq, mapped to their YAML text."""
    folder = resources.files("autoq.search_spaces")
    return {p.name.removesuffix(".yaml"): p.read_text() for p in folder.iterdir() if p.name.endswith(".yaml")}


def load_search_space(spec: str) -> SearchSpace:
    """Load a built-in search space by name, or a YAML file by path."""
    builtins = builtin_spaces()
    if spec in builtins:
        return parse_search_space(builtins[spec], spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AutoqError(f"search space '{spec}' is neither a file nor a built-in ({', '.join(sorted(builtins))})")
    return parse_search_space(path.read_text(), str(path))


def parse_search_space(text: str, origin: str) -> SearchSpace:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise AutoqError(f"search space {origin}: invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise AutoqError(f"search space {origin}: expected a mapping at the top level")
    unknown = set(raw) - _KEYS
    if unknown:
        raise AutoqError(f"search space {origin}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    formats = tuple(_string_list(raw, "formats", origin, required=True))
    for name in formats:
        get_format(name)
    pins = raw.get("pin") or {}
    if not isinstance(pins, dict):
        raise AutoqError(f"search space {origin}: 'pin' must map patterns to formats")
    for fmt in pins.values():
        get_format(str(fmt))
    groups = raw.get("groups") or {}
    if not isinstance(groups, dict) or set(groups) - _GROUP_KEYS:
        raise AutoqError(f"search space {origin}: 'groups' allows only {sorted(_GROUP_KEYS)}")
    rules = tuple(_string_list(groups, "rules", origin))
    for rule in rules:
        try:
            re.compile(rule)
        except re.error as err:
            raise AutoqError(f"search space {origin}: bad group rule {rule!r}: {err}") from None
    return SearchSpace(
        name=str(raw.get("name", Path(origin).stem)),
        description=str(raw.get("description", "")),
        formats=formats,
        include=tuple(_string_list(raw, "include", origin) or ["*"]),
        skip=tuple(_string_list(raw, "skip", origin)),
        search_lm_head=bool(raw.get("search_lm_head", False)),
        pin=tuple((str(p), str(f)) for p, f in pins.items()),
        group_by_shared_input=bool(groups.get("shared_input", True)),
        group_rules=rules,
        source_text=text,
    )


def _string_list(raw: dict[str, Any], key: str, origin: str, required: bool = False) -> list[str]:
    value = raw.get(key)
    if value is None:
        if required:
            raise AutoqError(f"search space {origin}: '{key}' is required")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AutoqError(f"search space {origin}: '{key}' must be a list of strings")
    if required and not value:
        raise AutoqError(f"search space {origin}: '{key}' must not be empty")
    return value


@dataclass(frozen=True)
class LayerChoice:
    """A linear layer to decide a format for: its candidate formats, or the one it is pinned to.

    Fused MoE experts (``autoq.experts``) are one layer per 3-D projection: ``experts`` matrices
    of ``out_features x in_features``, each exported as ``parts`` linears split along the output.
    """

    name: str
    class_name: str
    out_features: int
    in_features: int
    candidates: tuple[str, ...]
    experts: int = 1
    parts: int = 1

    @property
    def params(self) -> int:
        return self.experts * self.out_features * self.in_features

    def storage_bits(self, fmt: str) -> int:
        """Bits the exported checkpoint spends on this layer in format ``fmt``."""
        return self.experts * self.parts * FORMATS[fmt].storage_bits(self.out_features // self.parts, self.in_features)

    def supports(self, fmt: str) -> bool:
        """Whether the layer can be stored in ``fmt``. AWQ formats are not offered for fused
        experts: ModelOpt 0.47's ``awq_lite`` does not calibrate them."""
        if self.experts > 1 and FORMATS[fmt].awq:
            return False
        return FORMATS[fmt].supports(self.out_features // self.parts, self.in_features)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a module autoq scores as a linear layer, else None.

    Besides ``nn.Linear``: transformers' ``Conv1D`` (GPT-2 and relatives), a linear layer whose
    weight is stored transposed, ``(in, out)``.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    return None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a module ``linear_shape`` accepts, as ``(out_features, in_features)``."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def all_layers(model: nn.Module) -> Iterator[LayerChoice]:
    """Every layer autoq could search (linears, Conv1D, fused-experts projections), all formats as candidates."""
    for name, module in model.named_modules():
        class_name = type(module).__name__
        shape = linear_shape(module)
        if shape is not None:
            yield LayerChoice(name, class_name, *shape, candidates=tuple(FORMATS))
        for attr, parts in (fused_projections(module) or {}).items():
            experts, out_f, in_f = getattr(module, attr).shape
            yield LayerChoice(f"{name}.{attr}", class_name, out_f, in_f, tuple(FORMATS), experts=experts, parts=parts)


def select_layers(model: nn.Module, space: SearchSpace, lm_head_name: str, lm_head_tied: bool = False) -> list[LayerChoice]:
    """Every linear layer (and fused-experts projection) the search space selects, with its candidate formats.

    The LM head is selected only when the space asks for it and it is not tied to the embedding
    (``autoq.model.lm_head_is_tied``: quantizing a tied head stores more bits, not fewer).
    """
    choices = []
    for layer in all_layers(model):
        name, class_name = layer.name, layer.class_name
        if name == lm_head_name and (not space.search_lm_head or lm_head_tied):
            continue
        if not space.is_selected(name, class_name):
            continue
        pinned = space.pinned_format(name, class_name)
        if pinned is not None:
            if not layer.supports(pinned):
                raise AutoqError(f"{name} ({layer.out_features}x{layer.in_features}) is pinned to {pinned}, which cannot store that shape")
            candidates: tuple[str, ...] = (pinned,)
        else:
            candidates = tuple(f for f in space.formats if layer.supports(f))
        if candidates:
            choices.append(replace(layer, candidates=candidates))
    if not choices:
        raise AutoqError(f"search space '{space.name}' selects no quantizable linear layers in {type(model).__name__}")
    return choices
