"""Question-answering examples: SQuAD-format JSON files, SQuAD-shaped datasets (the hub's
"squad" / "squad_v2", or `--dataset` with a hub name or local folder), and an offline set built
from Python's documentation text (`pydoc-qa`, and `pydoc-qa-v2` with unanswerable questions mixed
in).

Every example is a dict `{"id", "question", "context", "answers": {"text": [...], "answer_start":
[...]}}`; no answers means "no answer" (v2.0 only). Questions that cannot be used are skipped and
counted by reason, never a crash mid-run; a file that is not SQuAD JSON is a one-line error.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
from dataclasses import dataclass, field

from rpp_triton.data.sources import DataOptions, load_splits
from rpp_triton.errors import UsageError
from rpp_triton.qa.metric import normalize_answer

OFFLINE_TASK = "pydoc-qa"
QA_TASKS = ("squad", "squad_v2", OFFLINE_TASK, OFFLINE_TASK + "-v2")
HUB_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
VERSION_2 = {"squad_v2", OFFLINE_TASK + "-v2"}


@dataclass
class QAData:
    name: str
    version_2: bool
    train: list[dict]
    eval: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> questions skipped


SKIP_REASONS = {
    "malformed": "malformed question entry",
    "empty_context": "empty context",
    "empty_question": "empty question",
    "answer_mismatch": "answer text does not match the context at answer_start",
    "no_answer_v1": "no answer in a v1.1 task",
    "duplicate_id": "duplicate id",
    "question_too_long": "question longer than the window",
}


def describe_skips(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {SKIP_REASONS.get(k, k)}" for k, n in sorted(skipped.items()) if n)


def check_examples(
    rows, version_2: bool, skipped: collections.Counter, seen: set | None = None
) -> list[dict]:
    """Keep the usable questions of `rows` (SQuAD-shaped dicts), counting the others in `skipped`.
    Answers whose text is not at `answer_start` in the context are dropped; a question left with
    none is skipped (v1.1) and must not claim to be answerable."""
    seen = set() if seen is None else seen
    out = []
    for row in rows:
        try:
            qid, question, context = str(row["id"]), row["question"], row["context"]
            texts = list(row["answers"]["text"])
            starts = [int(s) for s in row["answers"]["answer_start"]]
        except (KeyError, TypeError, ValueError):
            skipped["malformed"] += 1
            continue
        if not isinstance(question, str) or not isinstance(context, str) or len(texts) != len(starts):
            skipped["malformed"] += 1
            continue
        if not context.strip():
            skipped["empty_context"] += 1
            continue
        if not question.strip():
            skipped["empty_question"] += 1
            continue
        if qid in seen:
            skipped["duplicate_id"] += 1
            continue
        good = [
            (t, s)
            for t, s in zip(texts, starts)
            if isinstance(t, str) and t and 0 <= s and context[s : s + len(t)] == t
        ]
        if texts and not good:
            skipped["answer_mismatch"] += 1
            continue
        if not good and not version_2:
            skipped["no_answer_v1"] += 1
            continue
        seen.add(qid)
        out.append(
            {
                "id": qid,
                "question": question.strip(),
                "context": context,
                "answers": {"text": [t for t, _ in good], "answer_start": [s for _, s in good]},
            }
        )
    return out


def parse_squad_json(obj, where: str, skipped: collections.Counter) -> list[dict]:
    """Flatten SQuAD's `{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}` into rows.
    A document that is not shaped like SQuAD is a `UsageError`; a bad paragraph or question is
    counted as malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise UsageError(f"{where}: not SQuAD JSON (expected an object with a 'data' list)")
    rows = []
    for article in obj["data"]:
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            skipped["malformed"] += 1
            continue
        for para in paragraphs:
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(qas, list):
                skipped["malformed"] += 1
                continue
            for qa in qas:
                if (
                    not isinstance(qa, dict)
                    or qa.get("id") is None
                    or not isinstance(qa.get("answers", []), list)
                ):
                    skipped["malformed"] += 1
                    continue
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                try:
                    texts = [a["text"] for a in answers]
                    starts = [a["answer_start"] for a in answers]
                except (KeyError, TypeError):
                    skipped["malformed"] += 1
                    continue
                rows.append(
                    {
                        "id": qa.get("id"),
                        "question": qa.get("question"),
                        "context": para.get("context"),
                        "answers": {"text": texts, "answer_start": starts},
                    }
                )
    return rows


