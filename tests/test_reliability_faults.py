"""Faults injected on purpose: SIGKILL during scoring, export, sweep and refine; a full disk; two
searches racing on one cache. Every run is a separate process (``reliability_tools``), on the
tiny random Llama of conftest, with kill points drawn from a fixed seed."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import autoq.sweep
from autoq.cli import main
from reliability_tools import json_files_complete, kill_points, one_error_line, partials, run, scores_of, start, wait_for

SEED = 20240615
BUDGET = "10"
SPACE = "name: fp8\nformats: [FP8, BF16]\n"  # no AWQ: the fastest formats to score, apply and export on CPU
DATA = ["--calib-samples", "16", "--seq-len", "32", "--batch-size", "1", "--no-progress"]
CHUNKS = ["--chunk-steps", "1", "--tokens-per-step", "32"]  # 16 chunks of one 32-token step: many kill points


def search_argv(model: Path, space: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["search", "--model", str(model), "--space", str(space), "--bits", BUDGET, "--out", str(out), "--cache-dir", str(cache),
            *DATA, *CHUNKS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("space") / "fp8.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, space: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted search (in this process): the scores every interrupted run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUTOQ_CACHE", str(root / "autoq-cache"))
        assert main(search_argv(tiny_llama, space, root / "run", root / "cache")) == 0
    return root / "run"


CHUNK_PAUSE = 0.4


def _chunks(cache: Path) -> int:
    return len(list(cache.glob("scores/*/chunk_*.json")))


def test_sigkill_during_scoring_resumes_to_the_same_scores_bit_for_bit(
    tiny_llama: Path, space: Path, reference: Path, tmp_path: Path
) -> None:
    """Three SIGKILLs at seeded points (after 0-4 more finished chunks, then 0-0.3 s), each run
    resuming the last; the fourth run finishes with exactly the uninterrupted run's scores.

    A chunk of the tiny model scores in ~50 ms, so each killed run sleeps CHUNK_PAUSE s before
    saving a chunk: a kill drawn in [0, 0.3) s then lands inside scoring, never after it (killed
    while a chunk is computed, or just before or after one is saved)."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = search_argv(tiny_llama, space, out, cache)
    for number, (more, delay) in enumerate(kill_points(SEED, 3, 4)):
        before = _chunks(cache)
        killed = start(argv, tmp_path / f"killed-{number}.log", pause=("autoq.cache:ScoreCache.save_chunk", CHUNK_PAUSE))
        wait_for(lambda: "layers to search" in killed.output and _chunks(cache) >= before + more, killed)
        time.sleep(delay)
        assert killed.kill(), f"kill point {number} came after the run had finished:\n{killed.output}"
        assert not out.exists() and not list(cache.glob("scores/*/scores.parquet")), "killed after scoring"
    chunks_left = _chunks(cache)
    code, output = run(argv, tmp_path / "final.log")
    assert code == 0, output
    if chunks_left:
        assert "resuming from the score cache" in output
    assert "Traceback" not in output and partials(tmp_path) == []
    pd.testing.assert_frame_equal(scores_of(out), scores_of(reference), check_exact=True)


# One line per export path: the command ({plan}, {model}, {out} filled in), and the function that
# writes the checkpoint's manifest, last, where the test pauses the run for PAUSE seconds so that a
# kill drawn in [0, PAUSE) s after the temporary directory appears always lands in the export.
EXPORTERS = {
    "modelopt": (["apply", "{plan}", "--model", "{model}", "--export", "{out}", "--engine", "modelopt", "--calib-samples", "8",
                  "--seq-len", "32", "--no-progress"], "autoq.apply:write_manifest"),
    "stream": (["apply", "{plan}", "--model", "{model}", "--export", "{out}", "--engine", "stream", "--calib-samples", "8",
                "--seq-len", "32", "--no-progress"], "autoq.export:write_manifest"),
}  # fmt: skip
PAUSE = 1.0


