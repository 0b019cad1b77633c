"""The evaluation stage: a model against its BF16 reference, on proxies and lm-eval tasks.

``evaluate`` is the one function that measures a model; ``autoq eval`` and every sweep row call it.
* ``ppl`` / ``kl`` (``perplexity``, ``mean_kl``) run on held-out tokens: the slice right after the
  calibration tokens, so no benchmark data is needed. ``kl`` is measured the same way for every
  model, the BF16 one included (against itself it comes out ~0), never filled in.
* Every other task goes to lm-eval (``autoq.lm_tasks``): the offline suite ``wikitext2, lambada,
  arc_easy, piqa, mmlu`` from ``--eval-data DIR`` / ``$AUTOQ_EVAL_DATA``, else lm-eval's hub tasks.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoq.data import TokenData, load_tokens
from autoq.errors import AutoqError
from autoq.lm_tasks import TaskRequest, check_requests, parse_task, run_lm_eval, summarize
from autoq.model import DTYPES

PROXY_TASKS = ("ppl", "kl")  # computed by autoq itself; every other task name goes to lm-eval


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


@dataclass(frozen=True)
class EvalSpec:
    """What to measure: proxies and lm-eval tasks, and how."""

    proxies: tuple[str, ...] = PROXY_TASKS
    lm_tasks: tuple[TaskRequest, ...] = ()
    eval_data: Path | None = None  # the offline suite's data directory; None: lm-eval's hub tasks
    default_shots: int | None = None  # few-shot count of lm-eval tasks that do not say (``mmlu:5`` does)
    limit: int | None = None  # lm-eval documents per task (per MMLU subject)
    batch_size: int = 8
    max_length: int | None = None  # lm-eval's longest input (WikiText windows); None: the model's context

    @classmethod
    def parse(cls, tasks: str | list[str], eval_data: str | Path | None = None, **options: Any) -> EvalSpec:
        """From ``--tasks`` (comma list) and ``--eval-data`` (else ``$AUTOQ_EVAL_DATA``); checks both."""
        from autoq.default_model import offline

        names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        if not names:
            raise AutoqError("--tasks is empty")
        requests = tuple(parse_task(n) for n in names if n not in PROXY_TASKS)
        data = eval_data or os.environ.get("AUTOQ_EVAL_DATA") or None
        if data is not None:
            data = Path(data).expanduser().resolve()
            if not data.is_dir():
                raise AutoqError(f"eval data directory {data} does not exist (--eval-data / $AUTOQ_EVAL_DATA)")
        if requests:
            check_requests(list(requests), data, offline(), options.get("default_shots"))
        return cls(proxies=tuple(n for n in PROXY_TASKS if n in names), lm_tasks=requests, eval_data=data, **options)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    lm_eval: list[dict[str, Any]] = field(default_factory=list)  # lm-eval's raw results, one entry per few-shot setting


def evaluate(
    model: nn.Module, reference: nn.Module | None, tokenizer, heldout: TokenData | None, spec: EvalSpec
) -> Evaluation:
    """Measure ``model``: ``ppl`` and ``kl`` (to ``reference``) on ``heldout``, then the lm-eval tasks."""
    metrics: dict[str, float] = {}
    if spec.proxies and heldout is None:
        raise AutoqError(f"{', '.join(spec.proxies)} need held-out tokens")
    batches = heldout.batches(spec.batch_size) if heldout is not None else []
    if "ppl" in spec.proxies:
        metrics["ppl"] = perplexity(model, batches)
    if "kl" in spec.proxies:
        if reference is None:
            raise AutoqError("kl needs the BF16 reference model")
        metrics["kl"] = mean_kl(reference, model, batches)
    runs = []
    if spec.lm_tasks:
        runs = run_lm_eval(model, tokenizer, list(spec.lm_tasks), eval_data=spec.eval_data, default_shots=spec.default_shots,
                           limit=spec.limit, batch_size=spec.batch_size, max_length=spec.max_length)  # fmt: skip
        metrics.update(summarize(runs))
    return Evaluation(metrics, runs)


def heldout_tokens(calibration: TokenData, tokenizer, samples: int) -> TokenData:
    """``samples`` sequences of the calibration length, from the same source right after the calibration slice."""
    calib_samples, seq_len = calibration.tokens.shape
    return load_tokens(calibration.source, tokenizer, samples, seq_len, skip_samples=calib_samples, purpose="held-out evaluation")


def check_checkpoint_dir(path: Path) -> Path:
    if not (Path(path) / "config.json").is_file():
        what = "does not exist" if not Path(path).exists() else "has no config.json"
        raise AutoqError(f"checkpoint {path} {what} (expected a directory written by autoq apply / search --export)")
    return Path(path)


def evaluate_target(
    work, spec: EvalSpec, *, plan_paths: Sequence[Path] = (), checkpoint: Path | None = None, eval_samples: int = 32,
    dtype: str = "bfloat16", device: str = "cpu", progress: bool = True,
) -> list[dict[str, Any]]:
    """``autoq eval``: the model of ``work`` itself, one or more plans applied to it, or an exported
    checkpoint, evaluated against ``work``'s model. Returns one result record (metrics, what was
    measured) per plan, or one for the checkpoint or the model itself.

    Several plans share one ``SwitchableModel``: each format is calibrated and applied once, and a
    plan only switches modules, which measures each plan exactly as ``--plan`` alone does."""
    from autoq.pipeline import ensure_model
    from autoq.plan import load_plan

    plans = [load_plan(p) for p in plan_paths]
    if checkpoint is not None:
        check_checkpoint_dir(checkpoint)
    heldout = heldout_tokens(work.calibration, work.tokenizer, eval_samples) if spec.proxies else None
    reference = ensure_model(work, dtype, device) if (checkpoint is None or "kl" in spec.proxies) else None

    def record(model: nn.Module, plan_path: Path | None) -> dict[str, Any]:
        result = evaluate(model, reference, work.tokenizer, heldout, spec)
        return {
            "model": work.model_info(), "plan": str(plan_path) if plan_path else None,
            "checkpoint": str(checkpoint) if checkpoint else None, "metrics": result.metrics,
            "heldout": heldout.describe() if heldout is not None else None, "eval_data": str(spec.eval_data) if spec.eval_data else None,
            "limit": spec.limit, "max_length": spec.max_length, "lm_eval": result.lm_eval,
        }  # fmt: skip

    if len(plans) > 1:
        switchable = _switchable_for(plans, plan_paths, reference, work.calibration.batches(spec.batch_size), "kl" in spec.proxies, progress)
        return [record(switchable.use(plan.formats()), path) for plan, path in zip(plans, plan_paths)]
    if plans:
        from autoq.apply import apply_plan
        from autoq.formats import get_kv_cache_format

        model = apply_plan(copy.deepcopy(reference), plans[0].formats(), work.calibration.batches(spec.batch_size), progress=progress,
                           kv_cache=get_kv_cache_format(plans[0].kv_cache))  # fmt: skip
    elif checkpoint is not None:
        from autoq.checkpoint import load_fake_quant_model

        model = load_fake_quant_model(checkpoint, device=device, dtype=DTYPES[dtype])
        if reference is not None and model.config.vocab_size != reference.config.vocab_size:
            raise AutoqError(f"checkpoint {checkpoint} has a vocabulary of {model.config.vocab_size}, the reference model "
                             f"{work.source.name} {reference.config.vocab_size}: pass the --model it was made from")  # fmt: skip
    else:
        model = reference
    return [record(model, plan_paths[0] if plans else None)]


def _switchable_for(plans: list, plan_paths: Sequence[Path], reference: nn.Module, calib_batches: list[torch.Tensor], keep_reference: bool,
                    progress: bool):  # fmt: skip
    """One ``SwitchableModel`` whose layers can take every format any of ``plans`` gives them."""
    from autoq.measure import SwitchableModel

    if any(plan.kv_cache for plan in plans):
        raise AutoqError("plans with a kv_cache are evaluated one at a time (pass a single --plan)")
    formats = [plan.formats() for plan in plans]
    for plan_formats, path in zip(formats[1:], plan_paths[1:]):
        if plan_formats.keys() != formats[0].keys():
            raise AutoqError(f"plan {path} plans other layers than {plan_paths[0]}: compare plans made for the same model and space")
    candidates = {name: sorted({f[name] for f in formats}) for name in formats[0]}
    return SwitchableModel(copy.deepcopy(reference) if keep_reference else reference, candidates, calib_batches, progress=progress)
