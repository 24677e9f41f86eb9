"""Downstream classification and regression tasks `finetune` knows: GLUE by name (each with its
metric, from its hub dataset or any copy of it), local CSV/JSON files, any dataset with the columns
named, and the offline `pydoc-topics` task (which documentation topic a passage comes from). Labels
a task cannot score are refused in one line: non-numbers for regression, anything but 0/1 where the
F1 of the positive class is reported."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace

from rpp_triton.data.sources import DataOptions, load_raw, load_splits, pydoc_paragraphs
from rpp_triton.errors import UsageError


@dataclass
class TaskSpec:
    """How to read one task: text columns, label column, metrics, and the kind of head it needs.
    `kind` is "classification" or "regression" (question answering plugs in as its own kind)."""

    name: str
    text_columns: tuple[str, ...]
    label_column: str = "label"
    metrics: tuple[str, ...] = ("accuracy",)
    kind: str = "classification"
    hub: tuple[str, str] | None = None  # (dataset name, config)
    eval_split: str = "validation"


GLUE_TASKS = {
    "cola": TaskSpec("cola", ("sentence",), metrics=("matthews", "accuracy"), hub=("nyu-mll/glue", "cola")),
    "sst2": TaskSpec("sst2", ("sentence",), hub=("nyu-mll/glue", "sst2")),
    "mrpc": TaskSpec(
        "mrpc", ("sentence1", "sentence2"), metrics=("accuracy", "f1"), hub=("nyu-mll/glue", "mrpc")
    ),
    "qqp": TaskSpec(
        "qqp", ("question1", "question2"), metrics=("accuracy", "f1"), hub=("nyu-mll/glue", "qqp")
    ),
    "stsb": TaskSpec(
        "stsb",
        ("sentence1", "sentence2"),
        metrics=("pearson", "spearman"),
        kind="regression",
        hub=("nyu-mll/glue", "stsb"),
    ),
    "mnli": TaskSpec(
        "mnli", ("premise", "hypothesis"), hub=("nyu-mll/glue", "mnli"), eval_split="validation_matched"
    ),
    "qnli": TaskSpec("qnli", ("question", "sentence"), hub=("nyu-mll/glue", "qnli")),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), hub=("nyu-mll/glue", "rte")),
    "wnli": TaskSpec("wnli", ("sentence1", "sentence2"), hub=("nyu-mll/glue", "wnli")),
}

DEFAULT_TASK = "pydoc-topics"
TASK_NAMES = (DEFAULT_TASK, *GLUE_TASKS)


@dataclass
class TaskData:
    spec: TaskSpec
    train: list[dict]  # {"text": str, "text_pair": str | None, "label": int | float}
    eval: list[dict]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return 1 if self.spec.kind == "regression" else len(self.label_names)


def pydoc_topic_task(num_topics: int = 8, per_topic: int = 120) -> TaskData:
    """Offline task: which documentation topic a passage comes from, over the `num_topics` largest
    topics. Passages are sentences grouped to ~200 characters; every 5th one is held out."""
    by_topic: dict[str, list[str]] = {}
    for topic, para in pydoc_paragraphs():
        by_topic.setdefault(topic, []).append(para)
    sizes = sorted(by_topic, key=lambda t: (-sum(map(len, by_topic[t])), t))
    names = sorted(sizes[:num_topics])
    train, held = [], []
    for label, topic in enumerate(names):
        passages, cur = [], ""
        for para in by_topic[topic]:
            for sent in re.split(r"(?<=[.:;])\s+", para):
                cur = f"{cur} {sent}".strip()
                if len(cur) >= 200:
                    passages.append(cur)
                    cur = ""
        passages = passages[:per_topic]
        for i, text in enumerate(passages):
            (held if i % 5 == 4 else train).append({"text": text, "text_pair": None, "label": label})
    random.Random(0).shuffle(train)
    spec = TaskSpec(DEFAULT_TASK, ("text",), metrics=("accuracy", "macro_f1"))
    return TaskData(spec, train, held, names)


def _rows(ds, spec: TaskSpec, where: str) -> list[dict]:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in ds.column_names]
    if missing:
        raise UsageError(f"{where} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    a = ds[spec.text_columns[0]]
    b = ds[spec.text_columns[1]] if len(spec.text_columns) > 1 else [None] * len(a)
    return [
        {"text": str(x), "text_pair": None if y is None else str(y), "label": lab}
        for x, y, lab in zip(a, b, ds[spec.label_column])
        # GLUE test splits carry label -1; a missing CSV value reads as NaN
        if lab is not None and lab != -1 and lab == lab
    ]


def _numeric_labels(rows: list[dict], where: str) -> None:
    for row in rows:
        try:
            value = float(row["label"])
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise UsageError(f"{where}: regression needs numeric labels, got {row['label']!r}")
        row["label"] = value


def _encode_labels(train: list[dict], held: list[dict], spec: TaskSpec) -> list[str]:
    """Labels as class indices (in place) and the class names; numbers for regression."""
    if spec.kind == "regression":
        _numeric_labels(train + held, spec.name)
        return []
    values = sorted({r["label"] for r in train}, key=lambda v: (str(type(v)), v))
    if "f1" in spec.metrics and not set(values) <= {0, 1}:
        shown = ", ".join(repr(v) for v in values[:4])
        raise UsageError(
            f"{spec.name} reports the F1 of the positive class, label 1, so its labels must be 0 and 1 "
            f"(got {shown})"
        )
    if all(isinstance(v, int) for v in values):
        names = [str(v) for v in range(max(values) + 1)]
        lookup = {v: v for v in values}
    else:
        names = [str(v) for v in values]
        lookup = {v: i for i, v in enumerate(values)}
    for row in (*train, *held):
        if row["label"] not in lookup:
            raise UsageError(f"validation label {row['label']!r} never appears in the training data")
        row["label"] = lookup[row["label"]]
    return names


def _spec(options: DataOptions) -> TaskSpec:
    """The task's columns, metrics and kind: a GLUE task's own (columns may be renamed), or a
    generic task over `options`' columns."""
    base = GLUE_TASKS.get(options.task)
    if base is None and options.task not in (None, DEFAULT_TASK):
        raise UsageError(f"unknown task {options.task!r} (known: {', '.join(TASK_NAMES)})")
    if base is not None and options.regression and base.kind != "regression":
        raise UsageError(f"--regression does not apply to {base.name}, a classification task")
    if base is None:
        kind = "regression" if options.regression else "classification"
        metrics = ("pearson", "spearman") if options.regression else ("accuracy", "macro_f1")
        base = TaskSpec(options.dataset or "local", ("text",), metrics=metrics, kind=kind)
    first = options.text_column or base.text_columns[0]
    pair = options.text_pair_column or (base.text_columns[1] if len(base.text_columns) > 1 else None)
    return replace(
        base,
        text_columns=(first,) if pair is None else (first, pair),
        label_column=options.label_column or base.label_column,
    )


