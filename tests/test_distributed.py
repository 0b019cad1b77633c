"""Data-parallel scoring (``autoq.distributed``) on the CPU: two processes with gloo, started by the
real command lines (``torchrun ... -m autoq search`` and ``autoq search --gpus 2``).

One scenario, run once per module: the single-process search; the same search on two processes
where rank 1 is killed (SIGKILL) when it starts its second chunk; then the same command again
under torchrun, which resumes from the chunk rank 0 saved. The two-process calibration (in the
killed run) and both chunks' reduced scores must equal the single-process ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from autoq import cli, distributed
from autoq.distributed import RESUME_HINT, describe_failure
from autoq.errors import AutoqError

# 16 x 64 tokens in batches of 2 x 64, two batches per step: 4 steps; chunks of 2 steps, one per rank.
SEARCH = ["--calib-samples", "16", "--seq-len", "64", "--batch-size", "2", "--tokens-per-step", "256", "--chunk-steps", "2",
          "--bits", "6", "--device", "cpu", "--no-progress"]  # fmt: skip
TIMEOUT_S = 240  # per launch; about 20 s each on two idle cores

# Imported by every Python process started with this directory on PYTHONPATH: kills the rank
# named by AUTOQ_TEST_KILL_RANK as it starts scoring its second chunk (after chunk 0 is saved).
KILLER = '''
import os
if os.environ.get("AUTOQ_TEST_KILL_RANK") == os.environ.get("RANK"):
    import signal
    from autoq.sensitivity import SensitivityEngine

    original, calls = SensitivityEngine._score_chunk, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    SensitivityEngine._score_chunk = dying
'''


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` in its own process group: on a timeout, the launcher and every rank it started go."""
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _entry(cache: Path) -> Path:
    (entry,) = (p for p in (cache / "scores").iterdir() if p.is_dir())  # beside it: the entry's lock file
    return entry


@pytest.fixture(scope="module")
def runs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("distributed")
    space = root / "space.yaml"
    space.write_text("formats: [NVFP4, FP8, W4A8, BF16]\nsearch_lm_head: true\n")  # W4A8: the AWQ search too
    args = ["search", "--model", str(tiny_llama), "--space", str(space), *SEARCH]

    # One thread, as in each torchrun worker (OMP_NUM_THREADS=1): the same kernels on the same steps.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*args, "--out", str(root / "single"), "--cache-dir", str(root / "cache-single")]) == 0
    finally:
        torch.set_num_threads(threads)

    (root / "inject").mkdir()
    (root / "inject" / "sitecustomize.py").write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOQ_OFFLINE": "1", "AUTOQ_CACHE": str(root / "cache-default")}
    out, cache = root / "out", root / "cache"
    shared = [*args, "--out", str(out), "--cache-dir", str(cache)]
    inject = {"AUTOQ_TEST_KILL_RANK": "1", "PYTHONPATH": os.pathsep.join([str(root / "inject"), env.get("PYTHONPATH", "")])}
    killed = _run([sys.executable, "-m", "autoq", *shared, "--gpus", "2"], {**env, **inject})
    after_kill = {"out_dir_entries": sorted(p.name for p in root.iterdir() if p.name.startswith((".out", "out"))),
                  "cache_files": sorted(p.name for p in _entry(cache).iterdir() if p.suffix != ".sha256")}  # fmt: skip
    resumed = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "autoq", *shared], env)
    return SimpleNamespace(root=root, out=out, cache=cache, killed=killed, after_kill=after_kill, resumed=resumed)


def _scores(run_dir: Path) -> pd.Series:
    return pd.read_parquet(run_dir / "scores.parquet").set_index(["layer", "format"]).score


