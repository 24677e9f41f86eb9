"""GLUE task metrics: hand-computed values, and scikit-learn / scipy as oracles (where installed) on
random and degenerate input: constant and NaN predictions, empty input, string labels."""

import math
import warnings

import numpy as np
import pytest

from rpp_triton import metrics as M


def test_metrics_against_hand_computed_values():
    assert M.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp=2 fp=1 fn=1 -> F1 = 4 / 6
    assert M.f1([1, 1, 1, 0], [1, 1, 0, 1]) == pytest.approx(2 / 3)
    # confusion tp=2 tn=1 fp=1 fn=0: (2*1 - 1*0) / sqrt(3*2*1*2)
    assert M.matthews([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / np.sqrt(12))
    assert M.matthews([1, 1, 1], [0, 1, 0]) == 0.0
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [10, 20, 30, 1]) == pytest.approx(-0.2)
    assert M.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)  # ties share ranks


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_scikit_learn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    pred, gold = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    assert M.accuracy(pred, gold) == pytest.approx(skm.accuracy_score(gold, pred))
    assert M.macro_f1(pred, gold) == pytest.approx(skm.f1_score(gold, pred, average="macro"))
    assert M.matthews(pred, gold) == pytest.approx(skm.matthews_corrcoef(gold, pred))
    binary_pred, binary_gold = pred % 2, gold % 2
    assert M.f1(binary_pred, binary_gold) == pytest.approx(skm.f1_score(binary_gold, binary_pred))
    words = np.array(["no", "yes", "maybe"])
    assert M.macro_f1(words[pred], words[gold]) == pytest.approx(
        skm.f1_score(words[gold], words[pred], average="macro")
    )


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    x = rng.normal(size=40)
    y = x + rng.normal(size=40)
    y[::7] = y[0]  # ties
    assert M.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])


DEGENERATE = {
    "constant prediction": ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
    "constant label": ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),
    "NaN prediction": ([1.0, math.nan, 3.0], [1.0, 2.0, 3.0]),
    "two values": ([1.0, 2.0], [3.0, 1.0]),
    "infinite prediction": ([1.0, math.inf, 3.0], [1.0, 2.0, 3.0]),
}


@pytest.mark.parametrize("case", DEGENERATE, ids=str)
def test_correlations_on_degenerate_input_follow_scipy(case):
    stats = pytest.importorskip("scipy.stats")
    x, y = DEGENERATE[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about constant input
        want_p, want_s = stats.pearsonr(x, y)[0], stats.spearmanr(x, y)[0]
    for got, want in ((M.pearson(x, y), want_p), (M.spearman(x, y), want_s)):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want), (case, got, want)


def test_correlations_on_too_little_input():
    with pytest.raises(ValueError, match="at least 2"):
        M.pearson([1.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        M.pearson([], [])
    assert math.isnan(M.spearman([], [])) and math.isnan(M.spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="do not pair"):
        M.spearman([1.0, 2.0, 3.0], [1.0, 2.0])


@pytest.mark.parametrize(
    "pred, gold, message",
    [
        ([], [], "no examples"),
        ([1.0, math.nan], [1, 0], "NaN"),
        ([0.5, 1.0], [0, 1], "continuous"),
        (["1", "0"], [1, 0], "mix strings and numbers"),
        ([1, 0, 1], [1, 0], "do not pair"),
    ],
    ids=["empty", "NaN", "continuous", "strings and numbers", "lengths"],
)
def test_classification_metrics_refuse_bad_input(pred, gold, message):
    for metric in (M.accuracy, M.macro_f1, M.matthews, M.f1):
        with pytest.raises(ValueError, match=message):
            metric(pred, gold)


def test_binary_f1_needs_its_positive_class():
    with pytest.raises(ValueError, match="positive class 1 is not one of the labels"):
        M.f1(["yes", "no"], ["yes", "no"])
    with pytest.raises(ValueError, match="positive class 1"):
        M.f1(["yes"], ["yes"])
    with pytest.raises(ValueError, match="positive class 1"):
        M.f1([0, 2], [2, 0])
    with pytest.raises(ValueError, match="3 classes"):
        M.f1([0, 1, 2], [0, 1, 2])
    assert M.f1(["yes", "no"], ["yes", "yes"], positive="yes") == pytest.approx(2 / 3)
    assert M.f1([0, 0], [0, 0]) == 0.0  # the positive class never occurs (scikit-learn: 0.0)


def test_score_logits():
    names = ("accuracy", "macro_f1")
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert M.score_logits(names, logits, [0, 1, 1], regression=False)["accuracy"] == pytest.approx(2 / 3)
    logits[1, 0] = math.nan  # a diverged model has no class to read off
    assert all(math.isnan(v) for v in M.score_logits(names, logits, [0, 1, 1], False).values())
    scores = M.score_logits(("pearson", "spearman"), np.full((3, 1), 0.5), [0.0, 1.0, 2.0], regression=True)
    assert all(math.isnan(v) for v in scores.values())  # a constant regressor correlates with nothing
