"""Loading causal LMs, fingerprinting them, and seeing them as embed -> decoder blocks -> head.

The sensitivity engine runs a model one decoder block at a time (so it can recompute a block's
forward during the backward pass, or stream blocks through a GPU).  ``DecoderStructure`` finds
the blocks and the head of a HuggingFace decoder-only model and checks, on real input, that
running them one by one reproduces the model's own logits.
"""

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


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local HF directory, plus how the user named it."""

    path: Path
    name: str  # as the user gave it (path or hub id), or the default model's name
    synthetic: bool = False  # randomly initialised, built by autoq (never a trained model)

    def fingerprint(self) -> str:
        return directory_fingerprint(self.path)


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's ``--model`` (local directory or hub id) into a local directory."""
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or path.exists() or os.sep + os.sep in spec
    if looks_local:
        if not path.exists():
            raise AutoqError(f"model path {spec} does not exist")
        if not (path / "config.json").is_file():
            raise AutoqError(f"model path {spec} has no config.json (expected a HuggingFace model directory)")
        return ModelSource(path=path.resolve(), name=spec)
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


class _LayerInputs(Exception):
    """Raised from a hook to stop a forward pass once the first decoder block's inputs are known."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict[str, Any]):
        super().__init__()
        self.hidden, self.kwargs = hidden, kwargs


class DecoderStructure:
    """A decoder-only LM seen as: embedding stage -> list of blocks -> final norm -> lm_head."""

    def __init__(self, model: nn.Module):
        self.model = model
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        names = {module: name for name, module in model.named_modules()}
        # The blocks are the decoder's ModuleList (``layers`` in Llama-likes, ``h`` in GPT-2 ...).
        layers = next((m for m in (decoder.children() if decoder is not None else ()) if isinstance(m, nn.ModuleList)), None)
        if layers is None or len(layers) == 0:
            raise AutoqError(f"{type(model).__name__}: cannot find its list of decoder blocks")
        self.layers: nn.ModuleList = layers
        self.layer_prefix = names[layers]
        self.final_norm: nn.Module | None = next(
            (getattr(decoder, a) for a in ("norm", "final_layernorm", "ln_f") if isinstance(getattr(decoder, a, None), nn.Module)),
            None,
        )
        self.lm_head: nn.Module = model.get_output_embeddings()
        if self.lm_head is None:
            raise AutoqError(f"{type(model).__name__}: has no output embedding (lm_head)")
        self.lm_head_name = names[self.lm_head]

    def block_index(self, linear_name: str) -> int | None:
        """Index of the decoder block holding ``linear_name``; None for the head."""
        if linear_name == self.lm_head_name:
            return None
        prefix = self.layer_prefix + "."
        if not linear_name.startswith(prefix):
            raise AutoqError(f"layer {linear_name} is neither inside a decoder block nor the lm_head")
        return int(linear_name[len(prefix) :].split(".", 1)[0])

    def capture_layer_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the embedding stage: the first block's hidden-state input and keyword arguments."""

        def stop(_module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            raise _LayerInputs(hidden, dict(kwargs))

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            with torch.no_grad():
                self.model(input_ids=input_ids, use_cache=False)
        except _LayerInputs as captured:
            return captured.hidden, captured.kwargs
        finally:
            handle.remove()
        raise AutoqError(f"{type(self.model).__name__}: forward never reached the first decoder block")

    @staticmethod
    def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def head_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden) if self.final_norm is not None else hidden

    def check_reproduces_logits(self, input_ids: torch.Tensor) -> None:
        """Fail clearly on architectures whose head is more than ``lm_head(norm(h))``."""
        with torch.no_grad():
            reference = self.model(input_ids=input_ids, use_cache=False).logits.float()
            hidden, kwargs = self.capture_layer_inputs(input_ids)
            for block in self.layers:
                hidden = self.run_block(block, hidden, kwargs)
            logits = self.lm_head(self.head_input(hidden)).float()
        error = (logits - reference).abs().max().item()
        scale = reference.abs().max().item() or 1.0
        if error > 1e-2 * scale:
            raise AutoqError(
                f"{type(self.model).__name__}: running its decoder blocks one by one does not reproduce its logits "
                f"(max difference {error:.3g}); this architecture is not supported by block-wise scoring"
            )


def shared_input_readers(model: nn.Module, layer_names: list[str], input_ids: torch.Tensor) -> dict[str, str]:
    """For each named linear, the first of them (in forward order) that reads the same input tensor.

    Runtimes fuse linears that read one tensor (q/k/v into qkv_proj, gate/up into gate_up_proj),
    so those must share a format. One forward pass on ``input_ids`` finds them.
    """
    modules = dict(model.named_modules())
    # id(tensor) -> (tensor, first reader); holding the tensor keeps its id from being reused.
    first_reader: dict[int, tuple[torch.Tensor, str]] = {}
    readers: dict[str, str] = {}

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in readers:
                readers[name] = first_reader.setdefault(id(args[0]), (args[0], name))[1]

        return hook

    handles = [modules[name].register_forward_pre_hook(make_hook(name)) for name in layer_names]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: readers.get(name, name) for name in layer_names}
