"""GGUF files as models: checked, described, and dequantized once into a cached bf16 HF directory.

Any GGUF whose architecture transformers' GGUF loader supports is a model (``--model x.gguf``, or a
directory holding exactly one ``.gguf``). autoq
1. hashes the file (sha256; remembered by path, size and mtime, so an unchanged file is hashed once),
2. reads its header with the ``gguf`` package: a bad magic or a truncated file is refused, so is an
   architecture transformers cannot load,
3. dequantizes it with transformers (``from_pretrained(dir, gguf_file=...)``) and writes a bf16
   safetensors directory ``<cache>/models/gguf-<sha256[:16]>-v<N>/`` atomically, with
   ``autoq_gguf.json`` saying where the weights came from.
Every later run loads that directory and never opens the GGUF again.

Weights dequantized from a quantized GGUF lie (up to bf16 rounding) on that GGUF's grid, e.g. Q4_1:
4-bit asymmetric in groups of 32. Formats with the same grid reproduce them almost exactly, so
accuracy comparisons on such weights are not those of the original model. ``provenance`` returns
the sentence every plan and report carries.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoq.errors import AutoqError, atomic_output_dir

CONVERSION_VERSION = 1
MARKER = "autoq_gguf.json"
# What each GGML storage type is, as a grid (llama.cpp ggml-quants); types not listed show their name only.
QUANT_TYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "Q4_0": "4-bit symmetric, g32", "Q4_1": "4-bit asymmetric, g32",
    "Q5_0": "5-bit symmetric, g32", "Q5_1": "5-bit asymmetric, g32", "Q8_0": "8-bit symmetric, g32",
    "Q2_K": "2-bit asymmetric k-quant, g16 in super-blocks of 256",
    "Q3_K": "3-bit symmetric k-quant, g16 in super-blocks of 256",
    "Q4_K": "4-bit asymmetric k-quant, g32 in super-blocks of 256",
    "Q5_K": "5-bit asymmetric k-quant, g32 in super-blocks of 256",
    "Q6_K": "6-bit symmetric k-quant, g16 in super-blocks of 256",
}  # fmt: skip
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


@dataclass(frozen=True)
class GGUFHeader:
    """What autoq needs from a GGUF's header: its architecture, storage types and special tokens."""

    architecture: str
    name: str | None
    types: dict[str, dict[str, int]]  # role (linear weights, embeddings, lm_head) -> GGML type -> tensor count
    special_token_ids: dict[str, int]

    @property
    def quantized(self) -> bool:
        return any(t not in FLOAT_TYPES for role in self.types.values() for t in role)


def _role(tensor_name: str, dims: int) -> str | None:
    if tensor_name.startswith("token_embd."):
        return "embeddings"
    if tensor_name.startswith("output."):
        return "lm_head"
    return "linear weights" if dims >= 2 else None  # 1-D tensors: norms and biases


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def open_gguf(path: Path):
    """A ``gguf.GGUFReader``; one clear error for a file that is not a complete GGUF."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as err:
        # GGUFReader fails on a bad magic, and on tensor data cut short (a truncated file).
        raise AutoqError(f"{path} is not a complete GGUF file (truncated or corrupt: {err})") from None


def read_header(path: Path, reader=None) -> GGUFHeader:
    """Check a GGUF header (complete file, supported architecture) and read what autoq needs."""
    size = path.stat().st_size
    reader = reader or open_gguf(path)
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise AutoqError(f"{path} is not a complete GGUF file (tensor data needs {end} bytes, the file has {size})")

    def field(key: str) -> Any:
        value = reader.fields.get(key)
        return None if value is None else value.contents()

    architecture = field("general.architecture")
    supported = supported_architectures()
    if architecture not in supported:
        raise AutoqError(
            f"{path}: GGUF architecture '{architecture}' is not supported by transformers' GGUF loader "
            f"(supported: {', '.join(sorted(supported))})"
        )
    types: dict[str, Counter] = {}
    for tensor in reader.tensors:
        role = _role(tensor.name, len(tensor.shape))
        if role is not None:
            types.setdefault(role, Counter())[tensor.tensor_type.name] += 1
    special = {key: field(f"tokenizer.ggml.{key}") for key in _SPECIAL_TOKENS.values()}
    return GGUFHeader(
        architecture=architecture, name=field("general.name"), types={r: dict(c) for r, c in types.items()},
        special_token_ids={k: int(v) for k, v in special.items() if v is not None},
    )  # fmt: skip


def _describe_types(counts: dict[str, int]) -> str:
    def one(name: str) -> str:
        return f"{name} ({QUANT_TYPES[name]})" if name in QUANT_TYPES else name

    if len(counts) == 1:
        return one(next(iter(counts)))
    return ", ".join(f"{one(name)} x{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def provenance(header: GGUFHeader, file_name: str) -> dict[str, str | None]:
    """``weights_from`` (always) and ``caveat`` (when the GGUF is quantized), for plans and reports."""
    parts = [f"{role} {_describe_types(header.types[role])}" for role in ("linear weights", "embeddings", "lm_head") if role in header.types]
    weights_from = f"dequantized from GGUF {file_name}: " + "; ".join(parts)
    caveat = None
    if header.quantized:
        grids = sorted({t for t in header.types.get("linear weights", {}) if t not in FLOAT_TYPES})
        caveat = (
            f"the weights lie on the GGUF's quantization grid ({', '.join(grids) or 'quantized embeddings'}, up to bf16 "
            "rounding): formats with the same grid reproduce them almost exactly, so accuracy losses measured on them "
            "are not those of the original model"
        )
    return {"weights_from": weights_from, "caveat": caveat}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_dir(cache: Path, sha256: str) -> Path:
    return Path(cache) / "models" / f"gguf-{sha256[:16]}-v{CONVERSION_VERSION}"


def cached_conversion(cache: Path, sha256: str) -> Path | None:
    """The bf16 directory converted from the GGUF with this sha256, if complete (no GGUF read)."""
    target = converted_dir(cache, sha256)
    return target if (target / MARKER).is_file() else None


def read_marker(path: Path) -> dict[str, Any] | None:
    marker = Path(path) / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def _hash_memo(cache: Path, path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    return Path(cache) / "models" / "gguf-hashes" / key


def file_sha256(cache: Path, path: Path) -> str:
    """sha256 of ``path``, remembered by (path, size, mtime) once a conversion succeeded."""
    memo = _hash_memo(cache, path)
    return memo.read_text().strip() if memo.is_file() else sha256_file(path)


def find_gguf(path: Path) -> Path | None:
    """``path`` itself if it is a .gguf file; the one .gguf in a directory without config.json; else None."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if (path / "config.json").is_file():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise AutoqError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); pass one of them as --model")
    return files[0] if files else None


