"""Question answering (extractive, SQuAD v1.1 and v2.0) on a pruned encoder.

- Data: SQuAD-format JSON files, the hub datasets "squad" / "squad_v2", and an offline set built from
  Python's documentation text (`pydoc-qa`, and `pydoc-qa-v2` with unanswerable questions mixed in).
  Every example is a dict `{"id", "question", "context", "answers": {"text": [...], "answer_start":
  [...]}}`; no answers means "no answer" (v2.0 only). Questions that cannot be used are skipped and
  counted by reason, never a crash mid-run; a file that is not SQuAD JSON is a one-line error.
- Preprocessing: the context is split into windows of `max_length` tokens that overlap by `stride`
  tokens; a window that does not hold the whole answer is labelled with the [CLS] position.
- Post-processing: per example, the best `start + end` logit sum over its windows with
  `start <= end < start + max_answer_length`, both inside the context; for v2.0 the null answer wins
  when `null_score - best_span_score > null_threshold` (null_score: [CLS] start + end, lowest over
  the windows).
- Metric: the official exact match and F1 (answers normalised: lower case, no punctuation, no
  articles, single spaces; max over the gold answers; an unanswerable question counts 1 only for an
  empty prediction).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import string
import time
from dataclasses import dataclass, field

from rpp_triton.errors import UsageError

OFFLINE_TASK = "pydoc-qa"
QA_TASKS = ("squad", "squad_v2", OFFLINE_TASK, OFFLINE_TASK + "-v2")
HUB_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
VERSION_2 = {"squad_v2", OFFLINE_TASK + "-v2"}

# ---------------------------------------------------------------------------------------------
# The official metric


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised texts; when either is empty, 1 only if both are."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: dict) -> list[str]:
    """The gold texts that normalise to something; [""] for an unanswerable question."""
    golds = [t for t in example["answers"]["text"] if normalize_answer(t)]
    return golds or [""]


def squad_metrics(predictions: dict[str, str], examples: list[dict]) -> dict[str, float]:
    """Exact match and F1 in percent over `examples` (a missing prediction counts as no answer),
    split into answerable (`HasAns_*`) and unanswerable (`NoAns_*`) questions when both occur."""
    exact, f1, has_ans = [], [], []
    for ex in examples:
        pred = predictions.get(ex["id"], "")
        golds = gold_answers(ex)
        exact.append(max(exact_match(pred, g) for g in golds))
        f1.append(max(f1_score(pred, g) for g in golds))
        has_ans.append(golds != [""])
    out = {
        "exact": 100.0 * sum(exact) / len(exact) if exact else 0.0,
        "f1": 100.0 * sum(f1) / len(f1) if f1 else 0.0,
        "total": len(examples),
    }
    for prefix, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has_ans) if h == keep]
        if idx and len(idx) < len(examples):
            out[f"{prefix}_exact"] = 100.0 * sum(exact[i] for i in idx) / len(idx)
            out[f"{prefix}_f1"] = 100.0 * sum(f1[i] for i in idx) / len(idx)
            out[f"{prefix}_total"] = len(idx)
    return out


# ---------------------------------------------------------------------------------------------
# Loading and checking examples


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


def _load_hub(task: str, split: str) -> list[dict]:
    import datasets

    from rpp_triton.data.sources import first_line as _first_line
    from rpp_triton.data.sources import offline as _offline

    name = HUB_DATASETS[task]
    if _offline():
        raise UsageError(
            f"{task!r} needs the hub ({name}), which is offline; pass local SQuAD JSON files "
            "(--train-file / --validation-file)"
        )
    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset(name, split=split))
    except Exception as exc:
        raise UsageError(f"cannot load {name!r} from the hub: {_first_line(exc)}") from None


def load_qa_task(
    task: str | None,
    train_file: str | None = None,
    validation_file: str | None = None,
    need_train: bool = True,
) -> QAData:
    """A QA task by name, from local SQuAD JSON files when given (the task name then only says
    v1.1 or v2.0). Without a validation file, local training data hold out every 5th context."""
    task = task or OFFLINE_TASK
    if task not in QA_TASKS:
        raise UsageError(f"unknown question-answering task {task!r} (known: {', '.join(QA_TASKS)})")
    version_2 = task in VERSION_2
    skipped = collections.Counter()
    if train_file is None and validation_file is None:
        if task.startswith(OFFLINE_TASK):
            train, held = pydoc_qa(version_2)
        else:
            seen = set()
            train = check_examples(_load_hub(task, "train"), version_2, skipped, seen) if need_train else []
            held = check_examples(_load_hub(task, "validation"), version_2, skipped, seen)
        return QAData(task, version_2, train, held, dict(skipped))
    if need_train and train_file is None:
        raise UsageError("--validation-file needs --train-file for fine-tuning")
    train = load_squad_file(train_file, version_2, skipped) if need_train else []
    if validation_file:
        held = load_squad_file(validation_file, version_2, skipped)
    else:
        contexts = {c: i for i, c in enumerate(dict.fromkeys(r["context"] for r in train))}
        held = [r for r in train if contexts[r["context"]] % 5 == 4]
        train = [r for r in train if contexts[r["context"]] % 5 != 4]
    where = validation_file or train_file
    if need_train and not train:
        raise UsageError(f"{train_file}: no usable questions ({describe_skips(skipped) or 'empty'})")
    if not held:
        raise UsageError(
            f"{where}: no usable questions to evaluate on ({describe_skips(skipped) or 'empty'})"
        )
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


# ---------------------------------------------------------------------------------------------
# Preprocessing: windows over the context


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            "question answering needs a fast tokenizer (offset mappings); this model has a slow one"
        )


def _windows(tokenizer, examples: list[dict], max_length: int, stride: int, skipped: collections.Counter):
    """Tokenise (question, context) pairs into overlapping windows. Questions that leave no more
    than `stride` tokens for the context are skipped as too long. Returns (kept examples, encoding)."""
    _check_tokenizer(tokenizer)
    if not examples:
        return [], None
    special = tokenizer.num_special_tokens_to_add(pair=True)
    q_lens = [
        len(ids)
        for ids in tokenizer([e["question"] for e in examples], add_special_tokens=False)["input_ids"]
    ]
    kept = [e for e, n in zip(examples, q_lens) if max_length - special - n > stride]
    skipped["question_too_long"] += len(examples) - len(kept)
    if not kept:
        return [], None
    enc = tokenizer(
        [e["question"] for e in kept],
        [e["context"] for e in kept],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    return kept, enc


def _context_offsets(enc, i: int) -> list[tuple[int, int] | None]:
    """Character offsets of window `i`'s tokens, None where a token is not part of the context."""
    return [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]


