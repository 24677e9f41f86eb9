"""GLUE task metrics against hand-computed values."""

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