@pytest.mark.parametrize("exporter", list(EXPORTERS))
def test_sigkill_during_export_never_shows_a_half_written_checkpoint(
    exporter: str, tiny_llama: Path, reference: Path, tmp_path: Path
) -> None:
    """Killed while the checkpoint is being written: no checkpoint appears, the next run says it
    removes the stale temporary, and writes a checkpoint that verifies, hashes included."""
    out = tmp_path / "export"
    template, manifest_writer = EXPORTERS[exporter]
    argv = [a.format(plan=reference / "plan.json", model=tiny_llama, out=out) for a in template]
    temporaries = lambda: set(tmp_path.glob(".export.*.partial"))  # noqa: E731
    for number, (_, delay) in enumerate(kill_points(SEED + 1, 1, 0, longest=0.9 * PAUSE)):
        before = temporaries()
        killed = start(argv, tmp_path / f"killed-{number}.log", pause=(manifest_writer, PAUSE))
        wait_for(lambda: bool(temporaries() - before), killed)  # this run's temporary directory
        time.sleep(delay)
        assert killed.kill(), f"kill point {number} came after the export had finished:\n{killed.output}"
        assert not out.exists() and temporaries()
    final = start(argv, tmp_path / "final.log")
    while final.alive:  # the checkpoint appears whole, or not at all
        assert not out.exists() or (out / "autoq_manifest.json").is_file()
        time.sleep(0.005)
    assert final.wait() == 0, final.output
    assert "removed 1 stale temporary output(s) of an interrupted run" in final.output
    assert not temporaries()
    assert main(["verify", str(out)]) == 0


def _rows(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "rows").glob("*.json")) if (out / "rows").is_dir() else []


