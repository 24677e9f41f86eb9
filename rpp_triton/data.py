"""Data for the pipeline: the embedded default text (Python's documentation topics), local
text/JSON/CSV files, hub datasets, masked-LM blocks, and the classification tasks `finetune` knows
(GLUE by name, local files, and an offline task built from the documentation text).

Errors a user can cause raise `rpp_triton.cli.UsageError` with one line that names the problem.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field

from rpp_triton.errors import UsageError

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}

# Held-out share of the embedded text, and of the offline task (every k-th item, so the split is
# the same on every machine and every rank).
HELD_OUT_EVERY = 10


# ---------------------------------------------------------------------------------------------
# Text for masked-LM pruning


def pydoc_paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) pairs from `pydoc_data.topics`, ~465k characters of English with code."""
    from pydoc_data.topics import topics

    out = []
    for topic in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[topic]):
            para = " ".join(para.split())
            # Skip headings and underlines ("*****", "===="): no words to predict.
            if len(para) >= 40 and re.search(r"[a-z]{3}", para):
                out.append((topic, para))
    return out


def default_text() -> tuple[list[str], list[str]]:
    """The embedded default: documentation paragraphs split into training and held-out text."""
    paras = [p for _, p in pydoc_paragraphs()]
    train = [p for i, p in enumerate(paras) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [p for i, p in enumerate(paras) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def _is_local(name: str) -> bool:
    return os.path.sep in name or name.startswith(".") or os.path.splitext(name)[1] in LOCAL_FORMATS


def load_raw(name: str, split: str | None = None):
    """A `datasets.DatasetDict` from a local text/JSON/CSV file (or directory of them) or a hub name."""
    import datasets

    datasets.disable_progress_bars()  # an error must stay one line on stderr
    if os.path.exists(name):
        files = name
        if os.path.isdir(name):
            files = sorted(
                os.path.join(name, f) for f in os.listdir(name) if os.path.splitext(f)[1] in LOCAL_FORMATS
            )
            if not files:
                raise UsageError(f"dataset directory {name!r} holds no .txt, .json, .jsonl or .csv files")
        first = files[0] if isinstance(files, list) else files
        ext = os.path.splitext(first)[1].lower()
        if ext not in LOCAL_FORMATS:
            raise UsageError(
                f"dataset file {first!r}: unknown format {ext!r} (use .txt, .json, .jsonl or .csv)"
            )
        try:
            return datasets.load_dataset(LOCAL_FORMATS[ext], data_files={"train": files})
        except Exception as exc:  # a malformed file: one line, not a traceback
            raise UsageError(f"cannot read dataset {name!r}: {_first_line(exc)}") from None
    if _is_local(name):
        raise UsageError(f"dataset path {name!r} does not exist")
    if _offline():
        raise UsageError(f"dataset {name!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1)")
    try:
        return datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:
        raise UsageError(f"cannot load dataset {name!r} from the hub: {_first_line(exc)}") from None


def load_text(name: str, text_column: str | None = None) -> tuple[list[str], list[str]]:
    """Training and held-out text from a local file or hub dataset (held-out: its validation split,
    else every 10th example)."""
    raw = load_raw(name)
    train = raw["train"] if "train" in raw else raw[next(iter(raw))]
    column = text_column or ("text" if "text" in train.column_names else None)
    if column is None:
        raise UsageError(
            f"dataset {name!r} has no 'text' column; pass --text-column "
            f"(columns: {', '.join(train.column_names)})"
        )
    if column not in train.column_names:
        raise UsageError(
            f"dataset {name!r} has no column {column!r} (columns: {', '.join(train.column_names)})"
        )
    texts = [t for t in train[column] if isinstance(t, str) and t.strip()]
    held_split = next((s for s in ("validation", "test") if s in raw), None)
    if held_split:
        held = [t for t in raw[held_split][column] if isinstance(t, str) and t.strip()]
    else:
        held = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        texts = [t for i, t in enumerate(texts) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not texts or not held:
        raise UsageError(f"dataset {name!r} has too little text in column {column!r}")
    return texts, held


def mlm_blocks(tokenizer, texts: list[str], seq_len: int) -> list[dict]:
    """Tokenise, concatenate and cut into [CLS] ... [SEP] blocks of exactly `seq_len` tokens."""
    body = seq_len - 2
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.sep_token_id)
    blocks = []
    for start in range(0, len(ids) - body + 1, body):
        chunk = [tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id]
        blocks.append({"input_ids": chunk, "attention_mask": [1] * seq_len})
    return blocks


def mask_tokens(input_ids, tokenizer, probability: float, generator):
    """BERT's masking (80% [MASK], 10% random, 10% kept) with an explicit generator; returns
    (masked input_ids, labels with -100 where nothing is predicted)."""
    import torch

    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for tok in tokenizer.all_special_ids:
        special |= input_ids == tok
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & ~special
    labels[~chosen] = -100
    ids = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    ids[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[rand] = torch.randint(len(tokenizer), input_ids.shape, generator=generator)[rand]
    return ids, labels


def static_masked_eval(tokenizer, blocks: list[dict], probability: float = 0.15, seed: int = 1234):
    """Held-out blocks masked once with a fixed seed, so dense and pruned models answer the same
    questions."""
    import torch

    if not blocks:
        return []
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([b["input_ids"] for b in blocks])
    masked, labels = mask_tokens(ids, tokenizer, probability, gen)
    return [
        {"input_ids": m.tolist(), "attention_mask": b["attention_mask"], "labels": y.tolist()}
        for m, y, b in zip(masked, labels, blocks)
    ]


# ---------------------------------------------------------------------------------------------
# Downstream tasks


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
    if _offline():
        raise UsageError(f"GLUE task {spec.name!r} needs the hub, which is offline; pass --train-file")
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:
        raise UsageError(f"cannot load GLUE task {spec.name!r} from the hub: {_first_line(exc)}") from None


def _offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
