"""`finetune` and `evaluate` for question answering end to end on a tiny BERT: local SQuAD files on
a pruned model, the offline pydoc-qa set (a few hundred steps must beat the untrained start), and
bad input refused in one line before any work."""

import collections
import json
import os

import numpy as np
import pytest
import torch

from rpp_triton.cli import main
from rpp_triton.qa.data import pydoc_qa
from rpp_triton.qa.features import prepare_train_features

pytestmark = pytest.mark.usefixtures("eager_single_thread")


def squad_json(rows, extra_paragraphs=()) -> dict:
    """Rows back into SQuAD's nested format (one paragraph per context), plus raw extra entries."""
    by_context = collections.defaultdict(list)
    for r in rows:
        answers = [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
        ]
        qa = {"id": r["id"], "question": r["question"], "answers": answers}
        if not answers:
            qa["is_impossible"] = True
        by_context[r["context"]].append(qa)
    paragraphs = [{"context": c, "qas": qas} for c, qas in by_context.items()]
    paragraphs += list(extra_paragraphs)
    return {"version": "test", "data": [{"title": "t", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, qa_bert_dir):
    root = tmp_path_factory.mktemp("qa")
    train, held = pydoc_qa(version_2=True)
    (root / "train.json").write_text(json.dumps(squad_json(train[:120])))
    (root / "dev.json").write_text(json.dumps(squad_json(held[:30])))
    return {
        "root": root,
        "model": qa_bert_dir,
        "train": str(root / "train.json"),
        "dev": str(root / "dev.json"),
        "dev_rows": held[:30],
    }


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


def test_cli_bad_input(tiny, tmp_path, fails, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [}')
    out = str(tmp_path / "out")
    base = ["finetune", "--model", tiny["model"], "--output-dir", out]
    fails([*base, "--task", "squad", "--train-file", str(bad)], "malformed JSON")
    fails([*base, "--task", "squad", "--train-file", str(tmp_path / "nope.json")], "does not exist")
    empty = tmp_path / "empty.json"
    empty.write_text(
        json.dumps(
            {
                "data": [
                    {"paragraphs": [{"context": "", "qas": [{"id": "1", "question": "Q?", "answers": []}]}]}
                ]
            }
        )
    )
    fails([*base, "--task", "squad", "--train-file", str(empty)], "no usable questions", "empty context")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fails([*base, "--task", "squad_v2"], "offline", "--train-file")
    fails(["evaluate", str(tmp_path / "missing"), "--task", "squad"], "does not exist")
    fails(["evaluate", tiny["model"], "--task", "squad3"], "unknown question-answering task")
    fails(
        ["evaluate", tiny["model"], "--task", "squad", "--validation-file", str(bad)],
        "malformed JSON",
    )
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


# ---- end to end -------------------------------------------------------------------------------


def test_finetune_squad_v2_local_files_on_pruned_model_then_evaluate(tiny, tmp_path, write_text):
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    text = write_text(tmp_path / "text.txt", 120)
    argv = ["prune", "--model", tiny["model"], "--dataset", text, "--output-dir", str(pruned)]
    assert (
        main([*argv, "--max-steps", "12", "--target-sparsity", "0.5", "--seq-len", "32", "--batch-size", "8"])
        == 0
    )

    out = tmp_path / "qa"
    argv = ["finetune", "--task", "squad_v2", "--model", str(pruned), "--train-file", tiny["train"]]
    argv += ["--validation-file", tiny["dev"], "--output-dir", str(out), "--max-length", "64"]
    assert main([*argv, "--max-steps", "6", "--batch-size", "8", "--logging-steps", "3"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["task"] == "squad_v2" and report["version_2"] is True
    assert report["sparsity_before"] == report["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    assert report["steps"] == 6 and report["eval_examples"] == len(tiny["dev_rows"])
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(report["metrics"])
    masks_before, after = load_file(pruned / "rpp_masks.safetensors"), load_file(out / "model.safetensors")
    for name, mask in masks_before.items():
        assert torch.equal(after[name] != 0, mask.bool()), name

    # evaluate scores the saved model the same way, without training
    result = tmp_path / "eval.json"
    argv = [
        "evaluate",
        str(out),
        "--task",
        "squad_v2",
        "--validation-file",
        tiny["dev"],
        "--max-length",
        "64",
    ]
    assert main([*argv, "--output", str(result)]) == 0
    scored = json.loads(result.read_text())
    for key in ("exact", "f1", "best_f1"):
        assert scored["metrics"][key] == pytest.approx(report["metrics"][key])
    # questions too long for a 64-token window are counted, and scored as unanswered
    too_long = scored["skipped"].get("question_too_long", 0)
    assert set(scored["predictions"]) <= {r["id"] for r in tiny["dev_rows"]}
    assert len(scored["predictions"]) + too_long == len(tiny["dev_rows"])


def heldout_loss(model_dir, tokenizer, examples, max_length=128, stride=42) -> float:
    """Mean start/end cross-entropy over the windows of `examples` (seeded head for a fresh model)."""
    from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, set_seed

    set_seed(0)  # the seed finetune uses, so a fresh head starts where the run started
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    features = prepare_train_features(tokenizer, examples, max_length, stride, collections.Counter())
    collate, losses = DataCollatorWithPadding(tokenizer), []
    with torch.no_grad():
        for at in range(0, len(features), 64):
            losses.append(float(model(**collate(features[at : at + 64])).loss))
    return float(np.mean(losses))


def test_finetune_offline_pydoc_qa_improves_over_start(tiny, tokenizer, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--task", "pydoc-qa", "--model", tiny["model"], "--output-dir", str(out)]
    argv += ["--max-length", "128", "--max-steps", "200", "--batch-size", "16", "--lr", "1e-3"]
    assert main([*argv, "--logging-steps", "50"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    before, after = report["metrics_before"], report["metrics"]
    assert before["total"] == after["total"] == report["eval_examples"]
    # A random 2-layer BERT learns slowly from ~600 questions; exact match must rise, and the held-out
    # span loss (a smoother measure of the same thing) must fall clearly.
    assert after["exact"] > before["exact"], (before, after)
    _, held = pydoc_qa()
    start, end = heldout_loss(tiny["model"], tokenizer, held), heldout_loss(str(out), tokenizer, held)
    assert end < 0.8 * start, (start, end)


def test_evaluate_refuses_bad_options_before_scoring(tiny, tmp_path, fails, monkeypatch):
    from rpp_triton.training import finetune as FT

    def never(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(FT, "evaluate_qa", never)
    monkeypatch.setattr(FT._QuestionAnswering, "model", never)
    base = ["evaluate", tiny["model"], "--task", "squad_v2", "--validation-file", tiny["dev"]]
    fails([*base, "--output", "/proc/scores.json"], "cannot write", "/proc")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    fails([*base, "--output", str(a_file / "scores.json")], "which is a file")
    fails([*base, "--output", str(tmp_path)], "is a directory")
    fails([*base, "--max-length", "100000"], "--max-length 100000", "128 positions")
    fails([*base, "--null-threshold", "nan"], "--null-threshold")
    fails([*base, "--max-length", "64", "--doc-stride", "32"], "--doc-stride")
    fails([*base, "--max-answer-length", "0"], "--max-answer-length")
    assert not list(tmp_path.glob("*.partial"))
