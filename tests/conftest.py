"""Shared fixtures: tiny random Llama / Qwen2 checkpoints and an isolated score cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

# As the CLI sets it for itself (autoq.cli._quiet_libraries), before transformers is first imported:
# in-process CLI tests then see on stderr exactly what a user would.
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import pytest

from autoq.default_model import find_shared_model, write_random_model

warnings.filterwarnings("ignore", module="modelopt")

# Small but with every format applicable: in_features are multiples of 128 (INT4 groups).
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own score cache (``$AUTOQ_CACHE``) unless it passes one explicitly."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AUTOQ_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama", seed=0, **TINY)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lm_head shares the embedding's tensor, as in SmolLM2, Llama-3.2-1B and Qwen2.5-0.5B."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama-tied"
    return write_random_model(path, "llama", seed=2, tie_word_embeddings=True, **TINY)


@pytest.fixture(scope="session")
def tiny_llama_odd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Input sizes of 192 (not a multiple of 128): no INT4 format can store the attention and gate/up
    layers, as with SmolLM2-135M's 576."""
    shape = {**TINY, "hidden_size": 192, "intermediate_size": 384}
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-llama-odd", "llama", seed=3, **shape)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", "qwen2", seed=1, **TINY)


@pytest.fixture(scope="session")
def shared_model() -> Path:
    path = find_shared_model()
    if path is None:
        pytest.skip("no real model under ../shared/models (see ../shared/README.md); synthetic models cover the rest")
    return path
