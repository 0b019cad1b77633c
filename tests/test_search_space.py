"""Search-space YAML: validation, name/class matching, pins."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoq.decoder import DecoderStructure
from autoq.errors import AutoqError
from autoq.model import ModelSource, load_model
from autoq.search_space import builtin_spaces, load_search_space, parse_search_space, select_layers


def test_builtin_spaces_load() -> None:
    assert {"default", "fp8_w4a8", "all"} <= set(builtin_spaces())
    assert load_search_space("default").formats == ("NVFP4", "FP8", "W4A8", "BF16")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("formats: [FP8, FP6]", "unknown format 'FP6'"),
        ("formats: []", "'formats' must not be empty"),
        ("include: ['*']", "'formats' is required"),
        ("formats: [FP8]\nsurprise: 1", "unknown keys ['surprise']"),
        ("formats: [FP8]\npin: {'*down*': INT3}", "unknown format 'INT3'"),
        ("formats: [FP8]\ngroups: {rules: ['(unclosed']}", "bad group rule"),
        ("- just\n- a list", "expected a mapping"),
        ("formats: [FP8\n", "invalid YAML"),
    ],
)
def test_bad_spaces_give_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(AutoqError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        parse_search_space(text, "x.yaml")


def test_patterns_match_names_then_classes_and_pins_win(tiny_llama: Path) -> None:
    model = load_model(ModelSource(tiny_llama, "tiny"))
    space = parse_search_space(
        "formats: [NVFP4, FP8, BF16]\ninclude: ['*.layers.0.*', 'Linear']\nskip: ['*o_proj']\n"
        "pin: {'*.down_proj': FP8, '*down*': NVFP4}\nsearch_lm_head: true\n",
        "x",
    )
    choices = {c.name: c for c in select_layers(model, space, DecoderStructure(model).lm_head_name)}
    # 'Linear' (a class name) includes every linear layer, lm_head too; skips beat includes.
    assert "model.layers.1.mlp.up_proj" in choices and "lm_head" in choices
    assert not any(name.endswith("o_proj") for name in choices)
    assert choices["model.layers.1.mlp.down_proj"].candidates == ("FP8",)  # first matching pin
    assert choices["model.layers.0.self_attn.q_proj"].candidates == ("NVFP4", "FP8", "BF16")
    without_head = select_layers(model, parse_search_space("formats: [FP8]", "x"), "lm_head")
    assert "lm_head" not in {c.name for c in without_head}
