"""The offline lm-eval suite: lm-eval's own task definitions on local files, known answers, counts, bad input."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from autoq.cli import main
from conftest import SHARED_DATA
from autoq.lm_tasks import LOCAL_TASKS_DIR, MMLU_GROUP, SUITE, write_mmlu_tasks

FIXTURE_DATA = Path(__file__).parent / "fixtures" / "eval_data"
FAST = ["--calib-samples", "4", "--seq-len", "64", "--eval-samples", "2", "--no-progress"]
# Our task -> the lm-eval 0.4.13 task YAML it follows (site-packages/lm_eval/tasks/...).
LM_EVAL_YAML = {"wikitext2": "wikitext/wikitext.yaml", "lambada": "lambada/lambada_openai.yaml",
                "arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml"}  # fmt: skip


def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def load_tasks(eval_data: Path, names: list[str], few_shot: int = 0) -> dict:
    """lm-eval task objects for our suite names, reading ``eval_data``."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as generated:
        write_mmlu_tasks(eval_data / "mmlu", few_shot, Path(generated))
        manager = TaskManager(include_path=[str(LOCAL_TASKS_DIR), generated], include_defaults=False, metadata={"eval_data": str(eval_data)})
        loaded = manager.load([SUITE[n].local for n in names])
    return loaded["tasks"]


def _docs(task) -> list[dict]:
    return list(task.eval_docs)


@pytest.mark.parametrize("name", list(LM_EVAL_YAML))
def test_local_tasks_are_lm_evals_own_definitions(name: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(LOCAL_TASKS_DIR / f"{SUITE[name].local}.yaml")
    theirs = load_yaml(_lm_eval_tasks_dir() / LM_EVAL_YAML[name])
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_results", "metric_list"):
        a, b = ours.get(key), theirs.get(key)
        if callable(b):  # lm-eval's own function (WikiText's detokenizer and word/byte counts), not a copy
            assert (a.__name__, a.__code__.co_filename) == (b.__name__, b.__code__.co_filename), key
        else:
            assert a == b, key


def test_fixture_documents_give_the_known_answers() -> None:
    from lm_eval.utils import apply_template

    tasks = load_tasks(FIXTURE_DATA, list(SUITE))
    arc = tasks[SUITE["arc_easy"].local]
    (doc,) = _docs(arc)  # 3 choices, numeric labels "1".."3", answerKey "2"
    assert arc.doc_to_choice(doc) == ["iron", "water", "salt"] and arc.doc_to_target(doc) == 1
    assert arc.doc_to_text(doc) == "Question: Which of these is a liquid at room temperature?\nAnswer:"

    piqa = tasks[SUITE["piqa"].local]
    (doc,) = _docs(piqa)  # label from valid-labels.lst
    assert piqa.doc_to_target(doc) == 1 and piqa.doc_to_choice(doc)[1] == "Keep it in a closed bag in a cool place."

    lambada = tasks[SUITE["lambada"].local]
    (doc,) = _docs(lambada)
    assert lambada.doc_to_text(doc) == "She put the kettle on, took two cups from the shelf and poured the"
    assert lambada.doc_to_target(doc) == " tea"

    wikitext = tasks[SUITE["wikitext2"].local]
    first, second = _docs(wikitext)  # split at the top-level headings; CRLF read as LF
    assert first["page"].startswith(" = Test Article = \n The bridge is 1 @,@ 200") and "\r" not in first["page"]
    assert second["page"] == " = Second Article = \n A short second article , for the splitter . \n"
    assert wikitext.doc_to_target(first).startswith(" = Test Article =\nThe bridge is 1,200 metres long and was opened in 1901-02.")
    words, page_bytes = wikitext.process_results(first, [-10.0])["word_perplexity"][1], len(first["page"].encode())
    assert words == len(first["page"].split()) + 2 and page_bytes == wikitext.process_results(first, [-10.0])["byte_perplexity"][1]

    mmlu = tasks[f"{MMLU_GROUP}_elementary_mathematics"]
    (doc,) = _docs(mmlu)  # "What is 2 + 3?",4,6,5,7,C
    assert mmlu.doc_to_target(doc) == 2 and mmlu.doc_to_choice(doc) == ["A", "B", "C", "D"]
    # The same prompt lm-eval's hub MMLU task builds from the hub's schema (choices list, answer index).
    template = _lm_eval_mmlu_template()
    hub_doc = {"question": doc["question"], "choices": [doc[c] for c in "ABCD"], "answer": 2}
    assert mmlu.doc_to_text(doc) == apply_template(template["doc_to_text"], hub_doc) == "What is 2 + 3?\nA. 4\nB. 6\nC. 5\nD. 7\nAnswer:"


def _lm_eval_mmlu_template() -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_lm_eval_tasks_dir() / "mmlu" / "default" / "_default_template_yaml")


