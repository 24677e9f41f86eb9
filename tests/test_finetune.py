"""`rpp-triton finetune` on a tiny random BERT: the masks of a pruned model stay exactly as they
were, local files with string labels, and unknown tasks refused in one line."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from rpp_triton.cli import main

pytestmark = pytest.mark.usefixtures("eager_single_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_bert_dir, write_task_csv, write_task_jsonl):
    root = tmp_path_factory.mktemp("finetune")
    files = {"root": root, "model": tiny_bert_dir}
    files["task"] = write_task_csv(root / "task.csv", 80)
    files["jsonl"] = write_task_jsonl(root / "task.jsonl", 40)
    return files


@pytest.fixture(scope="module")
def pruned(files, write_text):
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


def test_unknown_task(files, tmp_path, fails):
    fails(
        ["finetune", "--model", files["model"], "--task", "nope", "--output-dir", str(tmp_path / "o")],
        "nope",
    )


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if a task model starts loading: the errors under test must come first."""
    from rpp_triton.training import finetune as FT

    def never(*args, **kwargs):
        raise AssertionError("a model started loading")

    monkeypatch.setattr(FT._Classification, "model", never)
    monkeypatch.setattr(FT._QuestionAnswering, "model", never)


def test_bad_options_fail_in_one_line_before_any_work(files, tmp_path, fails, no_heavy_work):
    out = tmp_path / "out"
    base = ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--output-dir", str(out)]
    fails([*base, "--epochs", "nan"], "--epochs must be a finite number")
    fails([*base, "--lr", "inf"], "--lr must be a finite number")
    fails([*base, "--max-length", "100000"], "--max-length 100000", "64 positions")
    fails([*base, "--regression"], "regression needs numeric labels, got 'yes'")
    fails([*base, "--warmup-ratio", "1.5"], "--warmup-ratio")
    fails([*base, "--lr_scheduler_type", "sometimes"], "sometimes is not a valid SchedulerType")
    fails([*base, "--report_to", "carrier-pigeon"], "carrier-pigeon is not supported")
    fails([*base, "--bf16", "--fp16"], "alternatives")
    fails([*base, "--task", "squad", "--text-column", "body"], "--text-column does not apply")
    fails([*base, "--doc-stride", "8"], "--doc-stride does not apply")
    if not torch.cuda.is_available():
        fails([*base, "--fp16"], "--fp16 needs a CUDA device")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unwritable_output_directory(files, tmp_path, fails, no_heavy_work):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    base = ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--output-dir"]
    fails([*base, str(a_file / "out")], "which is a file")
    fails([*base, "/proc/rpp-finetune-out"], "/proc")


@pytest.mark.parametrize("block", [[0, 0], "16", [-16, 16]], ids=str)
def test_bad_block_size_in_the_source_report(files, tmp_path, fails, monkeypatch, block):
    import shutil

    from rpp_triton.training import finetune as FT

    def never(*args, **kwargs):
        raise AssertionError("the data started loading")

    monkeypatch.setattr(FT, "load_task", never)
    src = tmp_path / "pruned"
    shutil.copytree(files["model"], src)
    (src / "rpp_report.json").write_text(json.dumps({"sparsity": 0.5, "block_size": block}))
    argv = [
        "finetune",
        "--model",
        str(src),
        "--train-file",
        files["jsonl"],
        "--output-dir",
        str(tmp_path / "o"),
    ]
    fails(argv, "block_size must be two positive integers")
    assert not (tmp_path / "o.partial").exists()


