"""User-facing errors and all-or-nothing outputs (files and directories)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
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


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(path: Path) -> None:
    """Delete the temporary siblings of ``path`` that a killed run left (named ``.<name>.<pid>.*.partial``,
    their process gone), saying so: a run that was killed leaves no output, only these."""
    for tmp in Path(path).parent.glob(f".{glob.escape(Path(path).name)}.*.partial"):
        pid = tmp.name[len(Path(path).name) + 2 :].split(".", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        log(f"removed {tmp}, the partial output of an interrupted run (process {pid} is gone)")


@contextlib.contextmanager
def _staged(paths: list[Path], directory: bool) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths`` that replace them only if the block succeeds, else vanish.
    Their names carry this process's id, so a later run can tell one a killed run left behind."""
    staged: list[Path] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(path)
            prefix = f".{path.name}.{os.getpid()}."
            if directory:
                staged.append(Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=path.parent)))
            else:
                handle, name = tempfile.mkstemp(prefix=prefix, suffix=".partial", dir=path.parent)
                os.close(handle)
                staged.append(Path(name))
        yield staged
    except BaseException:
        for tmp in staged:
            shutil.rmtree(tmp, ignore_errors=True) if directory else tmp.unlink(missing_ok=True)
        raise
    for tmp, path in zip(staged, paths):
        if directory and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_output_dirs(*dirs_and_overwrite: tuple[Path, bool]) -> Iterator[list[Path]]:
    """Temporary directories that become the given paths together, only if the block succeeds.

    Readers never see a half-written directory: on any exception every temporary directory is
    deleted and the paths are left as they were. The renames happen after all the work.
    """
    paths = [Path(path) for path, _ in dirs_and_overwrite]
    for path, overwrite in zip(paths, (o for _, o in dirs_and_overwrite)):
        check_output_dir(path, overwrite)
    with _staged(paths, directory=True) as staged:
        yield staged


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling directory that becomes ``path`` only if the block succeeds."""
    with atomic_output_dirs((Path(path), overwrite)) as (tmp,):
        yield tmp


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary sibling file, then rename it to ``path`` (no partial file, ever)."""
    with _staged([Path(path)], directory=False) as (tmp,):
        write(tmp)
