"""The SQuAD scores against hand-computed values, per version, with the degenerate cases where
v1.1 and v2.0 part: golds that normalise to "", empty against empty, questions without golds, the
no-answer threshold and the best-threshold search with its tie handling."""

import pytest

from rpp_triton.qa import metric as M


def ex(qid, *golds):
    return {"id": qid, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}}


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theatre of Anna", "theatre of anna"),  # articles only as whole words
        ("  U.S.A.  ", "usa"),
        ("the", ""),
        ("a-b", "ab"),  # punctuation goes before the words are split
    ],
)
def test_normalize_answer(text, normalised):
    assert M.normalize_answer(text) == normalised


def test_exact_and_f1_hand_computed():
    assert M.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert M.exact_match("Eiffel Towers", "Eiffel tower") == 0.0
    for f1 in (M.f1_v1, M.f1_v2):
        # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1
        assert f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
        # repeated tokens count once per match: common = 1 cat + 1 dog, P = R = 2/3
        assert f1("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
        assert f1("red", "blue") == 0.0
        assert f1("", "x") == 0.0 and f1("x", "") == 0.0


def test_empty_against_empty_is_zero_in_v1_and_one_in_v2():
    assert M.f1_v1("", "") == 0.0 and M.f1_v1("the", "a") == 0.0
    assert M.f1_v2("", "") == 1.0 and M.f1_v2("the", "a") == 1.0


def test_v1_keeps_golds_that_normalise_to_nothing():
    examples = [ex("a", "the"), ex("b", "the"), ex("c", "Denver", "the"), ex("d", "1996")]
    preds = {"a": "", "b": "An", "c": "Denver"}  # d has no prediction
    m = M.squad_v1(preds, examples)
    # a, b: exact against "the" (both normalise to ""), F1 0; c: both 1; d: missing, 0
    assert m == {"exact": pytest.approx(75.0), "f1": pytest.approx(25.0), "total": 4}
    assert M.gold_texts(ex("a", "the"), version_2=False) == ["the"]


def test_v1_refuses_a_question_without_gold():
    with pytest.raises(ValueError, match="'x' has no gold answer"):
        M.squad_v1({"x": ""}, [ex("x")])


def test_v2_drops_empty_golds_but_keeps_the_question_answerable():
    examples = [ex("the", "the"), ex("none"), ex("mixed", "The", "Denver"), ex("plain", "Paris")]
    assert M.gold_texts(examples[0], version_2=True) == [""]
    assert M.gold_texts(examples[2], version_2=True) == ["Denver"]
    preds = {"the": "", "none": "", "mixed": "", "plain": "paris!"}
    m = M.squad_v2(preds, examples)
    # "the": "" against [""] scores 1 and 1; "none": 1; "mixed": "" against "Denver": 0; "plain": 1
    assert m["exact"] == m["f1"] == pytest.approx(75.0) and m["total"] == 4
    # answerable is read from the raw answer list: "the" counts as answerable
    assert m["HasAns_total"] == 3 and m["NoAns_total"] == 1
    assert m["HasAns_exact"] == pytest.approx(200 / 3) and m["NoAns_f1"] == 100.0
    assert "best_f1" not in m  # no no-answer scores, no threshold search


def test_v2_breakdowns_only_for_kinds_present():
    m = M.squad_v2({"a": "x"}, [ex("a", "x")])
    assert {"HasAns_exact", "HasAns_f1", "HasAns_total"} <= set(m) and "NoAns_total" not in m


def test_v2_no_answer_threshold():
    examples = [ex("a", "Denver Broncos"), ex("b"), ex("c", "1996")]
    spans = {"a": "the Broncos", "b": "Paris", "c": "1996"}
    na = {"a": -1.0, "b": 2.0, "c": 0.5}
    m = M.squad_v2(spans, examples, na, na_prob_thresh=0.0)
    # a answered: F1 vs "denver broncos" P = 1, R = 1/2 -> 2/3, exact 0; b over the threshold and
    # unanswerable: 1; c over the threshold but answerable: 0
    assert m["exact"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)
    assert m["NoAns_exact"] == 100.0 and m["HasAns_f1"] == pytest.approx(100 * (2 / 3) / 2)
    # best F1: answer a (+2/3) and c (+1), leave b: 100 * (2/3 + 1 + 1) / 3 reached at na = 0.5
    assert m["best_f1"] == pytest.approx(100 * (8 / 3) / 3) and m["best_f1_thresh"] == 0.5
    assert m["best_exact"] == pytest.approx(100 * 2 / 3) and m["best_exact_thresh"] == 0.5


def test_best_threshold_is_zero_when_answering_nothing_is_best():
    examples = [ex("a", "x"), ex("b")]
    # a's span is wrong, b answered: answering anything only loses
    m = M.squad_v2({"a": "y", "b": "z"}, examples, {"a": -3.0, "b": -2.0}, na_prob_thresh=1.0)
    assert m["best_f1"] == 50.0 and m["best_f1_thresh"] == 0.0
    assert m["f1"] == 0.0  # both under the threshold: answered, and wrong


def test_best_threshold_ties_follow_the_order_of_the_scores():
    examples = [ex("a", "x"), ex("b")]
    preds = {"a": "x", "b": "y"}
    # Equal no-answer scores: the search answers one question at a time in the order of `na_probs`
    # and keeps the first strict improvement, although no threshold can answer a and not b.
    first_a = M.squad_v2(preds, examples, {"a": 1.0, "b": 1.0})
    assert first_a["best_f1"] == 100.0 and first_a["best_f1_thresh"] == 1.0
    first_b = M.squad_v2(preds, examples, {"b": 1.0, "a": 1.0})
    assert first_b["best_f1"] == 50.0 and first_b["best_f1_thresh"] == 0.0
    # an equal total later on does not move the threshold
    tie = M.squad_v2({"a": "x", "b": ""}, examples, {"a": 0.5, "b": 0.7})
    assert tie["best_f1"] == 100.0 and tie["best_f1_thresh"] == 0.5


def test_best_threshold_counts_a_blank_prediction_as_an_answer():
    # the search reads the raw prediction: " " is not empty, so answering b costs 1
    m = M.squad_v2({"a": "nope", "b": " "}, [ex("a", "x"), ex("b")], {"a": 0.0, "b": 1.0})
    assert m["best_exact"] == 50.0 and m["best_exact_thresh"] == 0.0
    assert m["NoAns_exact"] == 100.0  # scored, " " normalises to "" like the empty gold


def test_missing_predictions_score_zero_in_both_versions():
    examples = [ex("a", "x"), ex("b")]
    assert M.squad_v1({}, examples[:1]) == {"exact": 0.0, "f1": 0.0, "total": 1}
    m = M.squad_v2({"a": "x"}, examples, {"a": 0.0})
    assert m["exact"] == 50.0 and m["NoAns_exact"] == 0.0 and m["total"] == 2
    assert m["best_f1"] == 50.0  # b never counts, answered or not


def test_bad_calls():
    with pytest.raises(ValueError, match="no questions"):
        M.squad_v1({}, [])
    with pytest.raises(ValueError, match="no-answer score"):
        M.squad_v2({"a": "x"}, [ex("a", "x")], {})
    assert M.squad_metrics({"a": "the"}, [ex("a", "the")], version_2=False)["f1"] == 0.0
    assert M.squad_metrics({"a": "the"}, [ex("a", "the")], version_2=True)["f1"] == 100.0