def load_task(options: DataOptions) -> TaskData:
    """A classification or regression task: the offline default, a GLUE task (from its hub dataset
    or `options.dataset`), local files, or any dataset with the columns `options` names. Without a
    validation file or split, every 5th training row is held out."""
    if options.offline_default and options.task in (None, DEFAULT_TASK):
        return pydoc_topic_task()
    spec = _spec(options)
    if options.train_file is not None:
        train = _rows(load_raw(options.train_file)["train"], spec, f"train file {options.train_file!r}")
        held_ds = load_raw(options.validation_file)["train"] if options.validation_file else None
        where = f"validation file {options.validation_file!r}"
    elif options.dataset is not None or spec.hub is not None:
        name = options.dataset or spec.hub[0]
        train_ds, held_ds = load_splits(
            name,
            options.dataset_config or (None if options.dataset else spec.hub[1]),
            options.split or "train",
            options.validation_split,
            (spec.eval_split, "validation", "test"),
            hint="pass --train-file",
        )
        train, where = _rows(train_ds, spec, f"dataset {name!r}"), f"dataset {name!r}"
    else:
        raise UsageError("--validation-file needs --train-file")
    if held_ds is not None:
        held = _rows(held_ds, spec, where)
    else:
        held = [r for i, r in enumerate(train) if i % 5 == 4]
        train = [r for i, r in enumerate(train) if i % 5 != 4]
    if not train or not held:
        raise UsageError(f"{spec.name}: too few labelled rows to train and evaluate on")
    return TaskData(spec, train, held, _encode_labels(train, held, spec))
