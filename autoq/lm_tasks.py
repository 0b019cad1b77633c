"""lm-eval tasks for an in-memory model: autoq's offline suite, or lm-eval's own hub tasks.

The suite (``wikitext2``, ``lambada``, ``arc_easy``, ``piqa``, ``mmlu``) is lm-eval 0.4.13's own
task definitions (prompts, targets, metrics) reading local files:
* with an eval data directory (``--eval-data DIR`` or ``$AUTOQ_EVAL_DATA``), the task YAMLs under
  ``evals/local/`` (data read by ``evals/local/local_data.py``) and, for MMLU, per-subject tasks
  generated from ``evals/mmlu_local/_template_yaml`` for ``DIR/mmlu`` (original CSV layout);
* without one, the same names run lm-eval's hub tasks (``wikitext``, ``lambada_openai``,
  ``arc_easy``, ``piqa``, ``mmlu``), which need the HuggingFace hub.
Any other lm-eval task name is passed through to lm-eval as it is.

A task may carry its few-shot count: ``mmlu:5``. Its metrics are then named ``mmlu_5shot_<metric>``.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from autoq.errors import AutoqError

MMLU_GROUP = "autoq_mmlu"
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]  # the original CSVs have no header
_EVALS = Path(str(resources.files("autoq.evals")))
LOCAL_TASKS_DIR = _EVALS / "local"
_MMLU_TEMPLATE = _EVALS / "mmlu_local" / "_template_yaml"


@dataclass(frozen=True)
class SuiteTask:
    local: str  # lm-eval task (or group) reading the eval data directory
    hub: str  # lm-eval's own task on the hub dataset
    files: tuple[str, ...]  # what it reads under the eval data directory


SUITE = {
    "wikitext2": SuiteTask("autoq_wikitext2", "wikitext", ("wikitext2/wiki.test.raw",)),
    "lambada": SuiteTask("autoq_lambada", "lambada_openai", ("lambada/lambada_test.jsonl",)),
    "arc_easy": SuiteTask("autoq_arc_easy", "arc_easy", ("arc_easy/ARC-Easy-Test.jsonl",)),
    "piqa": SuiteTask("autoq_piqa", "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),
    "mmlu": SuiteTask(MMLU_GROUP, "mmlu", ("mmlu/test",)),
}


@dataclass(frozen=True)
class TaskRequest:
    """One lm-eval task to run: a suite name or any lm-eval task, with an optional few-shot count and
    document limit (``mmlu:5@2``: 5-shot, 2 documents per subject; ``arc_easy@300``)."""

    name: str
    shots: int | None = None
    limit: int | None = None  # documents (per MMLU subject); None: the run's --limit

    @property
    def label(self) -> str:
        """The prefix of its metric names: ``mmlu``, or ``mmlu_5shot`` for ``mmlu:5``."""
        return self.name if self.shots is None else f"{self.name}_{self.shots}shot"

    def lm_eval_name(self, eval_data: Path | None) -> str:
        suite = SUITE.get(self.name)
        if suite is None:
            return self.name
        return suite.local if eval_data is not None else suite.hub


def parse_task(text: str) -> TaskRequest:
    """``TASK``, ``TASK:SHOTS``, ``TASK@LIMIT`` or ``TASK:SHOTS@LIMIT``."""
    rest, _, limit = text.partition("@")
    name, _, shots = rest.partition(":")
    if shots and not shots.isdigit():
        raise AutoqError(f"task '{text}': the few-shot count after ':' must be a whole number")
    if limit and (not limit.isdigit() or int(limit) < 1):
        raise AutoqError(f"task '{text}': the document limit after '@' must be a positive whole number")
    return TaskRequest(name, int(shots) if shots else None, int(limit) if limit else None)


def check_requests(requests: list[TaskRequest], eval_data: Path | None, offline: bool, default_shots: int | None = None) -> None:
    """Fail before any model work on unknown tasks, missing data files, or hub tasks offline."""
    others = sorted({r.name for r in requests if r.name not in SUITE})
    if others:
        from lm_eval.tasks import TaskManager

        known = set(TaskManager(include_defaults=True).all_tasks)
        unknown = [name for name in others if name not in known]
        if unknown:
            raise AutoqError(f"unknown task {', '.join(map(repr, unknown))}; choose from ppl, kl, {', '.join(SUITE)} or an lm-eval task name")
    if eval_data is None:
        if offline:
            raise AutoqError(f"tasks {', '.join(r.name for r in requests)} need the HuggingFace hub; offline, "
                             "pass --eval-data DIR (or set $AUTOQ_EVAL_DATA) for the local suite")  # fmt: skip
        return
    for request in requests:
        for relative in SUITE[request.name].files if request.name in SUITE else ():
            if not (eval_data / relative).exists():
                raise AutoqError(f"eval data {eval_data} has no {relative} (needed by task {request.name}; see evals/README.md)")
        if request.name == "mmlu":  # every subject's CSVs, dev/ too when few-shot
            mmlu_subjects(eval_data / "mmlu", request.shots if request.shots is not None else default_shots or 0)


def mmlu_subjects(mmlu_dir: Path, few_shot: int) -> list[str]:
    """Subjects with a test CSV (and a dev CSV when few-shot examples are needed)."""
    subjects = sorted(p.name.removesuffix("_test.csv") for p in (mmlu_dir / "test").glob("*_test.csv"))
    if not subjects:
        raise AutoqError(f"{mmlu_dir}: no test/<subject>_test.csv files (the original MMLU CSV layout)")
    missing_dev = [s for s in subjects if few_shot and not (mmlu_dir / "dev" / f"{s}_dev.csv").is_file()]
    if missing_dev:
        raise AutoqError(f"{mmlu_dir}: {few_shot}-shot needs dev/<subject>_dev.csv; missing for {', '.join(missing_dev[:3])}")
    return subjects


def write_mmlu_tasks(mmlu_dir: Path, few_shot: int, target: Path) -> list[str]:
    """Write one lm-eval task per subject plus the ``autoq_mmlu`` group; return the task names."""
    import yaml

    mmlu_dir = Path(mmlu_dir).resolve()
    tasks = []
    for subject in mmlu_subjects(mmlu_dir, few_shot):
        data_files = {"test": str(mmlu_dir / "test" / f"{subject}_test.csv")}
        if few_shot:
            data_files["dev"] = str(mmlu_dir / "dev" / f"{subject}_dev.csv")
        task = f"{MMLU_GROUP}_{subject}"
        spec = {
            "include": str(_MMLU_TEMPLATE),
            "task": task,
            "task_alias": subject,
            "dataset_kwargs": {"data_files": data_files, "column_names": MMLU_COLUMNS},
            "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        }
        if not few_shot:
            spec["fewshot_split"] = None
        (target / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        tasks.append(task)
    group = {"group": MMLU_GROUP, "task": tasks, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (target / f"_{MMLU_GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return tasks


def task_manager(names: list[str], eval_data: Path | None, include: list[Path]):
    """lm-eval's TaskManager over autoq's task folders; lm-eval's own ~14k tasks only when needed."""
    from lm_eval.tasks import TaskManager

    local = {s.local for s in SUITE.values()}
    metadata = {"eval_data": str(eval_data)} if eval_data is not None else None
    return TaskManager(include_path=[str(p) for p in include], include_defaults=not set(names) <= local, metadata=metadata)


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    requests: list[TaskRequest],
    *,
    eval_data: Path | None = None,
    default_shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """lm-eval's results for each few-shot setting (one ``simple_evaluate`` call per setting).

    Each entry: ``{"num_fewshot", "tasks": {label: lm-eval name}, "results", "groups"}``.
    ``limit`` counts documents per task (per subject for MMLU) where a request sets none of its own.
    ``max_length``: the longest input (WikiText's rolling windows); None keeps lm-eval's default, the
    model's maximum context.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval warns about every custom_dataset task (and metric defaults) while loading tasks.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    by_setting: dict[tuple[int | None, int | None], list[TaskRequest]] = {}  # one lm-eval run per (shots, limit)
    for request in requests:
        shots = request.shots if request.shots is not None else default_shots
        by_setting.setdefault((shots, request.limit or limit), []).append(request)
    runs = []
    for (shots, run_limit), group in by_setting.items():
        with tempfile.TemporaryDirectory(prefix="autoq-tasks-") as generated:
            include = [LOCAL_TASKS_DIR, Path(generated)]
            if eval_data is not None and any(r.name == "mmlu" for r in group):
                write_mmlu_tasks(eval_data / "mmlu", shots or 0, Path(generated))
            names = {r.label: r.lm_eval_name(eval_data) for r in group}
            try:
                results = lm_eval.simple_evaluate(
                    model=wrapped, tasks=sorted(set(names.values())), num_fewshot=shots, limit=run_limit,
                    task_manager=task_manager(list(names.values()), eval_data, include),
                    log_samples=False, bootstrap_iters=0, verbosity="ERROR",
                )  # fmt: skip
            except (KeyError, ValueError, FileNotFoundError) as err:
                raise AutoqError(f"lm-eval could not run {sorted(names)}: {err}") from None
        runs.append({"num_fewshot": shots, "limit": run_limit, "tasks": names, "results": results.get("results", {}),
                     "groups": results.get("groups", {})})  # fmt: skip
    return runs


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Flat metrics ``<label>_<metric>`` (e.g. ``arc_easy_acc_norm``, ``mmlu_5shot_acc``) of each requested task."""
    flat = {}
    for run in runs:
        for label, name in run["tasks"].items():
            metrics = run["groups"].get(name) or run["results"].get(name, {})
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and filt in ("none", "") and metric not in ("sample_len", "alias") and not metric.endswith("_stderr"):
                    flat[f"{label}_{metric}"] = float(value)
    return flat
