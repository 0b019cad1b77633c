"""Which device autoq computes on: CUDA when there is one, else the CPU; user choices checked first."""

from __future__ import annotations

import torch

from autoq.errors import AutoqError


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
