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

from autoq.devices import note_slow_cpu_bf16
from autoq.errors import AutoqError, first_line

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
    trust_remote_code: bool = False  # run the model's own Python code (only with --trust-remote-code)

    @classmethod
    def from_directory(cls, path: Path, name: str, synthetic: bool = False, trust_remote_code: bool = False) -> ModelSource:
        """A local HF directory; one converted from a GGUF says so (its ``autoq_gguf.json``)."""
        from autoq.gguf import read_marker

        marker = read_marker(path) or {}
        return cls(path=Path(path), name=name, synthetic=synthetic, weights_from=marker.get("weights_from"), caveat=marker.get("caveat"),
                   trust_remote_code=trust_remote_code)  # fmt: skip

    def local_paths(self) -> list[Path]:
        """Where the model lies on disk: its directory, and the path the user gave when it is local
        (a .gguf file, or the directory holding it). Outputs must stay apart from all of them."""
        given = Path(self.name).expanduser()
        return [self.path] + ([given] if given.exists() and given.resolve() != Path(self.path).resolve() else [])

    def fingerprint(self) -> str:
        return directory_fingerprint(self.path)


def resolve_model(spec: str | None, trust_remote_code: bool = False) -> ModelSource:
    """Turn a user's ``--model`` into a local HF directory.

    None: the default model (``autoq.default_model``); ``synthetic``: autoq's random Llama; a
    ``.gguf`` file or a directory holding one: its cached bf16 conversion (``autoq.gguf``); a
    HuggingFace model directory; else a hub id. A model's own code (``auto_map``) runs only with
    ``trust_remote_code``.
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
        return ModelSource.from_directory(path.resolve(), spec, trust_remote_code=trust_remote_code)
    try:  # a hub id: users have the hub; fetch (or reuse the local hub cache) once, then work locally
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"] + (["*.py"] if trust_remote_code else [])
        local = snapshot_download(spec, allow_patterns=patterns)
    except Exception as err:  # noqa: BLE001 - any hub failure is the user's model name or network
        raise AutoqError(f"could not find model '{spec}' locally or on the HuggingFace hub ({type(err).__name__})") from None
    return ModelSource(path=Path(local), name=spec, trust_remote_code=trust_remote_code)


def check_causal_lm(path: Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Read config.json and fail clearly unless it describes a causal LM transformers can build,
    from safetensors weights whose headers are sound and hold as many values as the config implies."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_config(path / "config.json")
    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    own_code = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (own_code and trust_remote_code):
        if own_code and not trust_remote_code:
            raise AutoqError(f"model at {path} ships its own code ({own_code!s:.80}); autoq runs a model's code only with --trust-remote-code")
        if not own_code:
            architectures = config.get("architectures")
            arch = ", ".join(map(str, architectures)) if isinstance(architectures, list) and architectures else "unknown architecture"
            raise AutoqError(f"model at {path} is a {model_type!r:.60} model ({arch:.80}), not a causal LM")
    if not any(path.glob("*.safetensors")):
        raise AutoqError(f"model at {path} has no .safetensors weights (autoq never unpickles .bin files)")
    check_config_sizes(config, path / "config.json", safetensors_values(path))
    return config


def checkpoint_dtype(source: ModelSource) -> str | None:
    """The floating-point dtype the source checkpoint stores (config.json's ``torch_dtype`` or
    ``dtype``), when autoq knows it: what an export writes its unquantized tensors in."""
    config = read_config(Path(source.path) / "config.json")
    stored = config.get("torch_dtype") or config.get("dtype")
    return stored if stored in DTYPES else None


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a mapping; anything else (unreadable, not JSON, absurd nesting) is one error."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise AutoqError(f"cannot read {path} ({type(err).__name__})") from None
    except json.JSONDecodeError as err:
        raise AutoqError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        raise AutoqError(f"{path} is not usable JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise AutoqError(f"{path} is not a JSON object")
    return config


# Sizes a config may state, each a positive integer; transformers builds the model from them.
_SIZE_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions", "d_model", "num_layers",
    "num_experts", "num_local_experts", "moe_intermediate_size", "num_experts_per_tok",
)  # fmt: skip
_MAX_SIZE = 2**31  # beyond any real model's dimension (and torch's 32-bit index arithmetic)


def check_config_sizes(config: dict[str, Any], where: Path, values_on_disk: int) -> None:
    """Fail fast, before transformers builds (or allocates) anything, on sizes that are not positive
    integers, or that imply far more parameters than the weight files hold.

    The lower bound counts only the embedding and one hidden x hidden matrix per layer, which every
    decoder has; packed 4-bit weights store about half a value per parameter, hence the margin.
    """
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for section in sections:
        for key in _SIZE_KEYS:
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_SIZE:
                raise AutoqError(f"{where}: {key} must be a positive integer up to {_MAX_SIZE} (got {value!r:.40})")
        hidden = next((section[k] for k in ("hidden_size", "n_embd", "d_model") if k in section), 0)
        layers = next((section[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in section), 0)
        lower = section.get("vocab_size", 0) * hidden + layers * hidden * hidden
        if lower > 4 * values_on_disk:
            raise AutoqError(f"{where} describes a model of at least {lower:.3g} parameters, but its safetensors files hold "
                             f"{values_on_disk:.3g} values: the config does not match the weights")  # fmt: skip


def safetensors_values(path: Path) -> int:
    """How many values the safetensors files in ``path`` hold, from their headers (which the
    safetensors library checks against the file: offsets inside it, sizes matching shapes)."""
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shape = handle.get_slice(name).get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    total += count
        except (SafetensorError, OSError) as err:
            raise AutoqError(f"{file} is not a valid safetensors file ({first_line(err)})") from None
    return total


def load_model(source: ModelSource, dtype: str = "bfloat16", device: str | torch.device = "cpu") -> nn.Module:
    """Load a causal LM in eval mode with all parameters frozen."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(source.path, source.trust_remote_code)
    if dtype not in DTYPES:
        raise AutoqError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], use_safetensors=True,
                                                     trust_remote_code=source.trust_remote_code)  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:  # weights that do not fit the config, and the like
        raise AutoqError(f"cannot load the model at {source.path}: {first_line(err)}") from None
    for name, parameter in model.named_parameters():  # NaN/Inf weights would give NaN scores and a meaningless plan
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise AutoqError(f"model at {source.path}: weight {name} has NaN or infinite values")
    model.to(device).eval()
    model.requires_grad_(False)
    if dtype == "bfloat16" and torch.device(device).type == "cpu":
        note_slow_cpu_bf16()
    if model.config.architectures is None:  # ModelOpt's exporter reads it
        model.config.architectures = [type(model).__name__]
    return model


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
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
