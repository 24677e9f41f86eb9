"""The SQuAD scores, per version, by the rules of the official `evaluate-v1.1.py` and
`evaluate-v2.0.py`.

Both versions normalise answers alike (lower case, no punctuation, no articles a/an/the, single
spaces) and take a question's best score over its gold answers. They part where answers are empty:
- v1.1 keeps every gold text, one that normalises to "" ("the") included, and its F1 is 0 whenever
  no token is shared: "" against "the" scores exact 1 but F1 0.
- v2.0 drops gold texts that normalise to "" and scores a question left with none against "" alone;
  its F1 is 1 when both sides are empty and 0 when one is. Whether a question is answerable
  (`HasAns_*` / `NoAns_*`) is read before that filter: a question whose only gold is "the" is
  answerable, and scored against "".
- v2.0 with no-answer scores (`na_probs`; here the null score minus the best span's score): a
  question whose score exceeds the threshold counts as unanswered and scores 1 exactly when it has
  no gold answers; `best_exact` / `best_f1` are the best totals over every threshold, found the way
  the official script finds them (see `best_threshold`).

Exact match is reported as `exact` for both versions (v1.1's script calls it `exact_match`). A
question without a prediction scores 0, as v1.1's script scores it (v2.0's stops on it).
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _overlap_f1(pred: list[str], gold: list[str]) -> float:
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1_v1(prediction: str, gold: str) -> float:
    """v1.1 token F1: 0 whenever no token is shared, empty against empty included."""
    return _overlap_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def f1_v2(prediction: str, gold: str) -> float:
    """v2.0 token F1: when either side is empty, 1 if both are and 0 otherwise."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    return _overlap_f1(pred, ref)


def gold_texts(example: dict, version_2: bool) -> list[str]:
    """The gold texts a prediction is scored against (see the module docstring)."""
    texts = list(example["answers"]["text"])
    if version_2:
        return [t for t in texts if normalize_answer(t)] or [""]
    if not texts:
        raise ValueError(f"question {example['id']!r} has no gold answer, which SQuAD v1.1 cannot score")
    return texts


def raw_scores(predictions: dict, examples: list[dict], version_2: bool) -> tuple[dict, dict]:
    """({id: exact}, {id: F1}) of the questions that have a prediction, best over the golds."""
    f1 = f1_v2 if version_2 else f1_v1
    exact_by_id, f1_by_id = {}, {}
    for ex in examples:
        golds = gold_texts(ex, version_2)
        if ex["id"] in predictions:
            pred = predictions[ex["id"]]
            exact_by_id[ex["id"]] = max(exact_match(pred, g) for g in golds)
            f1_by_id[ex["id"]] = max(f1(pred, g) for g in golds)
    return exact_by_id, f1_by_id


def _totals(exact: dict, f1: dict, ids: list) -> dict:
    if not ids:
        raise ValueError("no questions to score")
    n = len(ids)
    return {
        "exact": 100.0 * sum(exact.get(i, 0.0) for i in ids) / n,
        "f1": 100.0 * sum(f1.get(i, 0.0) for i in ids) / n,
        "total": n,
    }


def squad_v1(predictions: dict[str, str], examples: list[dict]) -> dict:
    """`exact`, `f1` (percent) and `total` as evaluate-v1.1.py computes them."""
    exact, f1 = raw_scores(predictions, examples, version_2=False)
    return _totals(exact, f1, [ex["id"] for ex in examples])


def best_threshold(
    predictions: dict[str, str], scores: dict, na_probs: dict, has_ans: dict
) -> tuple[float, float]:
    """(best total in percent, its threshold) over no-answer thresholds, searched as the official
    v2.0 script searches: start with every question unanswered, then answer them in order of
    rising no-answer score (ties keep `na_probs`' order), one at a time, and keep the first score
    at which the running total strictly improved (0.0 when answering none is best). Answering a
    question without gold answers costs 1 when its prediction is a non-empty string."""
    total = sum(1 for q in scores if not has_ans[q])
    best, thresh = total, 0.0
    for qid in sorted(na_probs, key=na_probs.get):
        if qid not in scores:
            continue
        if has_ans[qid]:
            total += scores[qid]
        elif predictions[qid]:
            total -= 1
        if total > best:
            best, thresh = total, na_probs[qid]
    return 100.0 * best / len(has_ans), float(thresh)


def squad_v2(
    predictions: dict[str, str],
    examples: list[dict],
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """`exact`, `f1`, `total`, the `HasAns_*` / `NoAns_*` breakdowns and, with no-answer scores,
    `best_exact(_thresh)` and `best_f1(_thresh)`, as evaluate-v2.0.py computes them."""
    exact_raw, f1_raw = raw_scores(predictions, examples, version_2=True)
    has_ans = {ex["id"]: bool(ex["answers"]["text"]) for ex in examples}
    if na_probs is not None and not set(exact_raw) <= set(na_probs):
        raise ValueError("every question with a prediction needs a no-answer score")

    def thresholded(scores: dict) -> dict:
        if na_probs is None:
            return scores
        return {q: float(not has_ans[q]) if na_probs[q] > na_prob_thresh else s for q, s in scores.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    out = _totals(exact, f1, list(has_ans))
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        ids = [q for q, h in has_ans.items() if h == answerable]
        if ids:
            out.update({f"{prefix}_{k}": v for k, v in _totals(exact, f1, ids).items()})
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            out[f"best_{name}"], out[f"best_{name}_thresh"] = best_threshold(
                predictions, raw, na_probs, has_ans
            )
    return out


def squad_metrics(
    predictions: dict[str, str],
    examples: list[dict],
    version_2: bool,
    na_probs: dict[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict:
    """The official scores of `version_2` (v2.0) or v1.1 (which has no no-answer scores)."""
    if version_2:
        return squad_v2(predictions, examples, na_probs, na_prob_thresh)
    return squad_v1(predictions, examples)
