"""Where fine-tuning data come from, offline: local paths told from hub names as
`datasets.load_dataset` tells them, a local dataset repository (README dataset card with
configurations) named like a hub dataset, its configurations and splits, and labels a task cannot
use refused in one line."""

import json

import pytest

from rpp_triton.data.sources import DataOptions, load_raw, locate
from rpp_triton.data.tasks import load_task
from rpp_triton.errors import UsageError


@pytest.fixture
def repo(tmp_path, monkeypatch, write_glue_repo):
    """`myorg/glue-copy` in the working directory, as a hub dataset would be cloned."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_glue_repo(tmp_path / "myorg" / "glue-copy")
    return "myorg/glue-copy"


def test_locate_tells_paths_from_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text,label\na,1\n")
    (tmp_path / "folder").mkdir()
    assert locate("data.csv") == "file" and locate("folder") == "dir"
    for name in ("imdb", "nyu-mll/glue", "Salesforce/wikitext"):
        assert locate(name) == "hub", name
    for name in ("missing.csv", "org/missing.jsonl", "./folder2", "../x", "/abs/path", "a/b/c", "~/data"):
        with pytest.raises(UsageError, match="does not exist"):
            locate(name)


def test_hub_names_are_refused_offline_as_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"'Salesforce/wikitext' is not a local path and the hub is offline"):
        load_raw("Salesforce/wikitext", "wikitext-2-raw-v1")
    with pytest.raises(UsageError, match="offline.*pass --train-file"):
        load_task(DataOptions(task="sst2"))


def test_local_dataset_repository_with_configurations(repo):
    task = load_task(DataOptions(task="sst2", dataset=repo, dataset_config="sst2"))
    assert task.spec.name == "sst2" and len(task.train) == 20 and len(task.eval) == 6
    assert task.label_names == ["0", "1"] and task.train[0] == {"text": "s0", "text_pair": None, "label": 0}
    # no validation split: every 5th training row is held out
    stsb = load_task(DataOptions(task="stsb", dataset=repo, dataset_config="stsb"))
    assert len(stsb.train) == 12 and len(stsb.eval) == 3 and stsb.eval[0]["label"] == 1.0
    swapped = load_task(DataOptions(task="sst2", dataset=repo, dataset_config="sst2", split="validation"))
    assert len(swapped.train) == 6
    with pytest.raises(UsageError, match=r"has no split 'dev' \(splits: train, validation\)"):
        load_task(DataOptions(task="sst2", dataset=repo, dataset_config="sst2", validation_split="dev"))
    with pytest.raises(UsageError, match="cannot load dataset 'myorg/glue-copy'.*'nope' not found"):
        load_task(DataOptions(task="sst2", dataset=repo, dataset_config="nope"))


def test_dataset_options_that_contradict_each_other(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\na,1\n")
    with pytest.raises(UsageError, match="alternatives"):
        DataOptions(dataset="org/name", train_file=str(path))
    with pytest.raises(UsageError, match="--split names part of a dataset"):
        DataOptions(train_file=str(path), split="train")
    with pytest.raises(UsageError, match="does not exist"):
        DataOptions(train_file=str(tmp_path / "missing.csv"))


def write_jsonl(path, labels):
    path.write_text(
        "".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n" for i, lab in enumerate(labels))
    )
    return str(path)


@pytest.mark.parametrize("bad", ["yes", "", None], ids=["word", "empty", "null"])
def test_regression_needs_numeric_labels(tmp_path, bad):
    labels = [0.5, 1.5, 2.0, 3.0, 1.0] * 2
    labels[3] = bad
    path = write_jsonl(tmp_path / "t.jsonl", labels)
    if bad is None:  # a missing label drops the row
        task = load_task(DataOptions(train_file=path, regression=True))
        assert len(task.train) + len(task.eval) == 9
        return
    with pytest.raises(UsageError, match=f"regression needs numeric labels, got {bad!r}"):
        load_task(DataOptions(train_file=path, regression=True))


def test_binary_f1_tasks_need_0_1_labels(tmp_path, write_rows):
    path = tmp_path / "mrpc.csv"
    rows = [
        {"sentence1": f"a{i}", "sentence2": "b", "label": ["equivalent", "different"][i % 2]}
        for i in range(10)
    ]
    write_rows(path, rows)
    with pytest.raises(UsageError, match="mrpc reports the F1 of the positive class, label 1"):
        load_task(DataOptions(task="mrpc", train_file=str(path)))
    with pytest.raises(UsageError, match="--regression does not apply to sst2"):
        load_task(DataOptions(task="sst2", train_file=str(path), regression=True))
