"""Where text comes from: local text/JSON/CSV files, hub datasets (through `datasets`), and the
embedded default, Python's documentation topics (`pydoc_data.topics`), which needs no network."""

from __future__ import annotations

import os
import re

from rpp_triton.errors import UsageError

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}

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
            raise UsageError(f"cannot read dataset {name!r}: {first_line(exc)}") from None
    if _is_local(name):
        raise UsageError(f"dataset path {name!r} does not exist")
    if offline():
        raise UsageError(f"dataset {name!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1)")
    try:
        return datasets.load_dataset(name, split=split) if split else datasets.load_dataset(name)
    except Exception as exc:
        raise UsageError(f"cannot load dataset {name!r} from the hub: {first_line(exc)}") from None


def offline() -> bool:
    return any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
