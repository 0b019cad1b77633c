"""Which device autoq computes on: CUDA when there is one, else the CPU; user choices checked first."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from autoq.errors import AutoqError, log


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(requested: str | None) -> str:
    """``--device`` (None: the default), checked before any work: a device this machine lacks is one
    clear error, never a fallback or a late crash."""
    if requested is None:
        return default_device()
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise AutoqError(f"--device {requested!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutoqError(f"--device {requested}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AutoqError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise AutoqError(f"--device {requested}: autoq runs on cpu or cuda")
    return requested


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 / AMX-BF16, Arm BF16), from Linux's
    /proc/cpuinfo flags; True where they cannot be read (no note is better than a wrong one)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", flags) is not None


@functools.cache
def note_slow_cpu_bf16() -> None:
    """Said once per process: without native bf16, PyTorch's CPU bf16 products run several times
    slower than float32 (5.6x measured on an AVX2 EPYC, README "CPU defaults")."""
    if not cpu_has_native_bf16():
        log("note: this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 runs several times slower here than "
            "--dtype float32, which computes the same bf16 weights at twice the memory")  # fmt: skip


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Memory free for new tensors on ``device`` now (CUDA: free device memory plus what torch's
    caching allocator holds unused, which it hands out first; CPU: Linux's MemAvailable), or None
    where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None