def test_transformers_flag_names_reach_training_arguments(files, tmp_path, capsys):
    from rpp_triton.training.finetune import saved_training_args

    out = tmp_path / "ft"
    argv = ["finetune", "--model_name_or_path", files["model"], "--train_file", files["jsonl"]]
    argv += ["--output_dir", str(out), "--learning_rate", "1e-3", "--per_device_train_batch_size", "4"]
    argv += ["--num_train_epochs", "1", "--max_steps", "3", "--weight_decay", "0.05", "--seed", "3"]
    argv += ["--gradient_accumulation_steps", "2", "--warmup_ratio", "0.2", "--lr_scheduler_type", "cosine"]
    assert main([*argv, "--report_to", "none", "--max_seq_length", "32"]) == 0
    saved = saved_training_args(str(out))
    want = {
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
        "max_steps": 3,
        "weight_decay": 0.05,
        "seed": 3,
        "gradient_accumulation_steps": 2,
        "warmup_steps": 0.2,
        "lr_scheduler_type": "cosine",
        "report_to": [],
    }
    assert {k: saved[k] for k in want} == want
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["steps"] == 3 and report["max_length"] == 32
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--lr LR, --learning_rate LR" in capsys.readouterr().out


def test_bf16_runs_the_model_in_bfloat16(files, tmp_path, monkeypatch):
    from rpp_triton.training import finetune as FT

    seen, load = [], FT._Classification.model

    def model_with_probe(self, name):
        model = load(self, name)
        model.classifier.register_forward_hook(lambda m, args, out: seen.append((m.training, out.dtype)))
        return model

    monkeypatch.setattr(FT._Classification, "model", model_with_probe)
    argv = ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--output-dir"]
    assert main([*argv, str(tmp_path / "ft"), "--max-steps", "2", "--max-length", "32", "--bf16"]) == 0
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}


def test_resume_refuses_other_seed_or_learning_rate(files, tmp_path, capsys, fails):
    run = tmp_path / "run"
    argv = ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--max-length", "32"]
    first = ["--output-dir", str(run), "--max-steps", "4", "--save-steps", "2", "--keep-checkpoints"]
    assert main([*argv, *first]) == 0
    capsys.readouterr()
    again = ["--output-dir", str(tmp_path / "again"), "--resume-from-checkpoint", str(run / "checkpoint-2")]
    fails([*argv, *again, "--seed", "1"], "different settings", "--seed 0 (now 1)")
    fails([*argv, *again, "--lr", "0.001"], "different settings", "--lr 0.0001 (now 0.001)")
    assert main([*argv, *again, "--max-steps", "4"]) == 0
    report = json.loads((tmp_path / "again" / "finetune_report.json").read_text())
    assert report["steps"] == 4


def test_glue_task_from_a_local_dataset_repository(
    files, tmp_path, monkeypatch, capsys, fails, write_glue_repo
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_glue_repo(tmp_path / "myorg" / "glue-copy")
    argv = ["finetune", "--model", files["model"], "--task", "sst2", "--dataset", "myorg/glue-copy"]
    argv += ["--dataset_config_name", "sst2", "--max-steps", "2", "--max-length", "16"]
    assert main([*argv, "--output-dir", "ft"]) == 0
    report = json.loads((tmp_path / "ft" / "finetune_report.json").read_text())
    assert report["task"] == "sst2" and report["train_examples"] == 20 and report["eval_examples"] == 6
    assert not (tmp_path / "runs").exists()  # logs stay inside the run directory
    capsys.readouterr()
    fails([*argv, "--output-dir", "o", "--split", "dev"], "has no split 'dev'")
    fails([*argv, "--output-dir", "o", "--dataset", "myorg/elsewhere"], "hub is offline")


class _Remove:
    """Unpickled by plain pickle, this would delete `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def test_training_args_are_read_without_running_the_pickle(tmp_path, caplog):
    import zipfile

    from rpp_triton.training.finetune import check_resume_settings, saved_training_args

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert saved_training_args(str(tmp_path)) is None  # no training_args.bin
    with zipfile.ZipFile(tmp_path / "training_args.bin", "w") as z:
        z.writestr("training_args/data.pkl", pickle.dumps(_Remove(str(precious)), protocol=2))
    saved_training_args(str(tmp_path))
    assert precious.read_text() == "keep me"
    (tmp_path / "training_args.bin").write_bytes(b"not a zip file")
    with caplog.at_level("WARNING"):
        check_resume_settings(str(tmp_path), targs=None)
    assert "settings are not checked" in caplog.text
