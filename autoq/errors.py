"""User-facing errors and all-or-nothing outputs (files and directories).

Outputs are written into a temporary sibling ``.NAME.XXXXXXXX.partial`` and renamed into place when
complete, so no reader ever sees half an output. The process writing a temporary holds an
exclusive ``flock`` on it: a temporary nobody holds was left by a killed run, and the next run that
writes the same output removes it and says so, while another run's work in progress is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
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


def first_line(err: BaseException) -> str:
    """An error's message cut to one line (of at most 200 characters), for one-line reports."""
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:200]


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def disk_full(err: BaseException) -> str | None:
    """Why ``err``, or an error it was raised from, is a full disk, quota or file-size limit; else None.

    Libraries wrap the OS error (safetensors' Rust errors, pyarrow, SQLite), so their messages are
    matched too.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL:
            return os.strerror(current.errno)
        text = str(current)
        for code in _DISK_FULL:
            if os.strerror(code) in text:
                return os.strerror(code)
        if "database or disk is full" in text:
            return "database or disk is full"
        current = current.__cause__ or current.__context__
    return None


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if ``path`` cannot become a fresh output directory."""
    path = Path(path)
    if path.is_symlink():
        raise AutoqError(f"output directory {path} is a symbolic link; autoq replaces an output directory whole, "
                         "never through a link: give the directory's real path")  # fmt: skip
    if path.exists() and not overwrite:
        raise AutoqError(f"output directory {path} already exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_dir():
        raise AutoqError(f"output {path} exists and is not a directory")
    check_writable_parent(path)


def check_writable_parent(path: Path) -> None:
    """``path``'s parent can be created and written (probed with a temporary directory: permission
    bits alone do not tell, e.g. for root on a read-only file system)."""
    ancestor = Path(path).absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise AutoqError(f"cannot create {path}: {ancestor} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".autoq-probe-", dir=ancestor))
    except OSError as err:
        raise AutoqError(f"cannot create {path}: {ancestor} is not writable ({err.strerror})") from None


def check_apart(outputs: list[Path | None], sources: list[Path]) -> None:
    """No output is, contains or lies inside an input (a model directory or file): replacing an
    output must never delete or change what it was made from."""
    for output in outputs:
        if output is None:
            continue
        out = Path(output).expanduser().resolve()
        for source in sources:
            src = Path(source).expanduser().resolve()
            relation = "is" if out == src else "is inside" if src in out.parents else "contains" if out in src.parents else None
            if relation:
                raise AutoqError(f"output {output} {relation} the input model {source}; write outputs elsewhere "
                                 "(an export never replaces, or nests in, its source)")  # fmt: skip


@contextlib.contextmanager
def file_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; log ``waiting`` when
    another process holds it, then wait. The kernel drops the lock when its holder dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_SUFFIX = ".partial"
_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile's random part


def _temporaries(path: Path) -> list[Path]:
    prefix = f".{path.name}."
    found = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            name = entry.name
            if name.startswith(prefix) and name.endswith(_SUFFIX) and _RANDOM.fullmatch(name[len(prefix) : -len(_SUFFIX)]):
                found.append(entry)
    return found


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` that no live process holds (left by a killed run), with
    one log line; returns them."""
    removed = []
    for entry in _temporaries(Path(path)):
        try:
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # another run is writing it
        try:  # held while removing: a writer that opened it meanwhile sees it gone and starts another
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    if removed:
        log(f"removed {len(removed)} stale temporary output(s) of an interrupted run: {', '.join(str(p) for p in removed)}")
    return removed


def _new_temporary(path: Path, directory: bool) -> tuple[Path, int]:
    """A fresh temporary sibling of ``path`` and the descriptor holding its lock."""
    while True:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent))
            fd = os.open(tmp, os.O_RDONLY)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent)
            tmp = Path(name)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a remove_stale that got here first to finish
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def _replace(tmp: Path, path: Path, directory: bool) -> None:
    if directory and path.exists():
        # The old directory is renamed aside first: a crash during its deletion must not leave a
        # half-deleted directory at ``path`` (the aside copy is an unlocked temporary: removed later).
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_SUFFIX, dir=path.parent))
        os.replace(path, aside)
        os.replace(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def _staged(paths: list[Path], directory: bool) -> Iterator[list[Path]]:
    """Temporary siblings of ``paths`` that replace them only if the block succeeds, else vanish."""
    staged: list[tuple[Path, int]] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path)
            staged.append(_new_temporary(path, directory))
        yield [tmp for tmp, _ in staged]
        for (tmp, _), path in zip(staged, paths):
            _replace(tmp, path, directory)
    except BaseException:
        for tmp, _ in staged:
            _discard(tmp)
        raise
    finally:
        for _, fd in staged:
            os.close(fd)


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