def convert(path: Path, cache: Path, sha256: str | None = None) -> Path:
    """The cached bf16 HF directory for the GGUF at ``path`` (converted now if not yet cached).

    ``sha256``: the file's hash when the caller has already computed (and checked) it.
    """
    path = Path(path).resolve()
    sha256 = sha256 or file_sha256(cache, path)
    cached = cached_conversion(cache, sha256)
    if cached is None:
        cached = _convert(path, sha256, converted_dir(cache, sha256))
    memo = _hash_memo(cache, path)
    if not memo.is_file():
        from autoq.cache import _atomic_write

        _atomic_write(memo, lambda tmp: tmp.write_text(sha256))
    return cached


@contextlib.contextmanager
def _parsed_once(path: Path) -> Iterator[Any]:
    """One parsed reader for the whole conversion.

    transformers parses the GGUF's header for the config, again for the weights and again for the
    tokenizer (about 4 s each for SmolLM2's 49k-token vocabulary on one core), and rebuilds gguf's
    tensor-name map for every module it visits (about 6 s in all). Both are pure functions of
    their arguments, so for the conversion the ``gguf`` module hands out one reader for this file
    and a memoized name map: first use takes about half as long.
    """
    import gguf

    reader = open_gguf(path)
    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = lambda file, *args, **kwargs: reader if Path(file).resolve() == path else make_reader(file, *args, **kwargs)
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield reader
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map


def _convert(path: Path, sha256: str, target: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with _parsed_once(path) as reader:
        header = read_header(path, reader)
        print(f"autoq: converting {path.name} (first use): dequantizing the GGUF to a bf16 model in {target}", file=sys.stderr, flush=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except (ValueError, KeyError, RuntimeError, OSError, TypeError) as err:
            raise AutoqError(f"{path}: transformers cannot load this GGUF as a causal LM ({err})") from None
    bad = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor).all()]
    if bad:
        raise AutoqError(f"{path}: dequantized weights are not finite in {', '.join(bad[:3])} (a corrupt file)")
    # transformers marks the model GGUF-quantized, and save_pretrained refuses such models; the
    # parameters are plain bf16 tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    # transformers' GGUF tokenizer conversion may take the wrong special tokens (SmolLM2: eos
    # becomes <|im_start|>); the header's ids are authoritative.
    for attribute, key in _SPECIAL_TOKENS.items():
        token_id = header.special_token_ids.get(key)
        if token_id is not None and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False
    marker = {
        "gguf": {"file": path.name, "sha256": sha256, "size": path.stat().st_size, "architecture": header.architecture,
                 "name": header.name, "types": header.types},
        **provenance(header, path.name),
        "conversion": {"version": CONVERSION_VERSION, "seconds": round(time.perf_counter() - start, 2), "dtype": "bfloat16"},
    }  # fmt: skip
    with atomic_output_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return target
