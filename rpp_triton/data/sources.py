"""Where text comes from: local text/JSON/CSV/Parquet files and dataset folders, hub datasets
(through `datasets`, with their configurations and splits), and the embedded default, Python's
documentation topics (`pydoc_data.topics`), which needs no network."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from rpp_triton.errors import UsageError

LOCAL_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}

# Held-out share of the embedded text, and of the offline tasks (every k-th item, so the split is
# the same on every machine and every rank).
HELD_OUT_EVERY = 10


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


@dataclass(frozen=True)
class DataOptions:
    """Where a downstream task's examples come from: a task by name (its own hub dataset, or the
    offline default), local files, or a dataset (`dataset`: a hub name or a local file or folder,
    with its configuration and split names), and which columns hold the text and the label."""

    task: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    validation_split: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    regression: bool = False

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"--{name.replace('_', '-')} {path!r} does not exist")
        files = self.train_file is not None or self.validation_file is not None
        if files and self.dataset is not None:
            raise UsageError("--dataset and --train-file / --validation-file are alternatives: pass one")
        named = [n for n in ("dataset_config", "split", "validation_split") if getattr(self, n) is not None]
        if files and named:
            raise UsageError(
                f"--{named[0].replace('_', '-')} names part of a dataset (--dataset or a hub task), "
                "not of --train-file / --validation-file"
            )

    @property
    def offline_default(self) -> bool:
        """True for the embedded tasks built from Python's documentation (no files, no dataset)."""
        no_data = self.train_file is None and self.validation_file is None and self.dataset is None
        return no_data and (self.task is None or self.task.startswith("pydoc-"))


# Data files `datasets` reads by their extension: a name ending in one is a path, never a hub name.
FILE_EXTENSIONS = (*LOCAL_FORMATS, ".arrow", ".tsv", ".ndjson")


def locate(name: str) -> str:
    """ "dir", "file" or "hub": paths told from hub names as `datasets.load_dataset` tells them. An
    existing directory or file is local; a relative name with at most one "/" and no data-file
    extension is a hub name (`imdb`, `nyu-mll/glue`); anything else is a path that does not exist."""
    if os.path.isdir(name):
        return "dir"
    if os.path.isfile(name):
        return "file"
    looks_like_path = name.startswith((".", "~", os.sep)) or os.path.isabs(name) or name.count("/") > 1
    if looks_like_path or "://" in name or name.lower().endswith(FILE_EXTENSIONS):
        raise UsageError(f"dataset path {name!r} does not exist")
    return "hub"


def load_raw(name: str, config: str | None = None, hint: str = ""):
    """A `datasets.DatasetDict`: a local text/JSON/CSV/Parquet file (one "train" split), a local
    dataset folder (its data files, or the configurations its README dataset card declares), or a
    hub dataset; `config` picks a folder's or hub dataset's configuration. `hint` ends the error
    when the hub is needed but offline."""
    import datasets

    datasets.disable_progress_bars()  # an error must stay one line on stderr
    kind = locate(name)
    if kind == "file":
        ext = os.path.splitext(name)[1].lower()
        if ext not in LOCAL_FORMATS:
            known = ", ".join(LOCAL_FORMATS)
            raise UsageError(f"dataset file {name!r}: unknown format {ext!r} (use {known})")
        if config is not None:
            raise UsageError(f"dataset file {name!r} has no configurations (got {config!r})")
        args, kwargs = (LOCAL_FORMATS[ext],), {"data_files": {"train": name}}
    elif kind == "hub" and offline():
        raise UsageError(
            f"dataset {name!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1)"
            + (f"; {hint}" if hint else "")
        )
    else:
        args, kwargs = (name, config), {}
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # a malformed file, an unknown configuration: one line, not a traceback
        where = " from the hub" if kind == "hub" else ""
        raise UsageError(f"cannot load dataset {name!r}{where}: {first_line(exc)}") from None


def load_splits(
    name: str,
    config: str | None,
    train_split: str | None,
    eval_split: str | None,
    default_eval: tuple[str, ...] = ("validation", "test"),
    hint: str = "",
):
    """(training split, evaluation split) of a dataset: `train_split` (None: no training split
    wanted), and `eval_split` or else the first of `default_eval` the dataset has (None if it has
    none, for the caller to hold out part of the training split)."""
    raw = load_raw(name, config, hint)

    def pick(split):
        if split not in raw:
            raise UsageError(f"dataset {name!r} has no split {split!r} (splits: {', '.join(raw)})")
        return raw[split]

    train = pick(train_split) if train_split is not None else None
    if eval_split is not None:
        return train, pick(eval_split)
    return train, next((raw[s] for s in default_eval if s in raw), None)


def offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