def _model_inputs(enc, i: int) -> dict:
    return {k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}


def answer_token_span(offsets: list, start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token positions (first, last) covering characters [start_char, end_char) in one window, or
    None when the window does not hold the whole answer."""
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return None
    first = next(i for i in ctx if offsets[i][1] > start_char)
    last = next(i for i in reversed(ctx) if offsets[i][0] < end_char)
    return first, last


def prepare_train_features(
    tokenizer, examples: list[dict], max_length: int, stride: int, skipped: collections.Counter
) -> list[dict]:
    """Windows with `start_positions` / `end_positions`; the first answer is the target, and a
    window without the whole answer (or an unanswerable question) points at [CLS]."""
    kept, enc = _windows(tokenizer, examples, max_length, stride, skipped)
    features = []
    for i, sample in enumerate(enc["overflow_to_sample_mapping"] if enc else []):
        ex = kept[sample]
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id) if tokenizer.cls_token_id is not None else 0
        span = None
        if ex["answers"]["text"]:
            start = ex["answers"]["answer_start"][0]
            span = answer_token_span(_context_offsets(enc, i), start, start + len(ex["answers"]["text"][0]))
        s, e = span or (cls, cls)
        features.append({**_model_inputs(enc, i), "start_positions": s, "end_positions": e})
    return features


def prepare_eval_features(
    tokenizer, examples: list[dict], max_length: int, stride: int, skipped: collections.Counter
) -> tuple[list[dict], list[dict]]:
    """(kept examples, windows): each window has its model inputs, `example_index` into the kept
    examples and `offsets` (character spans of its context tokens, None elsewhere)."""
    kept, enc = _windows(tokenizer, examples, max_length, stride, skipped)
    features = [
        {"inputs": _model_inputs(enc, i), "example_index": sample, "offsets": _context_offsets(enc, i)}
        for i, sample in enumerate(enc["overflow_to_sample_mapping"] if enc else [])
    ]
    return kept, features


# ---------------------------------------------------------------------------------------------
# Post-processing: logits to answer texts


@dataclass
class BestSpan:
    """The best answer span of one example over all its windows. `start` / `end` are character
    offsets into the context (both 0 and `text` empty when no window holds a valid span); `score` is
    the span's start + end logit sum and `null_score` the [CLS] start + end sum, lowest over the
    windows (-inf / +inf when there is none). `window` / `null_window` index the features that
    gave them (-1 when none), and `start_token` / `end_token` are token positions in `window`."""

    text: str = ""
    start: int = 0
    end: int = 0
    score: float = float("-inf")
    null_score: float = float("inf")
    window: int = -1
    null_window: int = -1
    start_token: int = 0
    end_token: int = 0

    @property
    def null_margin(self) -> float:
        """Null score minus the best span's score (+inf when there is no span)."""
        return self.null_score - self.score if self.window >= 0 else float("inf")


def best_spans(
    examples: list[dict],
    features: list[dict],
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
) -> list[BestSpan]:
    """Per example (in order), the best `start + end` logit sum over its windows among the
    `n_best` highest starts and ends, with `start <= end < start + max_answer_length` and both
    inside the context; plus the null score. Features need `example_index` and `offsets`."""
    import numpy as np

    by_example = collections.defaultdict(list)
    for k, (f, s, e) in enumerate(zip(features, start_logits, end_logits)):
        by_example[f["example_index"]].append((k, f["offsets"], np.asarray(s), np.asarray(e)))
    spans = []
    for idx, ex in enumerate(examples):
        best = BestSpan()
        for k, offsets, s, e in by_example.get(idx, []):
            n = min(len(offsets), len(s))
            if float(s[0] + e[0]) < best.null_score:
                best.null_score, best.null_window = float(s[0] + e[0]), k
            starts = np.argsort(s[:n])[::-1][:n_best]
            ends = np.argsort(e[:n])[::-1][:n_best]
            for a in starts:
                if offsets[a] is None:
                    continue
                for b in ends:
                    if offsets[b] is None or b < a or b - a + 1 > max_answer_length:
                        continue
                    score = float(s[a] + e[b])
                    if score > best.score:
                        best.score, best.window = score, k
                        best.start_token, best.end_token = int(a), int(b)
                        best.start, best.end = offsets[a][0], offsets[b][1]
        best.text = ex["context"][best.start : best.end]
        spans.append(best)
    return spans


def postprocess(
    examples: list[dict],
    features: list[dict],
    start_logits,
    end_logits,
    version_2: bool = False,
    n_best: int = 20,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Answer texts by example id, and for each the null-answer margin (null score minus the best
    span's score; the answer is empty when it exceeds `null_threshold`, v2.0 only)."""
    spans = best_spans(examples, features, start_logits, end_logits, n_best, max_answer_length)
    predictions, null_margin = {}, {}
    for ex, span in zip(examples, spans):
        margin = span.null_margin
        null_margin[ex["id"]] = margin
        predictions[ex["id"]] = "" if version_2 and margin > null_threshold else span.text
    return predictions, null_margin


def best_null_threshold(examples: list[dict], predictions: dict, null_margin: dict) -> tuple[float, float]:
    """(best F1, its threshold) over null thresholds, as the official v2.0 script reports: each
    question answered with its span when its margin is at most the threshold, else left empty."""
    rows = []
    for ex in examples:
        golds = gold_answers(ex)
        pred = predictions.get(ex["id"], "")
        span_f1 = max(f1_score(pred, g) for g in golds) if pred else 0.0
        rows.append((null_margin.get(ex["id"], float("inf")), span_f1, float(golds == [""])))
    if not rows:
        return 0.0, 0.0
    rows.sort()
    score = sum(r[2] for r in rows)  # threshold below every margin: everything empty
    best, thresh = score, rows[0][0] - 1.0
    for margin, span_f1, no_ans in rows:
        score += span_f1 - no_ans
        if score > best and margin != float("inf"):
            best, thresh = score, margin
    return 100.0 * best / len(rows), float(thresh)


# ---------------------------------------------------------------------------------------------
# Running a model


def predict_logits(model, tokenizer, features: list[dict], batch_size: int = 32):
    """Start and end logits of every window (lists of 1-D numpy arrays, one per window)."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts, ends = [], []
    with torch.no_grad():
        for at in range(0, len(features), batch_size):
            batch = tokenizer.pad([f["inputs"] for f in features[at : at + batch_size]], return_tensors="pt")
            out = model(**{k: v.to(device) for k, v in batch.items()})
            for i, f in enumerate(features[at : at + batch_size]):
                n = len(f["inputs"]["input_ids"])
                starts.append(out.start_logits[i, :n].float().cpu().numpy())
                ends.append(out.end_logits[i, :n].float().cpu().numpy())
    model.train(was_training)
    return starts, ends


def evaluate_qa(
    model,
    tokenizer,
    examples: list[dict],
    version_2: bool,
    max_length: int = 384,
    stride: int = 128,
    batch_size: int = 32,
    max_answer_length: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict, dict[str, str], dict[str, int]]:
    """(metrics, predictions, skipped) for `examples`. Questions skipped here (too long for the
    window) are scored as unanswered, so skipping never inflates the score."""
    skipped = collections.Counter()
    kept, features = prepare_eval_features(tokenizer, examples, max_length, stride, skipped)
    starts, ends = predict_logits(model, tokenizer, features, batch_size)
    predictions, margins = postprocess(
        kept,
        features,
        starts,
        ends,
        version_2,
        max_answer_length=max_answer_length,
        null_threshold=null_threshold,
    )
    metrics = squad_metrics(predictions, examples)
    if version_2:
        metrics["best_f1"], metrics["best_f1_thresh"] = best_null_threshold(examples, predictions, margins)
    return metrics, predictions, dict(skipped)


# ---------------------------------------------------------------------------------------------
# `rpp-triton finetune --task squad|squad_v2|pydoc-qa|pydoc-qa-v2`


def qa_defaults(args) -> None:
    """Fill the options `finetune` leaves unset with question-answering defaults, and check them."""
    offline = args.train_file is None and (args.task or "").startswith(OFFLINE_TASK)
    if getattr(args, "epochs", None) is None:
        args.epochs = 3.0 if offline else 2.0
    if args.max_length is None:
        args.max_length = 192 if offline else 384
    stride = getattr(args, "doc_stride", None)
    args.doc_stride = stride if stride is not None else args.max_length // 3
    for name in ("max_steps", "batch_size", "max_length"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_length < 16:
        raise UsageError(f"--max-length must be at least 16 for question answering, got {args.max_length}")
    if not 0 <= args.doc_stride < args.max_length // 2:
        raise UsageError(f"--doc-stride must be in [0, max_length / 2), got {args.doc_stride}")
    if getattr(args, "epochs", 1.0) <= 0 or getattr(args, "lr", 1.0) <= 0:
        raise UsageError("--epochs and --lr must be positive")


def _print_metrics(label: str, m: dict) -> str:
    text = f"exact {m['exact']:.2f}, F1 {m['f1']:.2f} ({m['total']} questions)"
    if "HasAns_f1" in m:
        text += f"; answerable F1 {m['HasAns_f1']:.2f}, unanswerable {m['NoAns_f1']:.2f}"
    print(f"{label}: {text}")
    return text


def finetune_qa(args) -> dict:
    """Fine-tune a question-answering head on a (pruned) encoder with its masks frozen; the same
    Trainer, optimizer groups and atomic output as the classification fine-tuning."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, set_seed

    from rpp_triton import artifacts as A
    from rpp_triton.pipeline import (
        finetune_training_arguments,
        frozen_mask_optimizer,
        publish_finetuned,
        start_finetune,
    )
    from rpp_triton.tiles import mask_digest, sparsity_of
    from rpp_triton.training import hub as common
    from rpp_triton.training import trainer as T

    qa_defaults(args)
    started = time.time()
    partial, model_name, source_report, masks = start_finetune(args)
    data = load_qa_task(args.task, args.train_file, args.validation_file)
    tokenizer = common.load_pretrained(AutoTokenizer, model_name)
    skipped = collections.Counter(data.skipped)
    train_rows = prepare_train_features(tokenizer, data.train, args.max_length, args.doc_stride, skipped)
    if not train_rows:
        raise UsageError(f"no usable training questions ({describe_skips(skipped)})")

    set_seed(args.seed)
    model = common.load_pretrained(AutoModelForQuestionAnswering, model_name)
    optimizer, named, block = frozen_mask_optimizer(model, masks, source_report, args)
    sparsity_before, digest_before = sparsity_of(w for _, w in named), mask_digest(named)

    def score(label):
        m, _, eval_skipped = evaluate_qa(
            model, tokenizer, data.eval, data.version_2, args.max_length, args.doc_stride, args.batch_size
        )
        if A.is_main_process():
            _print_metrics(label, m)
        return m, eval_skipped

    metrics_before, _ = score("before fine-tuning")

    A.start_partial(partial, args.resume_from_checkpoint)
    targs = finetune_training_arguments(partial, args)
    trainer = T.make_trainer_class()(
        model=model,
        args=targs,
        train_dataset=train_rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics, eval_skipped = score("after fine-tuning")

    sparsity_after, digest_after = sparsity_of(w for _, w in named), mask_digest(named)
    if digest_after != digest_before:
        raise RuntimeError("the sparsity pattern changed during fine-tuning although the masks were frozen")
    skipped.update(eval_skipped)
    report = {
        "task": data.name,
        "version_2": data.version_2,
        "metrics": metrics,
        "metrics_before": metrics_before,
        "metric_names": ["exact", "f1"],
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "masks_unchanged": True,
        "masks_identical_on_all_ranks": T.ranks_agree(digest_after),
        "model": "all-MiniLM-L6-v2 (embedded)" if args.model is None else args.model,
        "train_examples": len(data.train),
        "train_windows": len(train_rows),
        "eval_examples": len(data.eval),
        "skipped": {k: n for k, n in skipped.items() if n},
        "max_length": args.max_length,
        "doc_stride": args.doc_stride,
        "steps": trainer.state.global_step,
        "world_size": A.world_size(),
        "seconds": round(time.time() - started, 1),
    }
    if trainer.is_world_process_zero():
        publish_finetuned(trainer, partial, args, report, named, block, source_report)
        if any(skipped.values()):
            print(f"skipped: {describe_skips(skipped)}")
        print(f"sparsity before {sparsity_before:.4f}, after {sparsity_after:.4f} (masks frozen)")
        print(f"wrote {args.output_dir} ({report['seconds']} s)")
    return report
