"""Local copies of lm-eval's datasets, read into the hub datasets' own schema.

lm-eval calls these as ``custom_dataset`` with the task's metadata, where autoq puts
``eval_data`` (the ``--eval-data`` directory). Each returns a ``DatasetDict`` whose columns are
those of the hub dataset lm-eval's own task reads, so the task YAMLs next to this file keep
lm-eval 0.4.13's prompts, targets and metrics unchanged.

Layout under ``eval_data`` (see evals/README.md):
  wikitext2/wiki.test.raw                 WikiText-2 raw test split, non-empty lines (CRLF allowed)
  lambada/lambada_test.jsonl              LAMBADA, OpenAI variant: {"text": ...}
  arc_easy/ARC-Easy-Test.jsonl            ARC-Easy, AI2 layout: {id, question: {stem, choices}, answerKey}
  piqa/valid.jsonl, piqa/valid-labels.lst PIQA validation: {goal, sol1, sol2} + one label per line
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import datasets

# lm-eval's own WikiText functions: the same detokenizer and word/byte counts as its `wikitext` task.
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results  # noqa: F401
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa: F401

FILES = {
    "wikitext2": ["wikitext2/wiki.test.raw"],
    "lambada": ["lambada/lambada_test.jsonl"],
    "arc_easy": ["arc_easy/ARC-Easy-Test.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
}
# A WikiText article starts at a top-level heading " = Title = " (sections are " = = Section = = ").
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def _root(eval_data: str | None) -> Path:
    if not eval_data:
        raise ValueError("no eval_data directory in the task metadata (autoq passes --eval-data / $AUTOQ_EVAL_DATA)")
    return Path(eval_data)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def wikitext_articles(text: str) -> list[str]:
    """The articles of a WikiText raw file, each as its lines joined with "\\n" (CRLF -> LF).

    The file holds only non-empty lines; the hub's document-level copy
    (EleutherAI/wikitext_document_level) also keeps the " " lines between paragraphs, so its
    pages have a few more bytes (and newline tokens) than these; word counts are the same.
    """
    articles: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if _ARTICLE_HEADING.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(f"{line}\n" for line in lines) for lines in articles]


def wikitext2(eval_data: str | None = None, **_: Any) -> datasets.DatasetDict:
    text = (_root(eval_data) / FILES["wikitext2"][0]).read_text(encoding="utf-8")
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"page": wikitext_articles(text)})})


def lambada(eval_data: str | None = None, **_: Any) -> datasets.DatasetDict:
    rows = _jsonl(_root(eval_data) / FILES["lambada"][0])
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [r["text"] for r in rows]})})


def arc_item(item: dict[str, Any]) -> dict[str, Any]:
    """An AI2 ARC item in the hub's allenai/ai2_arc schema (3 to 5 choices, letter or numeric labels)."""
    choices = item["question"]["choices"]
    return {
        "id": item["id"], "question": item["question"]["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": item["answerKey"],
    }  # fmt: skip


def arc_easy(eval_data: str | None = None, **_: Any) -> datasets.DatasetDict:
    items = _jsonl(_root(eval_data) / FILES["arc_easy"][0])
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([arc_item(i) for i in items])})


def piqa(eval_data: str | None = None, **_: Any) -> datasets.DatasetDict:
    root = _root(eval_data)
    rows = _jsonl(root / FILES["piqa"][0])
    labels = [int(line) for line in (root / FILES["piqa"][1]).read_text().split()]
    if len(labels) != len(rows):
        raise ValueError(f"{root / 'piqa'}: {len(rows)} questions but {len(labels)} labels")
    docs = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label} for r, label in zip(rows, labels)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})
