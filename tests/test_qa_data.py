"""Question-answering data and windows: bad SQuAD input counted or refused in one line, SQuAD-shaped
datasets from a local dataset folder, the offline pydoc-qa set, and windows that split an answer
(pre- and post-processing round trip)."""

import collections
import json
import re

import numpy as np
import pytest

from rpp_triton.data.sources import DataOptions
from rpp_triton.errors import UsageError
from rpp_triton.qa import data as D
from rpp_triton.qa import features as F
from rpp_triton.qa.evaluate import evaluate_qa
from rpp_triton.qa.metric import normalize_answer


@pytest.fixture(scope="module")
def tokenizer(qa_bert_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qa_bert_dir)


# ---- windows: pre- and post-processing --------------------------------------------------------


def split_answer_example():
    words = [f"word{i}" for i in range(60)]
    context = " ".join(words[:30] + ["alpha beta gamma delta"] + words[30:])
    answer = "alpha beta gamma delta"
    return {
        "id": "q1",
        "question": "Which words?",
        "context": context,
        "answers": {"text": [answer], "answer_start": [context.index(answer)]},
    }


def test_windows_round_trip_an_answer_split_between_windows(tokenizer):
    ex = split_answer_example()
    skipped = collections.Counter()
    kept, features = F.prepare_eval_features(tokenizer, [ex], max_length=32, stride=8, skipped=skipped)
    train = F.prepare_train_features(tokenizer, [ex], max_length=32, stride=8, skipped=skipped)
    assert kept == [ex] and len(features) == len(train) > 3 and not any(skipped.values())
    start_char = ex["answers"]["answer_start"][0]
    end_char = start_char + len(ex["answers"]["text"][0])
    holding, split = [], []
    for k, (f, t) in enumerate(zip(features, train)):
        ctx = [o for o in f["offsets"] if o is not None]
        whole = ctx[0][0] <= start_char and ctx[-1][1] >= end_char
        touches = ctx[0][0] < end_char and ctx[-1][1] > start_char
        if whole:
            holding.append(k)
            # the labelled tokens decode back to exactly the answer
            s, e = t["start_positions"], t["end_positions"]
            assert ex["context"][f["offsets"][s][0] : f["offsets"][e][1]] == ex["answers"]["text"][0]
        else:
            assert t["start_positions"] == t["end_positions"] == 0  # [CLS]
            if touches:
                split.append(k)
    assert holding and split, "the stride should give a window that cuts the answer"

    # Logits that point at the labelled span in one window (and at a decoy in the window that cuts
    # the answer, with a lower score) come back as the answer text.
    starts, ends = [], []
    for k, (f, t) in enumerate(zip(features, train)):
        s, e = np.full(len(f["offsets"]), -5.0), np.full(len(f["offsets"]), -5.0)
        if k == holding[0]:
            s[t["start_positions"]], e[t["end_positions"]] = 4.0, 4.0
        elif k == split[0]:
            ctx = [i for i, o in enumerate(f["offsets"]) if o is not None]
            s[ctx[-1]], e[ctx[-1]] = 3.0, 3.0
        starts.append(s)
        ends.append(e)
    preds, margins = F.postprocess(kept, features, starts, ends)
    assert preds == {"q1": ex["answers"]["text"][0]}
    assert margins["q1"] == pytest.approx(-10 - 8)
    # v2.0: a confident [CLS] wins unless the threshold lets the span through
    for s in starts:
        s[0] = 20.0
    preds, margins = F.postprocess(kept, features, starts, ends, version_2=True)
    assert preds == {"q1": ""} and margins["q1"] == pytest.approx(15 - 8)
    preds, _ = F.postprocess(kept, features, starts, ends, version_2=True, null_threshold=7.5)
    assert preds == {"q1": ex["answers"]["text"][0]}
    # answers longer than max_answer_length are never chosen
    preds, _ = F.postprocess(kept, features, starts, ends, max_answer_length=2)
    assert preds["q1"] != ex["answers"]["text"][0]


def test_question_longer_than_window_is_counted_and_scored_zero(qa_bert_dir, tokenizer):
    from transformers import AutoModelForQuestionAnswering

    ex = split_answer_example()
    long_q = dict(ex, id="long", question=" ".join(["which"] * 40) + "?")
    skipped = collections.Counter()
    assert F.prepare_train_features(tokenizer, [long_q], 32, 8, skipped) == []
    assert skipped["question_too_long"] == 1
    model = AutoModelForQuestionAnswering.from_pretrained(qa_bert_dir)
    metrics, preds, margins, skipped = evaluate_qa(model, tokenizer, [ex, long_q], False, 32, 8)
    assert skipped == {"question_too_long": 1} and metrics["total"] == 2 and "long" not in preds
    assert set(margins) == {"q1"}