@pytest.mark.skipif(SHARED_DATA is None, reason="no ../shared/data (real evaluation data, see ../shared/README.md)")
def test_document_counts_equal_the_official_counts() -> None:
    tasks = load_tasks(SHARED_DATA, list(SUITE))
    assert len(_docs(tasks["autoq_arc_easy"])) == 2376  # ARC-Easy test
    assert len(_docs(tasks["autoq_piqa"])) == 1838  # PIQA validation
    assert len(_docs(tasks["autoq_lambada"])) == 5153  # LAMBADA (OpenAI) test
    assert len(_docs(tasks["autoq_wikitext2"])) == 62  # WikiText-2 test: 62 articles, as the hub's document-level split
    subjects = [t for name, t in tasks.items() if name.startswith(f"{MMLU_GROUP}_")]
    assert len(subjects) == 57 and sum(len(_docs(t)) for t in subjects) == 14042  # MMLU test
    arc_labels = {tuple(d["choices"]["label"]) for d in _docs(tasks["autoq_arc_easy"])}
    assert ("1", "2", "3", "4") in arc_labels and any(len(labels) in (3, 5) for labels in arc_labels)


def test_every_task_runs_end_to_end_on_the_synthetic_model(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "synthetic", "--tasks", "ppl,kl,wikitext2,lambada,arc_easy,piqa,mmlu,mmlu:5",
                 "--eval-data", str(FIXTURE_DATA), "--limit", "1", "--out", str(out), *FAST]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["model"]["synthetic"] is True
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the model against itself
    for key in ("wikitext2_word_perplexity", "wikitext2_byte_perplexity", "lambada_perplexity"):
        assert metrics[key] > 1.0, key
    for key in ("lambada_acc", "arc_easy_acc", "arc_easy_acc_norm", "piqa_acc", "piqa_acc_norm", "mmlu_acc", "mmlu_5shot_acc"):
        assert metrics[key] in (0.0, 1.0), key  # one document each
    assert [run["num_fewshot"] for run in result["lm_eval"]] == [None, 5]
    assert result["lm_eval"][1]["tasks"] == {"mmlu_5shot": MMLU_GROUP}


def test_task_requests_carry_their_own_shots_and_limits() -> None:
    from autoq.lm_tasks import TaskRequest, parse_task

    assert parse_task("mmlu:5@2") == TaskRequest("mmlu", 5, 2) and parse_task("mmlu:5@2").label == "mmlu_5shot"
    assert parse_task("arc_easy@300") == TaskRequest("arc_easy", None, 300)
    assert parse_task("piqa") == TaskRequest("piqa")


BAD = {
    "missing eval data directory": (["--tasks", "arc_easy", "--eval-data", "/no/such/data"], "eval data directory /no/such/data does not exist"),
    "eval data without the task's files": (["--tasks", "piqa", "--eval-data", "{empty}"], "has no piqa/valid.jsonl (needed by task piqa"),
    "unknown task": (["--tasks", "ppl,no_such_task"], "unknown task 'no_such_task'"),
    "bad few-shot count": (["--tasks", "mmlu:five"], "the few-shot count after ':' must be a whole number"),
    "bad document limit": (["--tasks", "arc_easy@0"], "the document limit after '@' must be a positive whole number"),
    "few-shot MMLU without dev/": (["--tasks", "mmlu:5", "--eval-data", "{no_dev}"], "5-shot needs dev/<subject>_dev.csv; missing for algebra"),
    "hub tasks offline": (["--tasks", "arc_easy"], "need the HuggingFace hub; offline, pass --eval-data DIR"),
    "missing checkpoint": (["--checkpoint", "/no/such/ckpt", "--tasks", "ppl"], "checkpoint /no/such/ckpt does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_eval_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tiny_llama: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_dev" / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "no_dev" / "mmlu" / "test" / "algebra_test.csv").write_text("What is 1 + 1?,1,2,3,4,B\n")
    argv, message = BAD[case]
    out = tmp_path / "out.json"
    argv = ["eval", "--model", str(tiny_llama), *[a.format(empty=tmp_path / "empty", no_dev=tmp_path / "no_dev") for a in argv],
            "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("autoq: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err) and not out.exists()
