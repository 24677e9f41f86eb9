"""Question answering without torch (the server imports it): a context split into overlapping
windows of `max_length` tokens (`stride` tokens shared), answer spans as token positions, and the
best span of each example over its windows.

A window that does not hold the whole answer is labelled with the [CLS] position. The best span is
the highest `start + end` logit sum with `start <= end < start + max_answer_length`, both inside the
context; for v2.0 the null answer wins when `null_score - best_span_score > null_threshold`
(null_score: [CLS] start + end, lowest over the windows).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from rpp_triton.errors import UsageError


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


def apply_null_threshold(answers: dict[str, str], null_margin: dict[str, float], null_threshold: float):
    """v2.0's answers: empty where the null answer beats the best span by more than the threshold."""
    return {q: "" if null_margin[q] > null_threshold else text for q, text in answers.items()}


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
    span's score; with `version_2` the answer is empty when it exceeds `null_threshold`)."""
    spans = best_spans(examples, features, start_logits, end_logits, n_best, max_answer_length)
    answers = {ex["id"]: span.text for ex, span in zip(examples, spans)}
    null_margin = {ex["id"]: span.null_margin for ex, span in zip(examples, spans)}
    if version_2:
        answers = apply_null_threshold(answers, null_margin, null_threshold)
    return answers, null_margin