# ---- bad input --------------------------------------------------------------------------------


def test_bad_entries_are_counted_and_skipped(tmp_path):
    ctx = "Ada Lovelace wrote the first program."
    good = {"id": "ok", "question": "Who wrote it?", "answers": [{"text": "Ada Lovelace", "answer_start": 0}]}
    qas = [
        good,
        {"id": "moved", "question": "Who?", "answers": [{"text": "Ada Lovelace", "answer_start": 3}]},
        {"id": "blank", "question": "  ", "answers": [{"text": "Ada", "answer_start": 0}]},
        {"id": "ok", "question": "Again?", "answers": [{"text": "Ada", "answer_start": 0}]},  # duplicate id
        {"question": "No id?", "answers": []},
        {"id": "bad-answer", "question": "What?", "answers": [{"txt": "Ada"}]},
        {"id": "none", "question": "Why?", "answers": []},  # no answer: skipped in v1.1 only
        # one answer moved, one right: the right one is kept
        {
            "id": "half",
            "question": "What did she write?",
            "answers": [
                {"text": "program", "answer_start": 0},
                {"text": "the first program", "answer_start": 19},
            ],
        },
    ]
    doc = {
        "data": [{"paragraphs": [{"context": ctx, "qas": qas}, {"context": "", "qas": [dict(good, id="e")]}]}]
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    skipped = collections.Counter()
    rows = D.load_squad_file(str(path), False, skipped)
    assert [r["id"] for r in rows] == ["ok", "half"]
    assert rows[1]["answers"] == {"text": ["the first program"], "answer_start": [19]}
    assert skipped == {
        "answer_mismatch": 1,
        "empty_question": 1,
        "duplicate_id": 1,
        "malformed": 2,
        "no_answer_v1": 1,
        "empty_context": 1,
    }
    skipped = collections.Counter()
    rows = D.load_squad_file(str(path), True, skipped)
    assert [r["id"] for r in rows] == ["ok", "none", "half"] and "no_answer_v1" not in skipped


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"data": [', "malformed JSON (line 1"),
        ("[1, 2]", "not SQuAD JSON"),
        ('{"data": {"paragraphs": []}}', "not SQuAD JSON"),
    ],
    ids=["truncated", "list", "data-not-a-list"],
)
def test_malformed_json_is_one_clear_error(tmp_path, text, needle):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(needle)):
        D.load_squad_file(str(path), False, collections.Counter())


def test_pydoc_qa_offline_set():
    train, held = D.pydoc_qa()
    assert len(train) > 400 and len(held) > 80
    skipped = collections.Counter()
    assert D.check_examples(train + held, False, skipped) == train + held and not skipped  # all at offset
    assert not {r["context"] for r in train} & {r["context"] for r in held}
    assert all(normalize_answer(r["answers"]["text"][0]) for r in train + held)
    train2, held2 = D.pydoc_qa(version_2=True)
    none = [r for r in train2 + held2 if not r["answers"]["text"]]
    assert len(none) > 50 and all(r["id"].endswith("-none") for r in none)


def write_squad_folder(root, train, held) -> str:
    """A local dataset folder in the hub's SQuAD layout: one JSON-lines file per split."""
    root.mkdir()
    for split, rows in (("train", train), ("validation", held)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def test_squad_shaped_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, held = D.pydoc_qa(version_2=True)
    broken = dict(held[0], id="moved", answers={"text": ["zzz"], "answer_start": [0]})
    folder = write_squad_folder(tmp_path / "squad-like", train[:40], [*held[:10], broken])
    data = D.load_qa_task(DataOptions(task="squad_v2", dataset=folder))
    assert data.version_2 and [r["id"] for r in data.train] == [r["id"] for r in train[:40]]
    assert data.eval == held[:10] and data.skipped == {"answer_mismatch": 1}
    scored = D.load_qa_task(
        DataOptions(task="squad", dataset=folder, validation_split="train"), need_train=False
    )
    assert not scored.train and len(scored.eval) == len([r for r in train[:40] if r["answers"]["text"]])
    with pytest.raises(UsageError, match=r"has no split 'dev' \(splits: train, validation\)"):
        D.load_qa_task(DataOptions(task="squad", dataset=folder, validation_split="dev"))
    with pytest.raises(UsageError, match="hub is offline.*--train-file"):
        D.load_qa_task(DataOptions(task="squad", dataset="someone/squad-mirror"))
