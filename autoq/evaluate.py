"""Evaluation: fast proxies (perplexity, KL to the BF16 model) and lm-eval tasks (MMLU ...).

* ``perplexity`` / ``mean_kl`` run on held-out tokens (the slice right after the calibration
  tokens), so no benchmark data is needed: the default metrics of sweeps on CPU.
* ``run_lm_eval`` wraps an in-memory model in lm-eval's ``HFLM`` and calls
  ``lm_eval.simple_evaluate``. MMLU comes from the hub (lm-eval's ``mmlu`` task) or, offline,
  from a directory in the original CSV layout (``dev/``, ``val/``, ``test/`` with
  ``<subject>_<split>.csv``) through per-subject task YAMLs generated from
  ``evals/mmlu_local/_template_yaml``.
"""

from __future__ import annotations

import math
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoq.errors import AutoqError

PROXY_TASKS = ("ppl", "kl")  # computed by autoq itself; every other task name goes to lm-eval
MMLU_GROUP = "autoq_mmlu"
MMLU_COLUMNS = ["question", "A", "B", "C", "D", "answer"]  # the original CSVs have no header
_TEMPLATE = Path(str(resources.files("autoq.evals").joinpath("mmlu_local/_template_yaml")))
_LOGIT_CHUNK_TOKENS = 1024


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _log_probs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids.to(_device(model)), use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) over all held-out tokens."""
    total, count = 0.0, 0
    for ids in batches:
        log_probs = _log_probs(model, ids)
        targets = ids[:, 1:].to(log_probs.device)
        total += -log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return math.exp(total / count)


@torch.no_grad()
def mean_kl(reference: nn.Module, model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(p_reference || p_model) for the next-token distributions (nats)."""
    total, count = 0.0, 0
    for ids in batches:
        ref = _log_probs(reference, ids)
        ours = _log_probs(model, ids).to(ref.device)
        total += (ref.exp() * (ref - ours)).sum().item()
        count += ref.shape[0] * ref.shape[1]
    return total / count


def mmlu_subjects(mmlu_dir: Path, few_shot: int) -> list[str]:
    """Subjects with a test CSV (and a dev CSV when few-shot examples are needed)."""
    mmlu_dir = Path(mmlu_dir)
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
            "include": str(_TEMPLATE),
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


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    *,
    mmlu_dir: Path | None = None,
    few_shot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """lm-eval results (its own result dict) for an in-memory model. ``mmlu`` uses ``mmlu_dir`` if given."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="autoq-tasks-") as include:
        names = list(tasks)
        if mmlu_dir is not None and "mmlu" in names:
            write_mmlu_tasks(Path(mmlu_dir), few_shot or 0, Path(include))
            names[names.index("mmlu")] = MMLU_GROUP
        manager = TaskManager(include_path=include)
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
        try:
            results = lm_eval.simple_evaluate(
                model=wrapped, tasks=names, num_fewshot=few_shot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=0, verbosity="ERROR",
            )  # fmt: skip
        except (KeyError, ValueError) as err:
            raise AutoqError(f"lm-eval could not run {names}: {err}") from None
    return results


def summarize_lm_eval(results: dict[str, Any]) -> dict[str, float]:
    """Flat metrics: ``<task>_<metric>`` for every group and top-level task (accuracy first)."""
    flat = {}
    groups = set(results.get("groups", {}))
    for task, metrics in {**results.get("results", {}), **results.get("groups", {})}.items():
        if task.startswith(f"{MMLU_GROUP}_") and task not in groups:
            continue  # per-subject rows stay in the raw results
        name = "mmlu" if task == MMLU_GROUP else task
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and metric not in ("sample_len", "alias") and not metric.endswith("_stderr") and filt in ("none", ""):
                flat[f"{name}_{metric}"] = float(value)
    return flat