def test_sigkill_during_sweep_resumes_from_its_finished_rows(
    tiny_llama: Path, space: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    argv = ["sweep", "--model", str(tiny_llama), "--space", str(space), "--bits", BUDGET, "--baselines", "bf16,fp8", "--out", str(out),
            "--cache-dir", str(cache), "--eval-samples", "4", "--tasks", "ppl,kl", *DATA]  # fmt: skip
    more, delay = kill_points(SEED + 2, 1, 1)[0]
    killed = start(argv, tmp_path / "killed.log")
    wait_for(lambda: len(_rows(out)) >= 1 + more, killed)
    time.sleep(delay)
    assert killed.kill(), f"the kill came after the sweep had finished:\n{killed.output}"
    finished = _rows(out)
    assert 1 <= len(finished) < 3 and json_files_complete(out)
    records = {row: (out / "rows" / f"{row}.json").read_bytes() for row in finished}

    evaluated: list[str] = []
    original = autoq.sweep.evaluate_row
    monkeypatch.setattr(autoq.sweep, "evaluate_row", lambda row, *a, **k: evaluated.append(row.id) or original(row, *a, **k))
    assert main(argv) == 0
    assert sorted(evaluated + finished) == ["autoq-10", "bf16", "uniform-FP8"]  # only the unfinished rows ran
    assert {row: (out / "rows" / f"{row}.json").read_bytes() for row in finished} == records
    assert partials(out) == []
    assert (pd.read_csv(out / "results.csv").status == "ok").all()


def _complete_trials(db: Path, *, after_kill: bool = False) -> int:
    """Finished trials in the study database. While refine runs: read-only, 0 while the file is
    missing or being written. After a kill the file may hold a hot journal (killed mid-transaction),
    which only a writable connection rolls back, as the next refine will: so open it writable and
    let an error fail the test."""
    query = "SELECT count(*) FROM trials WHERE state = 'COMPLETE'"
    if after_kill:
        with sqlite3.connect(db, timeout=5) as connection:
            return connection.execute(query).fetchone()[0]
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as connection:
            return connection.execute(query).fetchone()[0]
    except sqlite3.Error:  # not created yet, or being written
        return 0


TRIAL_PAUSE = 0.4


@pytest.mark.slow
def test_sigkill_during_refine_resumes_the_study(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    """Killed after 2-5 finished trials and 0-0.3 s: the next run finishes the same study.

    Most trials of this 3-group study repeat a measured plan and take milliseconds, so the killed
    run sleeps TRIAL_PAUSE s in every trial (``complete_choice``): its 30 trials take at least 12 s,
    and the kill always lands mid-study, however fast or loaded the machine."""
    argv = ["refine", str(run_dir), "--trials", "30", "--groups", "3", "--eval-samples", "4", "--no-progress"]
    more, delay = kill_points(SEED + 3, 1, 3)[0]
    killed = start(argv, tmp_path / "killed.log", pause=("autoq.refine:complete_choice", TRIAL_PAUSE))
    wait_for(lambda: _complete_trials(run_dir / "refine.db") >= 2 + more, killed)
    time.sleep(delay)
    assert killed.kill(), f"the kill came after refine had finished:\n{killed.output}"
    done_before = _complete_trials(run_dir / "refine.db", after_kill=True)
    assert 2 <= done_before < 30
    assert not (run_dir / f"refine-{BUDGET}bits-kl").exists() and not (run_dir / f"plan-refined-{BUDGET}bits.json").exists()
    assert main(argv) == 0
    import optuna

    from autoq.refine import FINISHED, storage_url

    study = optuna.load_study(study_name=f"refine-{BUDGET}bits-kl", storage=storage_url(run_dir))
    assert len(study.get_trials(states=FINISHED)) == 30  # the killed run's trials count; the study goes on to 30
    assert (run_dir / f"refine-{BUDGET}bits-kl" / "summary.json").is_file() and partials(run_dir) == []


@pytest.mark.parametrize("limit, where", [(16 << 10, "score cache"), pytest.param(512 << 10, "checkpoint", marks=pytest.mark.slow)])
def test_a_full_disk_is_one_error_and_leaves_no_partial_output(
    limit: int, where: str, tiny_llama: Path, space: Path, reference: Path, tmp_path: Path
) -> None:
    """RLIMIT_FSIZE, as a full disk: writes fail with EFBIG. 16 KiB: the score cache's statistics
    (19 KiB) cannot be written; 512 KiB: the cache can, the checkpoint (1.5 MiB) cannot. Either
    way one error line, exit 2, no output, and a later run works and gives the same scores."""
    cache, out, export = tmp_path / "cache", tmp_path / "out", tmp_path / "export"
    argv = search_argv(tiny_llama, space, out, cache, "--export", str(export))
    code, output = run(argv, tmp_path / "full.log", file_size_limit=limit)
    assert code == 2, output
    assert "the disk is full or a file-size limit was reached (File too large)" in one_error_line(output)
    assert not out.exists() and not export.exists() and partials(tmp_path) == []
    code, output = run(argv, tmp_path / "later.log")
    assert code == 0, output
    assert ("scores from cache" in output) == (where == "checkpoint")
    pd.testing.assert_frame_equal(scores_of(out), scores_of(reference), check_exact=True)


@pytest.mark.slow
def test_the_cli_process_turns_a_file_size_limit_into_one_error(tiny_llama: Path, space: Path, tmp_path: Path) -> None:
    """``python -m autoq`` itself (not a forked child): past ``ulimit -f`` the kernel sends SIGXFSZ,
    which would kill the process without a word; autoq ignores it and reports the failed write."""
    import resource

    out = tmp_path / "converted.json"
    plan = tmp_path / "plan.json"
    plan.write_text('{"schema": "autoq.plan", "version": 1, "layers": {"model.layers.0.mlp.down_proj": {"format": "FP8"}}}')
    result = subprocess.run(
        [sys.executable, "-m", "autoq", "plan", "convert", str(plan), "--to", "modelopt", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64)),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "File too large" in one_error_line(result.stderr)
    assert not out.exists() and partials(tmp_path) == []


LOCK_PAUSE = 4.0


def test_two_searches_on_one_cache_at_once(tiny_llama: Path, space: Path, reference: Path, tmp_path: Path) -> None:
    """Started on one line: one scores, the other waits for the entry's lock and reads the table;
    both succeed with the same plan and the uninterrupted run's scores. The scorer sleeps
    LOCK_PAUSE s before saving its table, inside the lock, so that the other run (which does the
    same work up to the lock) surely arrives while it is held, however loaded the machine."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    pause = ("autoq.cache:ScoreCache.save_table", LOCK_PAUSE)
    runs = [start(search_argv(tiny_llama, space, tmp_path / f"out{i}", cache), tmp_path / f"run{i}.log", start_file=go, pause=pause)
            for i in (0, 1)]  # fmt: skip
    time.sleep(0.5)
    go.touch()
    assert [r.wait() for r in runs] == [0, 0], [r.output for r in runs]
    outputs = sorted((r.output for r in runs), key=lambda text: "waiting for it" in text)
    assert "scored in" in outputs[0] and "waiting for it" not in outputs[0]
    assert "waiting for it" in outputs[1] and "scores from cache" in outputs[1]
    assert not any("damaged" in text or "Traceback" in text for text in outputs)
    plans = [pd.read_json(tmp_path / f"out{i}" / "plan.json", typ="series")["layers"] for i in (0, 1)]
    assert plans[0] == plans[1]
    for i in (0, 1):
        pd.testing.assert_frame_equal(scores_of(tmp_path / f"out{i}"), scores_of(reference), check_exact=True)
