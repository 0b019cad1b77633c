"""The model autoq uses when no ``--model`` is given, and random models for tests.

If ``../shared/models/`` holds a real model (a HF directory with config.json, safetensors and a
tokenizer) the smallest one is used. Otherwise autoq builds a small Llama-architecture model with
random weights and a byte-level BPE tokenizer trained on the bundled corpus, deterministically,
and caches it. Its scores and accuracies are real measurements of a random network, which is why
every output names it SYNTHETIC.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from autoq.errors import atomic_output_dir
from autoq.model import ModelSource

SYNTHETIC_MARKER = "autoq_synthetic.json"
SYNTHETIC_NAME = "autoq-synthetic-llama-v1"
ARCHITECTURES = ("llama", "qwen2")
# Small enough to score on two CPU cores in about a minute; in_features are multiples of 128 so
# that every format (INT4 group 128, NVFP4 block 16) applies to every layer.
DEFAULT_SHAPE = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=2048,
)  # fmt: skip
TOKENIZER_VOCAB = 4096


def shared_models_dir() -> Path | None:
    """``../shared/models`` next to the project (or ``$AUTOQ_SHARED_MODELS``), if it exists."""
    candidates = [os.environ.get("AUTOQ_SHARED_MODELS")]
    candidates += [str(root / ".." / "shared" / "models") for root in (Path.cwd(), Path(__file__).resolve().parents[1])]
    return next((Path(c).resolve() for c in candidates if c and Path(c).is_dir()), None)


def find_shared_model() -> Path | None:
    """The smallest complete HF model directory under the shared models folder, if any."""
    root = shared_models_dir()
    if root is None:
        return None
    complete = [
        d for d in root.iterdir()
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")) and any(d.glob("tokenizer*"))
    ]  # fmt: skip
    return min(complete, key=lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors")), default=None)


def cache_root() -> Path:
    return Path(os.environ.get("AUTOQ_CACHE", Path.home() / ".cache" / "autoq"))


def default_model() -> ModelSource:
    """The real shared model when there is one, else the cached synthetic model (built on first use)."""
    shared = find_shared_model()
    if shared is not None:
        return ModelSource(path=shared, name=shared.name)
    path = cache_root() / "models" / SYNTHETIC_NAME
    if not (path / SYNTHETIC_MARKER).is_file():
        write_random_model(path, "llama", seed=0, overwrite=True)
    return ModelSource(path=path, name=SYNTHETIC_NAME, synthetic=True)


def is_synthetic(path: Path) -> bool:
    return (path / SYNTHETIC_MARKER).is_file()


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE tokenizer trained on the bundled corpus (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from autoq.data import bundled_corpus

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(bundled_corpus().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def write_random_model(
    path: Path, architecture: str = "llama", seed: int = 0, overwrite: bool = False, tie_word_embeddings: bool = False,
    **shape: int,
) -> Path:
    """Write a randomly initialised causal LM (HF layout, safetensors, tokenizer) to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}")
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(
        architecture, vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings, **{**DEFAULT_SHAPE, **shape}
    )
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[architecture]]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_output_dir(Path(path), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SYNTHETIC_MARKER).write_text(json.dumps({"architecture": architecture, "seed": seed, **shape}))
    return Path(path)
