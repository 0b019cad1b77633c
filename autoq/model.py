"""Loading causal LMs and fingerprinting them (``autoq.decoder`` sees them as blocks and a head)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoq.errors import AutoqError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


SYNTHETIC_SPEC = "synthetic"  # --model synthetic: autoq's random Llama, for fast tests


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local HF directory, plus how the user named it."""

    path: Path
    name: str  # as the user gave it (path or hub id), or the default model's name
    synthetic: bool = False  # randomly initialised, built by autoq (never a trained model)
    weights_from: str | None = None  # e.g. "dequantized from GGUF x.gguf: linear weights Q4_1 (...)"
    caveat: str | None = None  # what the weights' origin means for the numbers measured on them

    @classmethod
    def from_directory(cls, path: Path, name: str, synthetic: bool = False) -> ModelSource:
        """A local HF directory; one converted from a GGUF says so (its ``autoq_gguf.json``)."""
        from autoq.gguf import read_marker

        marker = read_marker(path) or {}
        return cls(path=Path(path), name=name, synthetic=synthetic, weights_from=marker.get("weights_from"), caveat=marker.get("caveat"))

    def fingerprint(self) -> str:
        return directory_fingerprint(self.path)


def resolve_model(spec: str | None) -> ModelSource:
    """Turn a user's ``--model`` into a local HF directory.

    None: the default model (``autoq.default_model``); ``synthetic``: autoq's random Llama; a
    ``.gguf`` file or a directory holding one: its cached bf16 conversion (``autoq.gguf``); a
    HuggingFace model directory; else a hub id.
    """
    from autoq import default_model as defaults  # it imports this module

    if spec is None:
        return defaults.default_model()
    if spec == SYNTHETIC_SPEC:
        return defaults.synthetic_model()
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists() or os.sep + os.sep in spec or spec.lower().endswith(".gguf")
    if looks_local:
        from autoq import gguf

        if not path.exists():
            raise AutoqError(f"model path {spec} does not exist")
        gguf_file = gguf.find_gguf(path)
        if gguf_file is not None:
            return ModelSource.from_directory(gguf.convert(gguf_file, defaults.cache_root()), spec)
        if not (path / "config.json").is_file():
            raise AutoqError(f"model path {spec} has no config.json (expected a HuggingFace model directory or a .gguf file)")
        return ModelSource.from_directory(path.resolve(), spec)
    try:  # a hub id: users have the hub; fetch (or reuse the local hub cache) once, then work locally
        from huggingface_hub import snapshot_download

        local = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"])
    except Exception as err:  # noqa: BLE001 - any hub failure is the user's model name or network
        raise AutoqError(f"could not find model '{spec}' locally or on the HuggingFace hub ({type(err).__name__})") from None
    return ModelSource(path=Path(local), name=spec)


def check_causal_lm(path: Path) -> dict[str, Any]:
    """Read config.json and fail clearly unless it describes a causal LM transformers can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AutoqError(f"cannot read {path / 'config.json'}: {err}") from None
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        arch = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise AutoqError(f"model at {path} is a '{model_type}' model ({arch}), not a causal LM")
    if not any(path.glob("*.safetensors")):
        raise AutoqError(f"model at {path} has no .safetensors weights (autoq never unpickles .bin files)")
    return config


def load_model(source: ModelSource, dtype: str = "bfloat16", device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM in eval mode with all parameters frozen."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(source.path)
    if dtype not in DTYPES:
        raise AutoqError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], use_safetensors=True)
    model.to(device).eval()
    model.requires_grad_(False)
    if model.config.architectures is None:  # ModelOpt's exporter reads it
        model.config.architectures = [type(model).__name__]
    return model


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as err:
        raise AutoqError(f"cannot load a tokenizer from {source.path}: {err}") from None


def directory_fingerprint(path: Path) -> str:
    """Content fingerprint of a model directory: config.json and the whole of every safetensors file.

    Two checkpoints that differ in any byte (two fine-tunes of one base, say) never share cached
    scores. Each file is read once: its hash is kept in the autoq cache under its path, size,
    modification time and inode, so later runs on unchanged files read nothing
    (``benchmarks/bench_fingerprint.py`` measures both).
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")):
        digest.update(f"{file.name}:{file_sha256(file)};".encode())
    return digest.hexdigest()[:24]


_HASH_CHUNK = 16 << 20


def file_sha256(file: Path) -> str:
    """sha256 of a file's bytes, streamed once, then remembered while the file stays unchanged."""
    from autoq.default_model import cache_root
    from autoq.errors import atomic_write

    stat = file.stat()
    identity = json.dumps([str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino])
    memo = cache_root() / "file-sha256" / hashlib.sha256(identity.encode()).hexdigest()[:32]
    if memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))
    with file.open("rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(buffer[:size])
    try:
        atomic_write(memo, lambda tmp: tmp.write_text(digest.hexdigest() + "\n"))
    except OSError:  # a read-only cache only costs the re-read next time
        pass
    return digest.hexdigest()


def lm_head_is_tied(model: nn.Module) -> bool:
    """Whether the output head reads the input embedding's tensor (``tie_word_embeddings``).

    ModelOpt's export then keeps the BF16 embedding and writes a quantized copy of the head next to
    it: quantizing a tied head adds bits instead of saving them, so autoq never quantizes one.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embedding is not None and head.weight is embedding.weight


TIED_HEAD_REASON = (
    "it shares its weight with the input embedding (tied), and the export would keep the BF16 embedding "
    "and add a quantized copy, adding bits instead of saving them"
)