def test_two_processes_score_like_one(runs: SimpleNamespace) -> None:
    """Scores, calibration statistics (amax, mean |x|, AWQ scales) and the plan equal the
    single-process ones to 1e-6 relative; rank 0 alone speaks and writes."""
    assert runs.resumed.returncode == 0, runs.resumed.stderr
    single, parallel = _scores(runs.root / "single"), _scores(runs.out)
    assert (single > 0).sum() >= 40  # 15 layers x 3 quantized formats, really scored
    pd.testing.assert_series_equal(single, parallel, rtol=1e-6, atol=0)

    ours, theirs = load_file(_entry(runs.root / "cache-single") / "stats.safetensors"), load_file(_entry(runs.cache) / "stats.safetensors")
    assert sorted(ours) == sorted(theirs) and any(":pre_quant_scale:W4A8" in name for name in ours)
    for name, tensor in ours.items():
        torch.testing.assert_close(theirs[name], tensor, rtol=1e-6, atol=0, msg=name)

    plans = [json.loads((d / "plan.json").read_text())["layers"] for d in (runs.root / "single", runs.out)]
    assert {n: layer["format"] for n, layer in plans[0].items()} == {n: layer["format"] for n, layer in plans[1].items()}
    assert len({layer["format"] for layer in plans[0].values()}) > 1  # a mixed plan: the scores decided it

    summary = json.loads((runs.out / "search.json").read_text())
    assert summary["processes"] == 2 and len(summary["peak_memory_per_rank"]) == 2
    stderr = runs.resumed.stderr
    assert stderr.count("autoq: resuming from the score cache: 2 of 4 steps already scored") == 1  # rank 0 only
    assert stderr.count("autoq: wrote ") == 1 and "error" not in stderr


def test_a_dead_rank_fails_the_run_with_one_error_and_no_outputs(runs: SimpleNamespace) -> None:
    killed = runs.killed
    assert killed.returncode == 1
    errors = [line for line in killed.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"autoq: error: rank 1 was killed by SIGKILL; {RESUME_HINT}"], killed.stderr
    assert "Traceback" not in killed.stderr
    assert runs.after_kill["out_dir_entries"] == []  # no output directory, not even a partial one
    # Calibration and the first chunk (both ranks' scores, reduced) were saved by rank 0.
    assert runs.after_kill["cache_files"] == ["chunk_00000-00002.json", "stats.json", "stats.safetensors"]


def _failure(tmp_path: Path, rank: int, exitcode: int, recorded: str | None = None):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / f"error-{rank}.json"
    if recorded is not None:
        error_file.write_text(json.dumps({"message": {"message": recorded, "extraInfo": {"py_callstack": "", "timestamp": "100"}}}))
    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(error_file))


def test_launcher_blames_the_rank_that_failed_on_its_own(tmp_path: Path) -> None:
    """torchrun lists every rank that ended badly; the one line names the root cause."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    lost = _failure(tmp_path, 0, 2, "RankLost: lost contact with another rank during scoring")
    stopped = _failure(tmp_path, 2, -15)
    failures = {0: lost, 2: stopped, 1: _failure(tmp_path, 1, -9)}
    assert describe_failure(ChildFailedError("autoq", failures)) == (f"rank 1 was killed by SIGKILL; {RESUME_HINT}", 1)
    crashed = _failure(tmp_path, 1, 1, "RuntimeError: CUDA out of memory.\nTried to allocate 2 GiB")
    assert describe_failure(ChildFailedError("autoq", {0: lost, 1: crashed, 2: stopped})) == (
        f"rank 1: RuntimeError: CUDA out of memory.; {RESUME_HINT}", 1)  # fmt: skip
    bad_input = _failure(tmp_path, 1, 2, "AutoqError: model path /x does not exist")
    assert describe_failure(ChildFailedError("autoq", {2: stopped, 1: bad_input})) == ("model path /x does not exist", 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpus_without_a_gpu_is_one_clear_error(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["search", "--model", str(tiny_llama), "--bits", "6", "--out", str(tmp_path / "out")]
    assert cli.main([*base, "--gpus", "2"]) == 2
    assert capsys.readouterr().err == "autoq: error: --gpus 2: no CUDA GPU is visible (--device cpu runs 2 CPU processes, with gloo)\n"
    assert cli.main([*base, "--gpus", "2", "--device", "cuda:1"]) == 2  # no CUDA here: that is the first error
    assert capsys.readouterr().err == "autoq: error: --device cuda:1: CUDA is not available on this machine\n"
    with pytest.raises(AutoqError, match=r"each uses its own GPU \(cuda:LOCAL_RANK\); pass --device cuda"):
        distributed._check_devices(2, "cuda:1")
    assert not (tmp_path / "out").exists()


def test_only_search_runs_under_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["frontier", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "autoq: error: only `autoq search` runs in several processes (torchrun started 2 for `autoq frontier`)\n"
