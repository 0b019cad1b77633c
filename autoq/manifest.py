"""Content hashes of an exported checkpoint: ``autoq_manifest.json``, written last.

It lists every file of the checkpoint with its size and sha256, and for each safetensors file the
sha256 of every tensor's bytes. A checkpoint whose bytes changed after export (a flipped bit on
disk, a truncated copy, an edited file) no longer matches it: ``autoq verify`` names the file, and
for a safetensors file the tensor and its layer, even when the changed value still looks sane (a
flipped low bit of a scale leaves it finite and positive).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "autoq_manifest.json"
SCHEMA = "autoq.manifest"
_CHUNK = 16 << 20


def _file_hashes(path: Path) -> tuple[str, dict[str, str] | None]:
    """sha256 of the file, and for a safetensors file the sha256 of each tensor's bytes, in one pass.

    A safetensors file is an 8-byte little-endian header length, a JSON header naming each
    tensor's ``data_offsets`` (relative to the end of the header), then the data. A header that
    cannot be parsed gives no tensor hashes (the file hash still tells whether it changed).
    """
    file_hash = hashlib.sha256()
    tensors: dict[str, str] | None = None
    with path.open("rb") as handle:
        if path.suffix == ".safetensors":
            prefix = handle.read(8)
            file_hash.update(prefix)
            header_bytes = handle.read(int.from_bytes(prefix, "little")) if len(prefix) == 8 else b""
            file_hash.update(header_bytes)
            spans = _spans(header_bytes)
            if spans is not None:
                tensors = {}
                position = 0
                for start, end, name in spans:
                    if start < position:  # overlapping spans: not a file we wrote; the file hash decides
                        tensors = None
                        break
                    file_hash.update(handle.read(start - position))
                    tensor_hash = hashlib.sha256()
                    for block in _blocks(handle, end - start):
                        tensor_hash.update(block)
                        file_hash.update(block)
                    tensors[name] = tensor_hash.hexdigest()
                    position = end
        while block := handle.read(_CHUNK):
            file_hash.update(block)
    return file_hash.hexdigest(), tensors


def _spans(header_bytes: bytes) -> list[tuple[int, int, str]] | None:
    try:
        header = json.loads(header_bytes)
        spans = [(int(v["data_offsets"][0]), int(v["data_offsets"][1]), k) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return sorted(spans)


def _blocks(handle, size: int):
    while size > 0:
        block = handle.read(min(size, _CHUNK))
        if not block:
            return
        size -= len(block)
        yield block


def build_manifest(directory: Path) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.name != MANIFEST):
        digest, tensors = _file_hashes(path)
        entry: dict[str, Any] = {"bytes": path.stat().st_size, "sha256": digest}
        if tensors is not None:
            entry["tensors"] = tensors
        files[path.relative_to(directory).as_posix()] = entry
    return {"schema": SCHEMA, "version": 1, "files": files}


def write_manifest(directory: Path) -> None:
    """Hash every file of a finished checkpoint into ``directory/autoq_manifest.json`` (call it last)."""
    manifest = build_manifest(directory)
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def manifest_problems(directory: Path) -> list[str] | None:
    """What differs from the checkpoint's manifest (each file, tensor and its layer); None: no manifest."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        recorded = json.loads(path.read_text())["files"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is damaged (not a manifest): the checkpoint's contents cannot be checked"]
    current = build_manifest(directory)["files"]
    problems = [f"{name}: missing (listed in {MANIFEST})" for name in sorted(set(recorded) - set(current))]
    problems += [f"{name}: not in {MANIFEST} (added after export)" for name in sorted(set(current) - set(recorded))]
    for name in sorted(set(recorded) & set(current)):
        was, now = recorded[name], current[name]
        if not isinstance(was, dict) or was.get("sha256") == now["sha256"]:
            continue
        old_tensors, new_tensors = was.get("tensors") or {}, now.get("tensors") or {}
        changed = [t for t in sorted(old_tensors) if t in new_tensors and old_tensors[t] != new_tensors[t]]
        for tensor in changed:
            problems.append(f"{tensor.rpartition('.')[0] or tensor}: tensor {tensor} in {name} differs from the export "
                            f"(sha256 {new_tensors[tensor][:12]}, manifest {str(old_tensors[tensor])[:12]})")  # fmt: skip
        if not changed:
            size = f"{now['bytes']} bytes, manifest {was.get('bytes')}" if now["bytes"] != was.get("bytes") else "same size"
            problems.append(f"{name}: contents differ from the export (sha256 {now['sha256'][:12]}, {size})")
    return problems
