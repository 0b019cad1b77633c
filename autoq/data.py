"""Calibration and held-out text, tokenized into fixed-length token batches.

Sources (``--calib``):
* ``default``: the bundled public-domain English corpus (``autoq/data/corpus.txt``),
* a ``.txt`` file, or a ``.jsonl`` file with a ``text`` field per line,
* a directory written by ``datasets.Dataset.save_to_disk``,
* a HuggingFace hub dataset ``NAME[:CONFIG]`` (needs the hub; not available offline).

Texts are joined into one token stream (documents separated by the EOS token). The first
``samples x seq_len`` tokens calibrate and score; the held-out slice used by evaluation starts
right after them, so the two never overlap.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from autoq.errors import AutoqError

TEXT_COLUMNS = ("text", "content", "article", "document")


@cache
def bundled_corpus() -> str:
    return resources.files("autoq").joinpath("data/corpus.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class TokenData:
    """``tokens``: int64 ``[samples, seq_len]``; ``source``: how the user named the data."""

    tokens: torch.Tensor
    source: str

    @property
    def fingerprint(self) -> str:
        # The shape too: 4 x 512 and 8 x 256 tokens of one stream are the same bytes, not the same data.
        shape = "x".join(map(str, self.tokens.shape)).encode()
        return hashlib.sha256(shape + b":" + self.tokens.numpy().tobytes()).hexdigest()[:24]

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.tokens.split(batch_size))

    def describe(self) -> dict:
        samples, seq_len = self.tokens.shape
        return {"source": self.source, "samples": samples, "seq_len": seq_len, "fingerprint": self.fingerprint}


def iter_texts(source: str) -> Iterator[str]:
    """Yield documents from a calibration source (see module docstring)."""
    if source == "default":
        yield bundled_corpus()
        return
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.is_file() and path.suffix == ".jsonl":
        yield from _jsonl_texts(path)
    elif path.is_dir():
        yield from _dataset_texts(_load_from_disk(path), str(path))
    elif path.exists() or source.startswith((".", "/", "~")):
        raise AutoqError(f"calibration data {source}: expected a .txt, a .jsonl or a saved datasets directory")
    else:
        yield from _dataset_texts(_load_hub_dataset(source), source)


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise AutoqError(f"{path}:{number}: not valid JSON") from None
            text = next((record[c] for c in TEXT_COLUMNS if isinstance(record, dict) and c in record), None)
            if not isinstance(text, str):
                raise AutoqError(f"{path}:{number}: no text field (expected one of {', '.join(TEXT_COLUMNS)})")
            yield text


def _load_from_disk(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise AutoqError(f"calibration data {path}: not a saved datasets directory ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    return loaded


def _load_hub_dataset(spec: str):
    import datasets

    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as err:  # noqa: BLE001 - the hub raises many types; all mean "cannot get it"
        raise AutoqError(f"could not load dataset '{spec}' from the HuggingFace hub ({type(err).__name__})") from None


def _dataset_texts(dataset, name: str) -> Iterator[str]:
    columns = dataset.column_names or []
    column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None:
        raise AutoqError(f"dataset {name} has no text column (columns: {', '.join(columns)})")
    for row in dataset:
        if row[column]:
            yield row[column]


def load_tokens(
    source: str, tokenizer, samples: int, seq_len: int, skip_samples: int = 0, purpose: str = "calibration"
) -> TokenData:
    """``samples`` rows of ``seq_len`` tokens, after skipping the first ``skip_samples`` rows."""
    if samples < 1 or seq_len < 2:
        raise AutoqError(f"{purpose} needs at least 1 sample of at least 2 tokens")
    needed = (skip_samples + samples) * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in iter_texts(source):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.extend(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise AutoqError(
            f"{purpose} data '{source}' has {len(stream)} tokens; {needed} are needed "
            f"({skip_samples} + {samples} samples x {seq_len} tokens): use fewer samples or a shorter --seq-len"
        )
    window = torch.tensor(stream[skip_samples * seq_len : needed], dtype=torch.long)
    return TokenData(tokens=window.view(samples, seq_len), source=source)
