"""Run the reliability tests and tabulate each fault or hostile input tried and what happened.

    python benchmarks/reliability_report.py [--fuzz-minutes N] [--out reports/reliability]

Runs tests/test_reliability_{faults,integrity,input}.py with ``--slow`` (every fault) under
pytest's JUnit XML, then writes ``reliability.csv`` (one row per test case: fault, how it is
produced, expected outcome, outcome, seconds, fuzz cases) and ``reliability.md`` (the same as a
table, with the machine and the totals). The model is conftest's tiny random Llama (2 layers,
hidden 128, bf16, seed 0): faults are about files and processes, not about what the weights are.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_reliability_faults.py", "tests/test_reliability_integrity.py", "tests/test_reliability_input.py"]

# Test function -> (fault or input, how it is produced, expected outcome).
FAULTS = {
    "test_sigkill_during_scoring_resumes_to_the_same_scores_bit_for_bit":
        ("SIGKILL during scoring", "3 kills at seeded points (0-4 more chunks, then 0-0.3 s), each run resuming the last",
         "next run resumes from cached chunks; final scores equal an uninterrupted run's bit for bit"),
    "test_sigkill_during_export_never_shows_a_half_written_checkpoint":
        ("SIGKILL during export", "a kill at a seeded time while `apply` writes the checkpoint",
         "no checkpoint directory ever visible half-written; next run removes the stale temporary and says so; result verifies"),
    "test_sigkill_during_sweep_resumes_from_its_finished_rows":
        ("SIGKILL during sweep", "kill after a seeded number of finished rows",
         "finished rows kept byte for byte; only unfinished rows run again"),
    "test_sigkill_during_refine_resumes_the_study":
        ("SIGKILL during refine", "kill after 2-5 finished optuna trials",
         "the study resumes from its finished trials to the requested count; no output until it ends"),
    "test_a_full_disk_is_one_error_and_leaves_no_partial_output":
        ("Full disk", "RLIMIT_FSIZE (16 KiB: cache write fails; 512 KiB: checkpoint write fails)",
         "exit 2, one line, no output, no temporary left; the cache stays consistent and a later run gives the same scores"),
    "test_the_cli_process_turns_a_file_size_limit_into_one_error":
        ("File-size limit on `python -m autoq`", "ulimit -f 64 bytes (SIGXFSZ)", "exit 2 with one line (not killed by SIGXFSZ); nothing written"),
    "test_two_searches_on_one_cache_at_once":
        ("Two concurrent searches", "two `autoq search` processes, same model, data and cache, released together",
         "one scores, the other waits on the entry's flock and reads its table; same plan, same scores, no damage"),
    "test_a_damaged_cache_file_is_reported_removed_and_recomputed":
        ("Damaged score-cache file", "a byte flipped, the file truncated or its checksum deleted (table, chunk, statistics)",
         "one log line naming the file; it is removed and recomputed; scores equal the undamaged run's"),
    "test_verify_names_the_layer_of_a_flipped_scale_byte":
        ("Flipped byte in a scale tensor", "lowest mantissa bit of one weight_scale value in model.safetensors",
         "`autoq verify` exits 1 naming that layer and tensor (the value is still finite and positive)"),
    "test_verify_names_a_changed_config_and_says_when_there_is_no_manifest":
        ("Changed checkpoint file / no manifest", "a space added to config.json; autoq_manifest.json deleted",
         "verify names config.json; without a manifest it says contents were not hash-checked"),
    "test_fuzzed_plans_exit_2_with_one_line":
        ("Fuzzed plan.json", "hypothesis: any JSON, a plan's shape with any field of any type, unicode names, duplicate keys, cut/spliced text",
         "apply: exit 2 with one line; plan show/convert: success or exit 2 with one line; nothing written"),
    "test_fuzzed_plan_bytes_exit_2":
        ("Fuzzed plan.json bytes", "hypothesis: arbitrary bytes (invalid UTF-8 included)", "exit 2 with one line"),
    "test_hostile_plans_exit_2_with_one_line":
        ("Hostile plans", "duplicate layer, NaN, a 5000-digit integer, 1e300 params, 100k nested brackets, newline/unicode names, version true",
         "exit 2 with one line naming the problem"),
    "test_a_100_mb_plan_and_a_fifo_are_refused_at_once":
        ("100 MB plan; plan that is a FIFO", "a valid 100 MB JSON file; mkfifo", "exit 2 at once (size checked before reading; FIFO never opened)"),
    "test_fuzzed_search_spaces_exit_2_with_one_line_and_run_no_tag":
        ("Fuzzed search-space YAML", "hypothesis: any YAML, a space's shape with any field of any type, python/custom tags, duplicate keys, cut text",
         "exit 2 with one line; no tag builds an object or runs code; a parsed space selects layers or fails with one error"),
    "test_hostile_search_spaces_exit_2_with_one_line":
        ("Hostile search spaces", "!!python/object/apply, duplicate keys, 'no' as a flag, unicode/RTL name, billion laughs, bad regex",
         "exit 2 with one line; the tag's command never runs"),
    "test_a_100_mb_search_space_and_a_catastrophic_rule_are_refused_in_time":
        ("100 MB YAML; catastrophic group rule", "100 MB file; rule ^(.+?)+(?<=q)$ on every layer name",
         "exit 2 with one line, the rule stopped after 1 s"),
    "test_absurd_configs_are_refused_before_anything_is_built":
        ("Absurd config.json", "hidden_size 1e12, negative/text/bool sizes, a million layers, a non-causal model",
         "exit 2 with one line before transformers allocates anything"),
    "test_safetensors_headers_that_lie_are_one_error":
        ("Lying safetensors header", "offset past the end, overlapping offsets, header length past the file, truncated file",
         "exit 2 with one line"),
    "test_nan_and_infinite_weights_are_refused":
        ("NaN / Inf weights", "one weight value set to NaN, then Inf", "exit 2 with one line naming the weight"),
    "test_no_path_unpickles_a_model_file":
        ("Pickled weights", "pytorch_model.bin whose unpickling runs a command; pickle and torch.load disabled",
         "a .bin-only model is refused; with safetensors beside it, search/export/verify never unpickle"),
    "test_a_models_own_code_runs_only_with_trust_remote_code":
        ("A model's own code (auto_map)", "modeling_*.py that touches a marker file when imported",
         "refused without --trust-remote-code (code never runs); runs with it"),
    "test_outputs_that_are_links_files_or_inside_the_model_are_refused":
        ("Bad output paths", "output is a symlink, under a file, inside or equal to the input model",
         "exit 2 with one line; the model directory is unchanged"),
    "test_an_output_in_a_read_only_directory_is_refused":
        ("Read-only output parent", "chmod 555 parent (skipped as root, who may write there)", "exit 2 with one line"),
}  # fmt: skip


def run_tests(fuzz_minutes: float, xml: Path) -> float:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--slow", f"--junitxml={xml}", "-o", "junit_family=legacy",
               *TESTS]  # fmt: skip  (legacy: the family that keeps record_property's fuzz counts)
    if fuzz_minutes:
        command.append(f"--fuzz-minutes={fuzz_minutes}")
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    return time.perf_counter() - start


def read_cases(xml: Path) -> pd.DataFrame:
    rows = []
    for case in ET.parse(xml).iter("testcase"):
        name = case.get("name", "")
        function, _, param = name.partition("[")
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                outcome = tag if tag != "skipped" else f"skipped ({(element.get('message') or '')[:60]})"
        fuzz = next((int(p.get("value")) for p in case.iter("property") if p.get("name") == "fuzz_cases"), None)
        fault, how, expected = FAULTS.get(function, (function, "", ""))
        rows.append({"fault": fault + (f" [{param.rstrip(']')}]" if param else ""), "how produced": how, "expected outcome": expected,
                     "test": function, "outcome": outcome, "seconds": round(float(case.get("time", 0)), 1), "fuzz cases": fuzz})  # fmt: skip
    return pd.DataFrame(rows).astype({"fuzz cases": "Int64"})


def write(table: pd.DataFrame, out: Path, wall: float, fuzz_minutes: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out.with_suffix(".csv"), index=False)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    fuzz_total = int(table["fuzz cases"].fillna(0).sum())
    failed = int((~table.outcome.str.startswith(("passed", "skipped"))).sum())
    mode = f"{fuzz_minutes} min per fuzz test, random seeds" if fuzz_minutes else "fixed seeds (derandomized), 150 cases per fuzz test"
    lines = [
        "# Reliability: faults and hostile inputs tried, and what happened",
        "",
        f"Written by `benchmarks/reliability_report.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU, load average {load} at the end "
        "(shared with other jobs: seconds are wall time under that load). Model: tests/conftest.py's tiny random Llama "
        "(2 layers, hidden 128, bf16, seed 0); calibration: autoq's default text. Fuzzing: " + mode + ".",
        "",
        f"**{len(table)} cases, {failed} failed; {fuzz_total} fuzzed inputs{', none failed' if not failed else ''}; "
        f"{wall:.0f} s wall in all.**",
        "",
        table.drop(columns=["test"]).astype({"fuzz cases": "object"}).fillna("").to_markdown(index=False),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-minutes", type=float, default=0.0, help="per fuzz test (default: fixed seeds, as in CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "reliability", help="path stem of the .csv and .md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        wall = run_tests(args.fuzz_minutes, xml)
        table = read_cases(xml)
    write(table, args.out, wall, args.fuzz_minutes)
    print(f"wrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
