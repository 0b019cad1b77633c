"""Tools for the reliability tests: autoq commands in processes of their own, to kill, limit and race.

Each run is a child process forked from a multiprocessing *forkserver* that imported autoq and its
dependencies once (``_warm``: imports only, no tensor work, so forking is safe), and runs
``autoq.cli.main(argv)``: what ``python -m autoq`` runs, without paying ~10 s of imports per
process on a 2-core CI machine. Its stdout and stderr go to a file; its environment, working
directory and file-size limit (``RLIMIT_FSIZE``) are the caller's choice.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


def _warm() -> None:
    """What the children import: in the server before any fork (and here, where the tests need it too)."""
    import autoq.apply  # noqa: F401
    import autoq.cli  # noqa: F401
    import autoq.pipeline  # noqa: F401
    import autoq.refine  # noqa: F401
    import autoq.sweep  # noqa: F401
    import modelopt.torch.quantization  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401


_warm()


def _child(argv: list[str], env: dict[str, str], cwd: str, log: str, file_size_limit: int | None, start_file: str | None,
           pause: tuple[str, float] | None) -> None:  # fmt: skip
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if file_size_limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    while start_file is not None and not os.path.exists(start_file):  # a start line, for races
        time.sleep(0.001)
    if pause is not None:  # test-only: sleep before each call of "module:function" (or "module:Class.method")
        module_name, _, attribute = pause[0].partition(":")
        owner = importlib.import_module(module_name)
        *classes, function = attribute.split(".")
        for name in classes:
            owner = getattr(owner, name)
        original = getattr(owner, function)

        def paused(*args, **kwargs):
            time.sleep(pause[1])
            return original(*args, **kwargs)

        setattr(owner, function, paused)
    from autoq.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Run:
    """A running (or finished) autoq command."""

    process: multiprocessing.process.BaseProcess
    log: Path
    argv: list[str]

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> bool:
        """SIGKILL; True if the process was still running (so the kill interrupted it)."""
        running = self.process.is_alive()
        if running:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join()
        return running and self.process.exitcode == -signal.SIGKILL

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            raise AssertionError(f"autoq {' '.join(self.argv)} still ran after {timeout} s; output:\n{self.output}")
        return self.process.exitcode

    @property
    def output(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""


def start(argv: list[str], log: Path, cwd: Path | None = None, file_size_limit: int | None = None,
          start_file: Path | None = None, pause: tuple[str, float] | None = None) -> Run:  # fmt: skip
    """``autoq <argv>`` in a child process, with this process's environment (AUTOQ_CACHE included).

    ``file_size_limit``: RLIMIT_FSIZE in bytes; ``start_file``: wait for it to exist before starting;
    ``pause``: ("module:function" or "module:Class.method", seconds) to sleep before every call of it.
    """
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    args = ([str(a) for a in argv], env, str(cwd or Path.cwd()), str(log), file_size_limit, str(start_file) if start_file else None,
            pause)  # fmt: skip
    process = _CONTEXT.Process(target=_child, args=args, daemon=True)
    process.start()
    return Run(process, log, [str(a) for a in argv])


def run(argv: list[str], log: Path, **kwargs) -> tuple[int, str]:
    handle = start(argv, log, **kwargs)
    code = handle.wait()
    return code, handle.output


def wait_for(condition: Callable[[], bool], handle: Run, timeout: float = 120) -> bool:
    """Poll ``condition`` until true (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not handle.alive:
            return condition()
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout} s waiting on autoq {' '.join(handle.argv)}; output:\n{handle.output}")


def partials(directory: Path) -> list[Path]:
    """Temporary outputs (``.NAME.XXXXXXXX.partial``) anywhere under ``directory``."""
    return sorted(p for p in Path(directory).rglob("*.partial"))


def kill_points(seed: int, count: int, most: int, longest: float = 0.3) -> list[tuple[int, float]]:
    """``count`` seeded kill points: (how many more finished units to wait for, up to ``most``;
    then a delay in seconds, up to ``longest``)."""
    rng = random.Random(seed)
    return [(rng.randint(0, most), rng.uniform(0.0, longest)) for _ in range(count)]


def scores_of(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "scores.parquet")


def one_error_line(output: str) -> str:
    """The output's only ``autoq: error:`` line, checked to be a single line without a traceback."""
    errors = [line for line in output.splitlines() if line.startswith("autoq: error: ")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def json_files_complete(directory: Path) -> bool:
    """Every visible ``*.json`` under ``directory`` parses (none is half-written)."""
    for path in Path(directory).rglob("*.json"):
        if path.name.startswith("."):
            continue
        try:
            json.loads(path.read_text())
        except (ValueError, FileNotFoundError):
            return False
    return True
