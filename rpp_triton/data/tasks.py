"""Downstream classification and regression tasks `finetune` knows: GLUE by name (each with its
metric), local CSV/JSON files, and the offline `pydoc-topics` task (which documentation topic a
passage comes from)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from rpp_triton.data.sources import first_line, load_raw, offline, pydoc_paragraphs
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
        if lab is not None and lab != -1  # GLUE test splits carry label -1
    ]


def _encode_labels(train: list[dict], held: list[dict], spec: TaskSpec) -> list[str]:
    if spec.kind == "regression":
        for row in (*train, *held):
            row["label"] = float(row["label"])
        return []
    values = sorted({r["label"] for r in train}, key=lambda v: (str(type(v)), v))
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


def load_task(
    task: str | None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    regression: bool = False,
) -> TaskData:
    """A task by name (GLUE or the offline default), or from local files. Local files take the
    columns given (or the GLUE task's own columns when `task` names one)."""
    if train_file is None:
        if task in (None, DEFAULT_TASK):
            return pydoc_topic_task()
        if task not in GLUE_TASKS:
            raise UsageError(f"unknown task {task!r} (known: {', '.join(TASK_NAMES)}; or pass --train-file)")
        spec = GLUE_TASKS[task]
        raw = _load_glue(spec)
        train, held = _rows(raw["train"], spec, task), _rows(raw[spec.eval_split], spec, task)
        return TaskData(spec, train, held, _encode_labels(train, held, spec))

    if task in GLUE_TASKS:
        base = GLUE_TASKS[task]
        spec = TaskSpec(
            task,
            (text_column, text_pair_column) if text_column and text_pair_column else base.text_columns,
            label_column or base.label_column,
            base.metrics,
            base.kind,
        )
    elif task not in (None, DEFAULT_TASK):
        raise UsageError(f"unknown task {task!r} (known: {', '.join(TASK_NAMES)})")
    else:
        cols = (text_column or "text",) + ((text_pair_column,) if text_pair_column else ())
        kind = "regression" if regression else "classification"
        metrics = ("pearson", "spearman") if regression else ("accuracy", "macro_f1")
        spec = TaskSpec("local", cols, label_column or "label", metrics, kind)
    train_ds = load_raw(train_file)["train"]
    train = _rows(train_ds, spec, f"train file {train_file!r}")
    if validation_file:
        held = _rows(load_raw(validation_file)["train"], spec, f"validation file {validation_file!r}")
    else:
        held = [r for i, r in enumerate(train) if i % 5 == 4]
        train = [r for i, r in enumerate(train) if i % 5 != 4]
    if not train or not held:
        raise UsageError(f"train file {train_file!r} has too few labelled rows")
    return TaskData(spec, train, held, _encode_labels(train, held, spec))


def _load_glue(spec: TaskSpec):
    import datasets

    name, config = spec.hub
    if offline():
        raise UsageError(f"GLUE task {spec.name!r} needs the hub, which is offline; pass --train-file")
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:
        raise UsageError(f"cannot load GLUE task {spec.name!r} from the hub: {first_line(exc)}") from None
