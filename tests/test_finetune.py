"""`rpp-triton finetune` on a tiny random BERT: the masks of a pruned model stay exactly as they
were, local files with string labels, and unknown tasks refused in one line."""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from finetune_helpers import eager_single_thread, fails  # noqa: E402, F401
from tiny_bert import write_task_csv, write_task_jsonl, write_text, write_tiny_bert  # noqa: E402

from rpp_triton.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    return {
        "root": root,
        "model": write_tiny_bert(root / "model"),
        "task": write_task_csv(root / "task.csv", 80),
        "jsonl": write_task_jsonl(root / "task.jsonl", 40),
    }


@pytest.fixture(scope="module")
def pruned(files):
    """A model pruned to 60% of its 8x8 tiles."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RPP_TRITON_COMPILE", "0")
    out = files["root"] / "pruned"
    text = write_text(files["root"] / "text.txt", 240)
    argv = ["prune", "--model", files["model"], "--dataset", text, "--output-dir", str(out)]
    argv += ["--max-steps", "30", "--target-sparsity", "0.6", "--block-size", "8x8", "--seq-len", "32"]
    assert main([*argv, "--batch-size", "8", "--dense-reference", "none"]) == 0
    mp.undo()
    return out


def test_finetune_keeps_masks(files, pruned, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "ft"
    argv = ["finetune", "--model", str(pruned), "--train-file", files["task"], "--text-column", "sentence"]
    argv += ["--output-dir", str(out), "--max-steps", "12", "--max-length", "32", "--batch-size", "8"]
    assert main(argv) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    # 256 tiles of 8x8: the target rounds to 154 of them
    assert report["sparsity_before"] == report["sparsity_after"] == 154 / 256
    assert set(report["metrics"]) >= {"accuracy", "macro_f1"}
    before = load_file(pruned / "model.safetensors")
    after = AutoModelForSequenceClassification.from_pretrained(out)
    changed = 0
    for name, w in after.named_parameters():
        if ".layer." not in name or w.dim() != 2:
            continue
        old = before["bert." + name.removeprefix("bert.")]
        assert torch.equal(w == 0, old == 0), name
        changed += int(not torch.equal(w, old))
    assert changed > 0  # training did move the kept weights


def test_finetune_local_jsonl_with_string_labels(files, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--output-dir", str(out)]
    assert main([*argv, "--max-steps", "4", "--max-length", "32"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["labels"] == ["no", "yes"]
    assert report["sparsity_before"] == report["sparsity_after"] == 0.0


def test_unknown_task(files, tmp_path, capsys):
    fails(
        ["finetune", "--model", files["model"], "--task", "nope", "--output-dir", str(tmp_path / "o")],
        capsys,
        "nope",
    )
