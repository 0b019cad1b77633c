"""Search spaces: which layers are searched, over which formats, and which must agree.

A search space is a YAML file (see ``search_spaces/*.yaml`` and the README). Patterns use shell
wildcards (``*``, ``?``) and match a layer's qualified module name or, failing that, its class
name, as in ModelOpt/TAO quantize configs. Skips win over includes; protected blocks
(``protect: {first_blocks: N, last_blocks: M, format: F}``) win over pins; the first matching pin
wins. ``lm_head: {formats: [...]}`` searches the LM head over its own candidate formats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path
from typing import Any

import regex
import torch
import yaml
from torch import nn

from autoq.errors import AutoqError
from autoq.experts import fused_projections
from autoq.formats import FORMATS, get_format

_KEYS = {"name", "description", "formats", "include", "skip", "search_lm_head", "lm_head", "protect", "pin", "groups"}
_GROUP_KEYS = {"shared_input", "rules"}
MAX_SPACE_BYTES = 1 << 20  # search spaces are a few lines of YAML
RULE_SECONDS = 1.0  # the longest one group rule may take on one layer name

_LM_HEAD_KEYS = {"formats"}
_PROTECT_KEYS = {"first_blocks", "last_blocks", "format"}


@dataclass(frozen=True)
class Protect:
    """The first and last decoder blocks pinned to one format (BF16 unless named): not searched,
    but counted in the bits budget like any pinned layer."""

    first_blocks: int = 0
    last_blocks: int = 0
    format: str = "BF16"

    def covers(self, block: int, blocks: int) -> bool:
        return block < self.first_blocks or block >= blocks - self.last_blocks

    def describe(self) -> str:
        return f"first={self.first_blocks},last={self.last_blocks},format={self.format}"

    @classmethod
    def from_mapping(cls, raw: Any, origin: str) -> Protect:
        if not isinstance(raw, dict) or set(raw) - _PROTECT_KEYS:
            raise AutoqError(f"{origin}: 'protect' allows only {sorted(_PROTECT_KEYS)}, e.g. {{first_blocks: 1, last_blocks: 1, format: BF16}}")
        counts = {}
        for key in ("first_blocks", "last_blocks"):
            value = raw.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AutoqError(f"{origin}: protect {key} must be a non-negative integer, got {value!r}")
            counts[key] = value
        fmt = str(raw.get("format", "BF16"))
        get_format(fmt)
        return cls(**counts, format=fmt)

    @classmethod
    def parse(cls, text: str) -> Protect:
        """``--protect first=N,last=M[,format=F]``."""
        names = {"first": "first_blocks", "last": "last_blocks", "format": "format"}
        raw: dict[str, Any] = {}
        for item in (part.strip() for part in text.split(",") if part.strip()):
            key, sep, value = item.partition("=")
            if not sep or key.strip() not in names:
                raise AutoqError(f"--protect expects first=N,last=M[,format=F], got {text!r}")
            key = names[key.strip()]
            if key == "format":
                raw[key] = value.strip()
            else:
                try:
                    raw[key] = int(value)
                except ValueError:
                    raise AutoqError(f"--protect {key.split('_')[0]} must be a non-negative integer, got {value.strip()!r}") from None
        if not raw:
            raise AutoqError("--protect expects first=N,last=M[,format=F], got nothing")
        return cls.from_mapping(raw, "--protect")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    formats: tuple[str, ...]
    include: tuple[str, ...] = ("*",)
    skip: tuple[str, ...] = ()
    search_lm_head: bool = False
    lm_head_formats: tuple[str, ...] | None = None  # the LM head's candidates (None: ``formats``)
    protect: Protect | None = None
    pin: tuple[tuple[str, str], ...] = ()  # (pattern, format), first match wins
    group_by_shared_input: bool = True  # layers reading the same tensor (q/k/v, gate/up) share a format
    group_rules: tuple[str, ...] = ()  # regexes; layers whose first capture group is equal share a format
    description: str = ""
    source_text: str = field(default="", compare=False)
    overrides: str = ""  # command-line settings applied on top of the YAML (``--protect``)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256((self.source_text + self.overrides).encode()).hexdigest()[:16]

    def with_protect(self, protect: Protect) -> SearchSpace:
        """This space with ``--protect`` in place of its own ``protect``."""
        return replace(self, protect=protect, overrides=f"{self.overrides}\n--protect {protect.describe()}")

    def pinned_format(self, name: str, class_name: str) -> str | None:
        return next((fmt for pattern, fmt in self.pin if _matches(pattern, name, class_name)), None)

    def is_selected(self, name: str, class_name: str) -> bool:
        included = any(_matches(p, name, class_name) for p in self.include)
        return included and not any(_matches(p, name, class_name) for p in self.skip)

    def group_rule_key(self, name: str) -> str | None:
        for index, rule in enumerate(self.group_rules):
            try:  # the regex engine, with a time limit: a rule that backtracks catastrophically fails, never hangs
                match = regex.search(rule, name, flags=regex.V0, timeout=RULE_SECONDS)
            except TimeoutError:
                raise AutoqError(f"search space {self.name}: group rule {rule!r} takes over {RULE_SECONDS:g} s on {name} "
                                 "(catastrophic backtracking): simplify it") from None  # fmt: skip
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
    if path.stat().st_size > MAX_SPACE_BYTES:
        raise AutoqError(f"search space {path} has {path.stat().st_size} bytes; a search space has at most {MAX_SPACE_BYTES}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise AutoqError(f"cannot read search space {path} ({type(err).__name__})") from None
    return parse_search_space(text, str(path))


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (no tags that build Python objects), refusing duplicate keys,
    which YAML would otherwise resolve silently to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise AutoqError(f"duplicate key {ascii(key)[:60]} (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_search_space(text: str, origin: str) -> SearchSpace:
    try:
        raw = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader: builds no Python objects
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise AutoqError(f"search space {origin}: invalid YAML{where}") from None
    except AutoqError as err:
        raise AutoqError(f"search space {origin}: {err}") from None
    except RecursionError:
        raise AutoqError(f"search space {origin}: nested too deeply") from None
    if not isinstance(raw, dict):
        raise AutoqError(f"search space {origin}: expected a mapping at the top level")
    unknown = set(raw) - _KEYS
    if unknown:
        raise AutoqError(f"search space {origin}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    formats = tuple(_string_list(raw, "formats", origin, required=True))
    for name in formats:
        get_format(name)
    pins = raw.get("pin") or {}
    if not isinstance(pins, dict) or not all(isinstance(p, str) and isinstance(f, str) for p, f in pins.items()):
        raise AutoqError(f"search space {origin}: 'pin' must map patterns to formats (strings)")
    for fmt in pins.values():
        get_format(fmt)
    lm_head = raw.get("lm_head")
    lm_head_formats = None
    if lm_head is not None:
        if not isinstance(lm_head, dict) or set(lm_head) - _LM_HEAD_KEYS:
            raise AutoqError(f"search space {origin}: 'lm_head' allows only {sorted(_LM_HEAD_KEYS)}, e.g. {{formats: [FP8, BF16]}}")
        lm_head_formats = tuple(_string_list(lm_head, "formats", origin, required=True))
        for name in lm_head_formats:
            get_format(name)
        if raw.get("search_lm_head") is False:
            raise AutoqError(f"search space {origin}: 'lm_head' gives the LM head's formats but 'search_lm_head' is false")
    protect = None if raw.get("protect") is None else Protect.from_mapping(raw["protect"], f"search space {origin}")
    groups = raw.get("groups") or {}
    if not isinstance(groups, dict) or set(groups) - _GROUP_KEYS:
        raise AutoqError(f"search space {origin}: 'groups' allows only {sorted(_GROUP_KEYS)}")
    rules = tuple(_string_list(groups, "rules", origin))
    for rule in rules:
        try:
            regex.compile(rule, flags=regex.V0)
        except (regex.error, OverflowError, RecursionError) as err:
            raise AutoqError(f"search space {origin}: bad group rule {rule!r:.80}: {err}") from None
    for key in ("name", "description"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise AutoqError(f"search space {origin}: '{key}' must be a string")
    return SearchSpace(
        name=raw.get("name") or Path(origin).stem,
        description=raw.get("description") or "",
        formats=formats,
        include=tuple(_string_list(raw, "include", origin) or ["*"]),
        skip=tuple(_string_list(raw, "skip", origin)),
        search_lm_head=_flag(raw, "search_lm_head", False, origin) or lm_head_formats is not None,
        lm_head_formats=lm_head_formats,
        protect=protect,
        pin=tuple(pins.items()),
        group_by_shared_input=_flag(groups, "shared_input", True, origin),
        group_rules=rules,
        source_text=text,
    )


def _flag(raw: dict[str, Any], key: str, default: bool, origin: str) -> bool:
    """A yes/no setting: true or false only ("no" in quotes is a string, and a string is not false)."""
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise AutoqError(f"search space {origin}: '{key}' must be true or false (got {ascii(value)[:40]})")
    return value


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
        """Whether the layer can be stored in ``fmt``. Pre-scaled formats (AWQ, SmoothQuant) are not
        offered for fused experts: ModelOpt 0.47's ``awq_lite`` and ``smoothquant`` do not calibrate them."""
        if self.experts > 1 and FORMATS[fmt].pre_scaled:
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


