"""Task metrics, written out so they need nothing beyond numpy: accuracy, binary and macro F1,
Matthews correlation, Pearson and Spearman correlation."""

from __future__ import annotations

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float((pred == gold).mean()) if gold.size else 0.0


def f1(pred, gold, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP convention)."""
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((pred & gold).sum())
    denom = float(pred.sum() + gold.sum())
    return 2 * tp / denom if denom else 0.0


def macro_f1(pred, gold) -> float:
    classes = np.unique(np.concatenate([np.asarray(pred), np.asarray(gold)]))
    return float(np.mean([f1(pred, gold, c) for c in classes])) if classes.size else 0.0


def matthews(pred, gold) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when either side is constant."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    classes = np.unique(np.concatenate([pred, gold]))
    index = {c: i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)))
    for p, g in zip(pred, gold):
        conf[index[g], index[p]] += 1
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (t * p).sum()) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names, pred, gold) -> dict[str, float]:
    return {name: METRICS[name](pred, gold) for name in names}
