"""The default search on a CPU: ``autoq search --bits 4.8`` with no other argument (issue 9: <= 120 s, <= 3 GiB).

Each measurement runs exactly that command (the ``autoq`` script of this environment) in a fresh
process, in a fresh working directory (so it writes ``runs/search/`` there) and with a fresh
``$AUTOQ_CACHE``, so nothing from an earlier run helps it:
* ``first run, GGUF included``: nothing cached at all, so the default model's one-time
  GGUF -> bf16 conversion is part of the run (a user's very first search);
* ``first run``: only the converted model is cached (the conversion done beforehand, timed
  alone as ``GGUF conversion``); no scores, no statistics (any later search of new work);
* ``scores cached``: the same command again in a new directory (no model work at all).
Wall time, CPU time and peak RSS of the process (``wait4``), the 1-minute load average when it
started and when it ended (the machine may be shared: wall times grow with the load; the end value
includes the run's own ~2) and the machine go to the CSV.

    python benchmarks/bench_cpu_default.py --repeats 2 --out reports/benchmarks/cpu_default.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

CONVERT = "from autoq.default_model import default_model; default_model()"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def timed(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> dict:
    """Run ``command`` in ``cwd``; wall and CPU seconds, peak RSS (GiB), load averages."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}); its output: {log}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_avg_1min_start": load, "load_avg_1min_end": os.getloadavg()[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-cache 'first run' measurements")
    parser.add_argument("--bits", default="4.8")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/cpu_default.csv"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary caches and logs")
    parser.add_argument("--replace", action="store_true", help="replace --out instead of adding this session's rows to it")
    args = parser.parse_args()
    autoq = str(Path(sys.executable).parent / "autoq")  # the console script pip installed with autoq
    work = Path(tempfile.mkdtemp(prefix="autoq-cpu-default-"))
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []

    def run(label: str, command: list[str], cache: Path) -> dict:
        env = {**os.environ, "AUTOQ_CACHE": str(cache)}
        for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):  # as a user's shell has them: autoq and torch choose
            env.pop(name, None)
        cwd = work / f"cwd-{len(rows)}"
        cwd.mkdir()
        log = work / f"{label.replace(' ', '_').replace(',', '')}-{len(rows)}.log"
        result = timed(command, env, cwd, log)
        shown = " ".join("python" if part == sys.executable else Path(part).name if part == autoq else part for part in command)
        solver_lines = log.read_text().count("HighsMipSolverData")  # HiGHS debugging lines that reached the terminal
        rows.append({"measurement": label, **result, "solver_lines": solver_lines, "command": shown})
        print(rows[-1], flush=True)
        return result

    search = [autoq, "search", "--bits", args.bits]
    everything = work / "cache-cold"
    run("first run, GGUF included", search, everything)
    run("scores cached", search, everything)
    converted = work / "cache-converted"
    run("GGUF conversion", [sys.executable, "-c", CONVERT], converted)
    for repeat in range(args.repeats):
        cache = work / f"cache-first-{repeat}"
        shutil.copytree(converted, cache)  # the converted model (and the GGUF's remembered sha256) only
        run("first run", search, cache)

    import torch

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {memory_gib():.0f} GiB RAM, torch {torch.__version__}, threads {torch.get_num_threads()}"
    table = pd.DataFrame(rows).assign(started_utc=started, machine=machine, model="SmolLM2-135M-Instruct (bf16 from its Q4_1 GGUF)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists() and not args.replace:  # each session's rows are kept: the load differs from one to the next
        table = pd.concat([pd.read_csv(args.out), table], ignore_index=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"caches and logs kept in {work}")


if __name__ == "__main__":
    main()
