"""Calibration sources: bundled corpus, txt, jsonl, saved datasets; disjoint held-out slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoq.data import bundled_corpus, load_tokens
from autoq.errors import AutoqError
from autoq.model import ModelSource, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):
    return load_tokenizer(ModelSource(tiny_llama, "tiny"))


def test_bundled_corpus_is_substantial_english() -> None:
    text = bundled_corpus()
    assert len(text.encode()) > 250_000
    assert text.count(" the ") > 1000


def test_sources_agree_and_held_out_is_disjoint(tokenizer, tmp_path: Path) -> None:
    import datasets

    text = bundled_corpus()[:60_000]
    (tmp_path / "c.txt").write_text(text)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": text}) + "\n")
    datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(tmp_path / "ds"))
    loaded = [load_tokens(str(tmp_path / n), tokenizer, 4, 32) for n in ("c.txt", "c.jsonl", "ds")]
    assert all(torch.equal(loaded[0].tokens, other.tokens) for other in loaded[1:])
    assert loaded[0].tokens.shape == (4, 32)
    held_out = load_tokens(str(tmp_path / "c.txt"), tokenizer, 2, 32, skip_samples=4)
    stream = torch.cat([loaded[0].tokens.flatten(), held_out.tokens.flatten()])
    assert torch.equal(held_out.tokens.flatten(), stream[128:])
    assert loaded[0].fingerprint != held_out.fingerprint
    # The same tokens cut into other sequences are other calibration data (scores are cached by it).
    reshaped = load_tokens(str(tmp_path / "c.txt"), tokenizer, 8, 16)
    assert torch.equal(reshaped.tokens.flatten(), loaded[0].tokens.flatten())
    assert reshaped.fingerprint != loaded[0].fingerprint


def test_too_little_text_is_a_clear_error(tokenizer, tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(AutoqError, match="tokens; 640 are needed"):
        load_tokens(str(tmp_path / "short.txt"), tokenizer, 10, 64)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(AutoqError, match="no text field"):
        load_tokens(str(tmp_path / "bad.jsonl"), tokenizer, 1, 8)