def planned_layers(model: nn.Module, formats: dict[str, str]) -> tuple[dict[str, LayerChoice], dict[str, nn.Module]]:
    """The model's searchable layers and modules, by name, after checking that every layer a plan
    names exists and is one of them (a linear layer or a fused-experts projection)."""
    layers = {layer.name: layer for layer in all_layers(model)}
    modules = dict(model.named_modules())
    missing = [name for name in formats if name not in layers and name not in modules]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise AutoqError(f"plan names {len(missing)} layer(s) the model does not have: {shown}")
    for name in formats:
        if name not in layers:
            raise AutoqError(f"plan layer {name} is a {type(modules[name]).__name__}, not a linear layer")
    return layers, modules


def select_layers(model: nn.Module, space: SearchSpace, lm_head_name: str, lm_head_tied: bool = False) -> list[LayerChoice]:
    """Every linear layer (and fused-experts projection) the search space selects, with its candidate formats.

    The LM head is selected only when the space asks for it and it is not tied to the embedding
    (``autoq.model.lm_head_is_tied``: quantizing a tied head stores more bits, not fewer); its
    candidates are the space's ``lm_head`` formats where given. Layers of protected blocks, then
    pinned layers, get their one format (and an error, naming the layer, if they cannot store it).
    """
    protected = _protected_layers(model, space)
    choices = []
    for layer in all_layers(model):
        name, class_name = layer.name, layer.class_name
        if name == lm_head_name and (not space.search_lm_head or lm_head_tied):
            continue
        if not space.is_selected(name, class_name):
            continue
        pinned, why = (space.protect.format, "protected") if name in protected else (space.pinned_format(name, class_name), "pinned")
        if pinned is not None:
            if not layer.supports(pinned):
                raise AutoqError(f"{name} ({layer.out_features}x{layer.in_features}) is {why} to {pinned}, which cannot store that shape")
            candidates: tuple[str, ...] = (pinned,)
        else:
            offered = space.lm_head_formats if name == lm_head_name and space.lm_head_formats else space.formats
            candidates = tuple(f for f in offered if layer.supports(f))
        if candidates:
            choices.append(replace(layer, candidates=candidates))
    if not choices:
        raise AutoqError(f"search space '{space.name}' selects no quantizable linear layers in {type(model).__name__}")
    for choice in choices:  # a group rule that cannot finish fails here, before any model work
        space.group_rule_key(choice.name)
    return choices


def _protected_layers(model: nn.Module, space: SearchSpace) -> set[str]:
    """Names of the layers inside the decoder blocks ``space.protect`` pins."""
    if space.protect is None or not (space.protect.first_blocks or space.protect.last_blocks):
        return set()
    from autoq.decoder import DecoderStructure

    structure = DecoderStructure(model)
    blocks = len(structure.layers)
    prefix = structure.layer_prefix + "."
    protected = set()
    for layer in all_layers(model):
        if layer.name.startswith(prefix) and space.protect.covers(int(layer.name[len(prefix) :].split(".", 1)[0]), blocks):
            protected.add(layer.name)
    return protected
