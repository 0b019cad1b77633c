"""Shared fixtures: tiny random Llama / Qwen2 checkpoints, tiny GGUF files, an isolated score cache."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

# As the CLI sets it for itself (autoq.cli._quiet_libraries), before transformers is first imported:
# in-process CLI tests then see on stderr exactly what a user would.
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import numpy as np
import pytest

from autoq.default_model import write_random_model

warnings.filterwarnings("ignore", module="modelopt")

# Small but with every format applicable: in_features are multiples of 128 (INT4 groups).
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FIXTURES = Path(__file__).parent / "fixtures"
_REPO = Path(__file__).resolve().parents[1]
# ../shared/data next to the checkout (or next to its parent directory, for a git worktree); may be absent.
SHARED_DATA = next((p.resolve() for p in (_REPO.parent / "shared" / "data", _REPO.parent.parent / "shared" / "data") if p.is_dir()), None)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (longer fault injections; .ci/run passes it)")
    parser.addoption("--fuzz-minutes", type=float, default=0.0,
                     help="run each fuzz test (tests/test_reliability_input.py) this long with fresh random seeds; "
                          "default: a fixed number of cases from a fixed seed")  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with pytest --slow (as .ci/run does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fuzz_minutes(request: pytest.FixtureRequest) -> float:
    return request.config.getoption("--fuzz-minutes")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own score cache (``$AUTOQ_CACHE``) unless it passes one explicitly, and
    never downloads anything (``AUTOQ_OFFLINE``) or picks up the developer's eval data."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AUTOQ_CACHE", str(cache))
    monkeypatch.setenv("AUTOQ_OFFLINE", "1")
    monkeypatch.delenv("AUTOQ_EVAL_DATA", raising=False)
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


def _permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows; transformers' loader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, path: Path, linear: str = "F32", embeddings: str = "F32", architecture: str = "llama") -> Path:
    """A llama GGUF of a HF Llama directory, as llama.cpp's convert_hf_to_gguf lays it out, with the
    given GGML types for 2-D weights and the embedding (1-D tensors stay F32)."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])
    writer.add_token_merges([" ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = _permute_rotary(data, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            data = _permute_rotary(data, config["num_key_value_heads"])
        kind = embeddings if name == "model.embed_tokens.weight" else linear if data.ndim == 2 else "F32"
        target = names.get_name(name, try_suffixes=(".weight",))
        if kind in ("F32", "F16"):
            writer.add_tensor(target, data.astype(np.float32 if kind == "F32" else np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama as an F32 GGUF: converts back to exactly tiny_llama's bf16 weights."""
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


@pytest.fixture(scope="session")
def tiny_q4_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama as SmolLM2's GGUF is stored: Q4_1 linear weights, Q8_0 embedding."""
    return write_gguf(tiny_llama, tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf", linear="Q4_1", embeddings="Q8_0")
