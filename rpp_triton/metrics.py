"""GLUE task metrics in numpy, with the semantics of scikit-learn (accuracy, F1, Matthews) and
scipy (Pearson, Spearman), so bad input is never hidden behind a plausible number:
- classification metrics refuse empty input, NaN, non-integral values and strings mixed with
  numbers (ValueError); binary F1 refuses more than two classes, and a positive class that is not
  a label where the labels are strings or two classes are present;
- Pearson needs two values or more (ValueError) and is NaN for constant input or any NaN/inf;
  Spearman is NaN for fewer than two values, constant input or any NaN (inf ranks last).
`score_logits` turns a model's outputs into these scores: NaN throughout when a classifier's
logits are not finite, as no class can be read off them.
"""

from __future__ import annotations

import numpy as np


def _pair(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"predictions of shape {pred.shape} do not pair with labels of shape {gold.shape}")
    return pred, gold


def _labels(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    """Class labels, checked as scikit-learn checks them."""
    pred, gold = _pair(pred, gold)
    if not gold.size:
        raise ValueError("no examples to score")
    for what, a in (("predictions", pred), ("labels", gold)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{what} contain NaN or infinity")
        if a.dtype.kind == "f" and (a != np.round(a)).any():
            raise ValueError(f"{what} are continuous values, not class labels")
    if (pred.dtype.kind in "USO") != (gold.dtype.kind in "USO"):
        raise ValueError("predictions and labels mix strings and numbers")
    return pred, gold


def accuracy(pred, gold) -> float:
    pred, gold = _labels(pred, gold)
    return float((pred == gold).mean())


def _class_f1(pred: np.ndarray, gold: np.ndarray, positive) -> float:
    pred, gold = pred == positive, gold == positive
    denom = float(pred.sum() + gold.sum())
    return 2 * float((pred & gold).sum()) / denom if denom else 0.0


def f1(pred, gold, positive=1) -> float:
    """F1 of the positive class (GLUE's MRPC/QQP convention); 0.0 where it never occurs."""
    pred, gold = _labels(pred, gold)
    present = np.union1d(pred, gold).tolist()
    if len(present) > 2:
        raise ValueError(f"binary F1 got {len(present)} classes; use macro_f1")
    if positive not in present and (len(present) == 2 or gold.dtype.kind in "USO"):
        raise ValueError(f"the positive class {positive!r} is not one of the labels {present}")
    return _class_f1(pred, gold, positive)


def macro_f1(pred, gold) -> float:
    """Mean F1 over every class in the predictions or the labels."""
    pred, gold = _labels(pred, gold)
    return float(np.mean([_class_f1(pred, gold, c) for c in np.union1d(pred, gold)]))


def matthews(pred, gold) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when either side is constant."""
    pred, gold = _labels(pred, gold)
    classes = np.union1d(pred, gold)
    conf = np.zeros((len(classes), len(classes)))
    np.add.at(conf, (np.searchsorted(classes, gold), np.searchsorted(classes, pred)), 1)
    t, p = conf.sum(1), conf.sum(0)
    c, s = np.trace(conf), conf.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (t * p).sum()) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = (a.astype(np.float64) for a in _pair(x, y))
    if len(x) < 2:
        raise ValueError("Pearson's correlation needs at least 2 values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0)) if denom else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
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
    x, y = (a.astype(np.float64) for a in _pair(x, y))
    if len(x) < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
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


def score_logits(names, logits, labels, regression: bool) -> dict[str, float]:
    """`names` scored from a model's outputs: the regression value, or the classifier's arg-max
    class (NaN for every metric when any logit is NaN or infinite)."""
    logits = np.asarray(logits)
    if regression:
        return compute(names, logits.reshape(-1), labels)
    if not np.isfinite(logits).all():
        return {name: float("nan") for name in names}
    return compute(names, logits.argmax(-1), labels)
