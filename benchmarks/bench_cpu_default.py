"""The default search on a CPU: ``autoq search --bits 4.8`` with no other argument (issue 9: <= 120 s, <= 3 GiB).

Each measurement runs the command in a fresh process with a fresh ``$AUTOQ_CACHE`` (and a fresh
torch inductor cache), so nothing from an earlier run helps it:
* ``first run, GGUF included``: nothing cached at all, so the default model's one-time
  GGUF -> bf16 conversion is part of the run;
* ``first run``: only the converted model is cached (the conversion done beforehand, timed
  alone as ``GGUF conversion``); no scores, no statistics;
* ``scores cached``: the same command again (no model work at all).
Wall time, peak RSS of the process (``wait4``), the 1-minute load average when it started (the
machine may be shared: timings grow with the load) and the machine go to the CSV.

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


def timed(command: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``command``; wall seconds, peak RSS (GiB) and the load average at its start."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}); its output: {log}")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "load_avg_1min": load,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="fresh-cache 'first run' measurements")
    parser.add_argument("--bits", default="4.8")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/cpu_default.csv"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary caches and logs")
    args = parser.parse_args()
    autoq = [sys.executable, "-m", "autoq.cli"]
    work = Path(tempfile.mkdtemp(prefix="autoq-cpu-default-"))
    rows = []

    def run(label: str, command: list[str], cache: Path, fresh_inductor: bool = True) -> dict:
        env = {**os.environ, "AUTOQ_CACHE": str(cache)}
        if fresh_inductor:
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.mkdtemp(dir=work)))
        env.pop("OMP_WAIT_POLICY", None)  # as a user's shell has it: autoq chooses
        result = timed(command, env, work / f"{label.replace(' ', '_').replace(',', '')}-{len(rows)}.log")
        shown = " ".join("python" if part == sys.executable else part for part in command)
        rows.append({"measurement": label, **result, "command": shown.replace("python -m autoq.cli", "autoq")})
        print(rows[-1], flush=True)
        return result

    search = [*autoq, "search", "--bits", args.bits, "--no-progress"]
    everything = work / "cache-cold"
    run("first run, GGUF included", [*search, "--out", str(work / "out-cold")], everything)
    run("scores cached", [*search, "--out", str(work / "out-cached")], everything, fresh_inductor=False)
    converted = work / "cache-converted"
    run("GGUF conversion", [sys.executable, "-c", CONVERT], converted)
    for repeat in range(args.repeats):
        cache = work / f"cache-first-{repeat}"
        shutil.copytree(converted, cache)  # the converted model (and the GGUF's remembered sha256) only
        run("first run", [*search, "--out", str(work / f"out-first-{repeat}")], cache)

    import torch

    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {memory_gib():.0f} GiB RAM, torch {torch.__version__}, threads {torch.get_num_threads()}"
    table = pd.DataFrame(rows).assign(machine=machine, model="SmolLM2-135M-Instruct (bf16 from its Q4_1 GGUF)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"caches and logs kept in {work}")


if __name__ == "__main__":
    main()