def load_squad_file(path: str, version_2: bool, skipped: collections.Counter) -> list[dict]:
    if not os.path.isfile(path):
        raise UsageError(f"SQuAD file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{path}: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    return check_examples(parse_squad_json(obj, path, skipped), version_2, skipped)


def load_qa_task(options: DataOptions, need_train: bool = True) -> QAData:
    """The examples of a QA task: the offline set, local SQuAD JSON files, or a SQuAD-shaped
    dataset (`options.dataset`, else the task's hub dataset); the task name says v1.1 or v2.0.
    Without validation data, every 5th context of the training data is held out."""
    task = options.task or OFFLINE_TASK
    if task not in QA_TASKS:
        raise UsageError(f"unknown question-answering task {task!r} (known: {', '.join(QA_TASKS)})")
    version_2 = task in VERSION_2
    if options.offline_default:
        train, held = pydoc_qa(version_2)
        return QAData(task, version_2, train if need_train else [], held)
    skipped = collections.Counter()
    if options.train_file is not None or options.validation_file is not None:
        if need_train and options.train_file is None:
            raise UsageError("--validation-file needs --train-file for fine-tuning")
        where = options.validation_file or options.train_file
        train = load_squad_file(options.train_file, version_2, skipped) if need_train else []
        held = None
        if options.validation_file is not None:
            held = load_squad_file(options.validation_file, version_2, skipped)
    else:
        where = options.dataset or HUB_DATASETS[task]
        train_rows, held_rows = load_splits(
            where,
            options.dataset_config,
            (options.split or "train") if need_train else None,
            options.validation_split,
            ("validation",),
            hint="pass local SQuAD JSON files (--train-file / --validation-file)",
        )
        seen = set()
        train = check_examples(train_rows, version_2, skipped, seen) if need_train else []
        held = check_examples(held_rows, version_2, skipped, seen) if held_rows is not None else None
    if held is None:
        if not need_train:
            raise UsageError(f"{where}: no validation data to evaluate on")
        contexts = {c: i for i, c in enumerate(dict.fromkeys(r["context"] for r in train))}
        held = [r for r in train if contexts[r["context"]] % 5 == 4]
        train = [r for r in train if contexts[r["context"]] % 5 != 4]
    reasons = describe_skips(skipped) or "empty"
    if need_train and not train:
        raise UsageError(f"{where}: no usable questions ({reasons})")
    if not held:
        raise UsageError(f"{where}: no usable questions to evaluate on ({reasons})")
    return QAData(task, version_2, train, held, dict(skipped))


# ---------------------------------------------------------------------------------------------
# The offline default: questions about Python's documentation

_SIGNATURE = re.compile(r"(?:class |exception )?([A-Za-z_][\w.]*)\(([^()]*)\)")
_PRODUCTION = re.compile(r"([a-z_][\w]*) ::= (.+?)(?= [a-z_][\w]* ::= |$)")
_NEW_IN = re.compile(r"^New in version (\d+\.\d+)")
_RETURNS = re.compile(r"^Returns? (.+?)(?:\.(?:\s|$))")
_CHUNK_CHARS = 500
_PARAGRAPH_CHARS = 700


def _pydoc_units(text: str) -> list[list[str]]:
    """A topic as units of whitespace-collapsed paragraphs: an API entry (signature line, first
    description paragraph, and its "New in version" note) or a lone paragraph."""
    units: list[list[str]] = []
    entry = None
    for raw in re.split(r"\n\s*\n", text):
        para = " ".join(raw.split())
        if not re.search(r"[a-z]{3}", para):
            continue
        indented = raw.startswith("   ") or raw.startswith("\n   ")
        if not indented and "\n" not in raw.strip() and _SIGNATURE.fullmatch(para):
            entry = [para]
            units.append(entry)
        elif indented and entry is not None:
            if len(entry) == 1 or _NEW_IN.match(para):
                entry.append(para[:_PARAGRAPH_CHARS])
        else:
            entry = None
            if len(para) > _PARAGRAPH_CHARS:  # cut at a sentence end, so spans stay whole
                cut = para.rfind(". ", 0, _PARAGRAPH_CHARS)
                para = para[: cut + 1] if cut > 0 else para[:_PARAGRAPH_CHARS]
            units.append([para])
    return units


def _chunk_questions(paragraphs: list[str]) -> tuple[str, list[tuple[str, str, int]]]:
    """The context made of `paragraphs` and its (question, answer, answer_start) triples."""
    context, starts = "", []
    for para in paragraphs:
        if context:
            context += "\n\n"
        starts.append(len(context))
        context += para
    qas: list[tuple[str, str, int]] = []
    for i, (para, at) in enumerate(zip(paragraphs, starts)):
        sig = _SIGNATURE.fullmatch(para)
        if sig and i + 1 < len(paragraphs):
            name, desc, desc_at = sig.group(1), paragraphs[i + 1], starts[i + 1]
            words = desc.split()
            if len(words) >= 6:
                qas.append((f"Which entry is described as: {' '.join(words[:10])}?", name, at + sig.start(1)))
            if sig.group(2).strip():
                qas.append((f"What are the parameters of {name}()?", sig.group(2), at + sig.start(2)))
            m = _RETURNS.match(desc)
            if m and 3 <= len(m.group(1)) <= 160:
                qas.append((f"What does {name}() return?", m.group(1), desc_at + m.start(1)))
            for j in range(i + 2, min(i + 4, len(paragraphs))):
                m = _NEW_IN.match(paragraphs[j])
                if m:
                    qas.append((f"In which version was {name}() added?", m.group(1), starts[j] + m.start(1)))
                    break
        for m in _PRODUCTION.finditer(para):
            rhs = m.group(2).strip()
            if 1 <= len(rhs) <= 120:
                qas.append((f"What is the grammar rule for {m.group(1)}?", rhs, at + m.start(2)))
                if len(rhs.split()) >= 3:
                    qas.append((f"Which grammar rule is defined as {rhs}?", m.group(1), at + m.start(1)))
    # A question asked twice in one context would have two right answers: drop both. Answers that
    # are only punctuation normalise to nothing, which the metric reads as "no answer".
    counts = collections.Counter(q for q, _, _ in qas)
    return context, [qa for qa in qas if counts[qa[0]] == 1 and normalize_answer(qa[1])]


def pydoc_qa(version_2: bool = False) -> tuple[list[dict], list[dict]]:
    """The offline QA set: contexts of ~500 characters from `pydoc_data.topics` with template
    questions whose answers are spans of them (which API entry a description belongs to, its
    parameters, what it returns, the version that added it, a grammar rule and its name). Every 5th
    context is held out. With `version_2`, each context also gets one question taken from another
    topic whose answer it does not contain (unanswerable)."""
    from pydoc_data.topics import topics

    chunks = []  # (topic, context, qas)
    for topic in sorted(topics):
        current: list[str] = []
        for unit in _pydoc_units(topics[topic]):
            current.extend(unit)
            if sum(map(len, current)) >= _CHUNK_CHARS:
                chunks.append((topic, *_chunk_questions(current)))
                current = []
        if current:
            chunks.append((topic, *_chunk_questions(current)))
    # Some text appears under several topics: keep one copy, so no held-out context is trained on.
    unique = {c[1]: c for c in reversed(chunks) if c[2]}
    chunks = [c for c in chunks if unique.get(c[1]) is c]
    train, held = [], []
    for n, (topic, context, qas) in enumerate(chunks):
        rows = [
            {
                "id": f"pydoc-{n}-{k}",
                "question": q,
                "context": context,
                "answers": {"text": [a], "answer_start": [s]},
            }
            for k, (q, a, s) in enumerate(qas)
        ]
        if version_2:
            rng = random.Random(n)
            others = [c for c in chunks if c[0] != topic]
            for _ in range(10):
                _, _, other_qas = rng.choice(others)
                q, a, _ = rng.choice(other_qas)
                if a not in context:
                    rows.append(
                        {
                            "id": f"pydoc-{n}-none",
                            "question": q,
                            "context": context,
                            "answers": {"text": [], "answer_start": []},
                        }
                    )
                    break
        (held if n % 5 == 4 else train).extend(rows)
    random.Random(0).shuffle(train)
    return train, held
