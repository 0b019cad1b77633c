"""User-facing errors and all-or-nothing output directories."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


class AutoqError(Exception):
    """A problem with the user's input. The CLI prints it as one line and exits with code 2."""


_quiet = False  # set in the other ranks of a data-parallel run: rank 0 speaks for all (autoq.distributed)


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """One progress or status line on stderr (stdout is for results)."""
    if not _quiet:
        print(f"autoq: {message}", file=sys.stderr, flush=True)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if ``path`` exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise AutoqError(f"output directory {path} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``path`` only if the block succeeds.

    Readers never see a half-written directory: on any exception the temporary directory is
    deleted and ``path`` is left as it was.
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
