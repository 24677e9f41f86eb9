"""`prune`, `finetune` and `report` on bad input: one line on stderr, exit code 2, and nothing a
previous run wrote is lost."""

import json
import os

import pytest

from rpp_triton.cli import main

pytestmark = pytest.mark.usefixtures("eager_optimizer")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_bert_dir, write_text, write_task_csv, write_task_jsonl):
    root = tmp_path_factory.mktemp("cli")
    return {
        "root": root,
        "model": tiny_bert_dir,
        "text": write_text(root / "text.txt", 120),
        "task": write_task_csv(root / "task.csv", 40),
        "jsonl": write_task_jsonl(root / "task.jsonl", 40),
    }


def prune_argv(files, out, *extra):
    return ["prune", "--model", files["model"], "--dataset", files["text"], "--output-dir", str(out), *extra]


FAST = ["--max-steps", "8", "--seq-len", "32", "--batch-size", "8", "--dense-reference", "none"]


@pytest.mark.parametrize("command", ["prune", "finetune", "report"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: rpp-triton " + command in capsys.readouterr().out


@pytest.mark.parametrize("target", ["1.0", "-0.1", "1.5"])
def test_target_sparsity_outside_unit_interval(files, tmp_path, fails, target):
    fails(prune_argv(files, tmp_path / "o", "--target-sparsity", target), "--target-sparsity")


def test_missing_model_path(files, tmp_path, fails):
    argv = [
        "prune",
        "--model",
        str(tmp_path / "nope"),
        "--dataset",
        files["text"],
        "--output-dir",
        str(tmp_path / "o"),
    ]
    fails(argv, "does not exist")


def test_missing_dataset_path(files, tmp_path, fails):
    argv = ["prune", "--model", files["model"], "--dataset", str(tmp_path / "missing.txt")]
    fails([*argv, "--output-dir", str(tmp_path / "o")], "does not exist")


def test_hub_names_while_offline(files, tmp_path, fails, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "o")
    fails(["prune", "--model", "bert-base-uncased", "--output-dir", out], "offline")
    fails(["prune", "--model", files["model"], "--dataset", "wikitext", "--output-dir", out], "offline")
    fails(["finetune", "--model", files["model"], "--task", "sst2", "--output-dir", out], "offline")


def test_missing_text_and_label_columns(files, tmp_path, fails):
    out = str(tmp_path / "o")
    fails(prune_argv(files, out, "--dataset", files["task"], "--text-column", "body"), "'body'")
    base = ["finetune", "--model", files["model"], "--train-file", files["task"], "--output-dir", out]
    fails([*base, "--text-column", "body"], "'body'")
    fails([*base, "--text-column", "sentence", "--label-column", "gold"], "'gold'")
    assert not os.path.exists(out)


def test_bad_block_size_and_untileable_shapes(files, tmp_path, fails):
    fails(prune_argv(files, tmp_path / "o", "--block-size", "0"), "--block-size")
    fails(prune_argv(files, tmp_path / "o", "--block-size", "3x5"), "block_size")


def test_output_dir_holding_another_run_is_refused_and_kept(files, tmp_path, fails):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    fails(prune_argv(files, out, *FAST), "--overwrite")
    fails(
        ["finetune", "--model", files["model"], "--train-file", files["jsonl"], "--output-dir", str(out)],
    )
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["precious.txt"]
    # With --overwrite the new run replaces the old one only once it is complete.
    assert main(prune_argv(files, out, *FAST, "--overwrite")) == 0
    assert (out / "rpp_report.json").is_file() and not (out / "precious.txt").exists()


def test_interrupted_run_is_refused(files, tmp_path, fails):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "checkpoint-4").mkdir()
    fails(prune_argv(files, out, *FAST), "--resume-from-checkpoint")
    assert (partial / "checkpoint-4").is_dir()


@pytest.fixture(scope="module")
def checkpoint(files):
    mp = pytest.MonkeyPatch()
    mp.setenv("RPP_TRITON_COMPILE", "0")
    out = files["root"] / "ckpt-run"
    assert main(prune_argv(files, out, *FAST, "--save-steps", "4", "--keep-checkpoints")) == 0
    mp.undo()
    return out / "checkpoint-4"


DAMAGES = [
    "truncated optimizer",
    "missing optimizer",
    "bad trainer state",
    "empty trainer state",
    "truncated rng state",
    "controller missing keys",
    "controller wrong types",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_corrupt_or_partial_checkpoint(files, checkpoint, tmp_path, fails, damage):
    import shutil

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(checkpoint, ckpt)
    if damage == "truncated optimizer":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif damage == "missing optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif damage == "bad trainer state":
        (ckpt / "trainer_state.json").write_text("{not json")
    elif damage == "empty trainer state":
        (ckpt / "trainer_state.json").write_text("{}")
    elif damage == "truncated rng state":
        data = (ckpt / "rng_state.pth").read_bytes()
        (ckpt / "rng_state.pth").write_bytes(data[:100])
    else:
        state = json.loads((ckpt / "rpp_controller.json").read_text())
        if damage == "controller missing keys":
            del state["lam"]
        else:
            state["hard_pruned"] = "no"
        (ckpt / "rpp_controller.json").write_text(json.dumps(state))
    argv = prune_argv(files, tmp_path / "o", *FAST, "--resume-from-checkpoint", str(ckpt))
    fails(argv, "checkpoint")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change", [("--target-sparsity", "0.3"), ("--seed", "7"), ("--lr", "0.001")])
def test_resume_with_different_settings(files, checkpoint, tmp_path, fails, change):
    argv = prune_argv(files, tmp_path / "o", *FAST, *change, "--resume-from-checkpoint")
    fails([*argv, str(checkpoint)], "different settings")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("flag", ["--lr", "--target-sparsity", "--temperature", "--reweight-eps", "--ramp"])
def test_nan_flags_are_refused(files, tmp_path, fails, flag):
    fails(prune_argv(files, tmp_path / "o", *FAST, flag, "nan"), flag)
    assert not (tmp_path / "o.partial").exists()


def test_bad_prune_flags(files, tmp_path, fails):
    out = tmp_path / "o"
    fails(prune_argv(files, out, *FAST, "--logging-steps", "0"), "--logging-steps")
    fails(prune_argv(files, out, *FAST, "--method", "oneshot", "--recovery-steps", "0"), "oneshot")
    (tmp_path / "file").write_text("x")
    fails(prune_argv(files, tmp_path / "file" / "o", *FAST), "which is a file")
    fails(prune_argv(files, "/proc/rpp-out", *FAST), "cannot write")
    assert not out.exists() and not out.with_suffix(".partial").exists()


def test_teacher_that_does_not_fit(files, tmp_path, fails, write_tiny_bert):
    fails(prune_argv(files, tmp_path / "o", *FAST, "--teacher", str(tmp_path / "none")), "does not exist")
    wide = write_tiny_bert(tmp_path / "wide", hidden_size=48)
    fails(prune_argv(files, tmp_path / "o", *FAST, "--teacher", wide), "hidden size")
    assert not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_model_directory_without_tokenizer_files(files, tmp_path, fails, command):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(files["model"], bare)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    argv = prune_argv(files, tmp_path / "o", *FAST, "--model", str(bare))
    if command == "finetune":
        argv = ["finetune", "--model", str(bare), "--output-dir", str(tmp_path / "o"), "--max-steps", "2"]
    fails(argv, "no tokenizer files")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_report_on_missing_or_empty_dir(tmp_path, fails):
    fails(["report", str(tmp_path / "none")], "does not exist")
    fails(["report", str(tmp_path)], "safetensors")


def test_report_refuses_untileable_block_and_unwritable_png(files, tmp_path, fails):
    fails(["report", files["model"], "--block-size", "7"], "7x7 tiles do not divide")
    fails(["report", files["model"], "--png", "/proc/rpp-tiles.png"], "cannot write")
    fails(["report", files["model"], "--png", str(tmp_path)], "is a directory")
