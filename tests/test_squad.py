"""Question answering: the official EM/F1 metric against hand-computed values, windows that split an
answer (pre- and post-processing round trip), bad SQuAD input counted or refused in one line, and
`finetune` / `evaluate` end to end on a tiny BERT (local SQuAD files, a pruned model, the offline
pydoc-qa set, where a few dozen steps must beat the untrained start)."""

import collections
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_bert import write_text  # noqa: E402

from rpp_triton import squad as S  # noqa: E402
from rpp_triton.cli import main  # noqa: E402
from rpp_triton.errors import UsageError  # noqa: E402


@pytest.fixture(autouse=True)
def eager_single_thread(monkeypatch):
    # A hidden-32 BERT gains nothing from threads, and on a shared 2-core machine two OpenMP threads
    # run ten times slower than one.
    monkeypatch.setenv("RPP_TRITON_COMPILE", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_qa_bert(path, words: int = 1500, hidden: int = 32, seed: int = 0) -> str:
    """A 2-layer BERT with a WordPiece vocabulary of the offline QA text's most frequent words
    (plus single characters, so nothing is unknown)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    train, _ = S.pydoc_qa()
    text = " ".join([*dict.fromkeys(r["context"] for r in train), *(r["question"] for r in train)]).lower()
    counts = collections.Counter(re.findall(r"[a-z0-9]+", text))
    chars = sorted({c for c in text if not c.isspace()})
    top = sorted(counts, key=lambda w: (-counts[w], w))[:words]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars if c.isalnum())]
    vocab += [w for w in top if w not in set(vocab)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def squad_json(rows, extra_qas=()) -> dict:
    """Rows back into SQuAD's nested format (one paragraph per context), plus raw extra entries."""
    by_context = collections.defaultdict(list)
    for r in rows:
        answers = [
            {"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])
        ]
        qa = {"id": r["id"], "question": r["question"], "answers": answers}
        if not answers:
            qa["is_impossible"] = True
        by_context[r["context"]].append(qa)
    paragraphs = [{"context": c, "qas": qas} for c, qas in by_context.items()]
    paragraphs += list(extra_qas)
    return {"version": "test", "data": [{"title": "t", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    train, held = S.pydoc_qa(version_2=True)
    (root / "train.json").write_text(json.dumps(squad_json(train[:120])))
    (root / "dev.json").write_text(json.dumps(squad_json(held[:30])))
    return {
        "root": root,
        "model": write_qa_bert(root / "model"),
        "train": str(root / "train.json"),
        "dev": str(root / "dev.json"),
        "dev_rows": held[:30],
    }


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


# ---- the official metric ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The  Quick, brown fox!", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theatre of Anna", "theatre of anna"),  # articles only as whole words
        ("  U.S.A.  ", "usa"),
        ("the", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert S.normalize_answer(text) == normalised


def test_exact_and_f1_hand_computed():
    assert S.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert S.exact_match("Eiffel Towers", "Eiffel tower") == 0.0
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1
    assert S.f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    # repeated tokens count once per match: common = 1 cat + 1 dog, P = R = 2/3
    assert S.f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert S.f1_score("red", "blue") == 0.0
    assert S.f1_score("", "") == 1.0 and S.f1_score("", "x") == 0.0 and S.f1_score("x", "") == 0.0


def test_metrics_max_over_gold_and_no_answer_split():
    def ex(qid, *golds):
        return {"id": qid, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}}

    examples = [
        ex("a", "Denver Broncos", "Broncos"),  # exact against the second gold
        ex("b", "Denver Broncos", "Broncos"),  # "the Broncos team": F1 2/3 vs "Broncos", 1/2 vs the other
        ex("c"),  # unanswerable, answered empty: 1
        ex("d"),  # unanswerable, answered: 0
        ex("e", "1996"),  # no prediction at all: counts as empty, 0
        ex("f", "!!", "the"),  # golds that normalise to nothing mean "no answer"
    ]
    preds = {"a": "broncos.", "b": "the Broncos team", "c": "", "d": "Paris", "f": ""}
    m = S.squad_metrics(preds, examples)
    assert m["total"] == 6
    assert m["exact"] == pytest.approx(100 * 3 / 6)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0 + 0 + 1) / 6)
    assert m["HasAns_total"] == 3 and m["NoAns_total"] == 3
    assert m["HasAns_exact"] == pytest.approx(100 / 3)
    assert m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert m["NoAns_exact"] == m["NoAns_f1"] == pytest.approx(200 / 3)
    only_answerable = S.squad_metrics(preds, examples[:2])
    assert "HasAns_f1" not in only_answerable  # no split when there is nothing to split


def test_best_null_threshold():
    examples = [
        {"id": "a", "answers": {"text": ["x"], "answer_start": [0]}},
        {"id": "b", "answers": {"text": [], "answer_start": []}},
    ]
    preds = {"a": "x", "b": "y"}
    # margins: a is confident (-2), b less so (+1): answering a and leaving b empty scores 100
    f1, thresh = S.best_null_threshold(examples, preds, {"a": -2.0, "b": 1.0})
    assert f1 == 100.0 and -2.0 <= thresh < 1.0
    f1, _ = S.best_null_threshold(examples, preds, {"a": 1.0, "b": -2.0})
    assert f1 == 50.0  # b must be answered before a: better leave both empty


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
    kept, features = S.prepare_eval_features(tokenizer, [ex], max_length=32, stride=8, skipped=skipped)
    train = S.prepare_train_features(tokenizer, [ex], max_length=32, stride=8, skipped=skipped)
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
    preds, margins = S.postprocess(kept, features, starts, ends)
    assert preds == {"q1": ex["answers"]["text"][0]}
    assert margins["q1"] == pytest.approx(-10 - 8)
    # v2.0: a confident [CLS] wins unless the threshold lets the span through
    for s in starts:
        s[0] = 20.0
    preds, margins = S.postprocess(kept, features, starts, ends, version_2=True)
    assert preds == {"q1": ""} and margins["q1"] == pytest.approx(15 - 8)
    preds, _ = S.postprocess(kept, features, starts, ends, version_2=True, null_threshold=7.5)
    assert preds == {"q1": ex["answers"]["text"][0]}
    # answers longer than max_answer_length are never chosen
    preds, _ = S.postprocess(kept, features, starts, ends, max_answer_length=2)
    assert preds["q1"] != ex["answers"]["text"][0]


def test_question_longer_than_window_is_counted_and_scored_unanswered(tiny, tokenizer):
    from transformers import AutoModelForQuestionAnswering

    ex = split_answer_example()
    long_q = dict(ex, id="long", question=" ".join(["which"] * 40) + "?")
    skipped = collections.Counter()
    assert S.prepare_train_features(tokenizer, [long_q], 32, 8, skipped) == []
    assert skipped["question_too_long"] == 1
    model = AutoModelForQuestionAnswering.from_pretrained(tiny["model"])
    metrics, preds, skipped = S.evaluate_qa(model, tokenizer, [ex, long_q], False, 32, 8)
    assert skipped == {"question_too_long": 1} and metrics["total"] == 2 and "long" not in preds


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
    rows = S.load_squad_file(str(path), False, skipped)
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
    rows = S.load_squad_file(str(path), True, skipped)
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
        S.load_squad_file(str(path), False, collections.Counter())


def fails(argv, capsys, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rpp-triton {argv[0]}: error:"), err
    for needle in needles:
        assert needle in err, err


def test_cli_bad_input(tiny, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [}')
    out = str(tmp_path / "out")
    base = ["finetune", "--model", tiny["model"], "--output-dir", out]
    fails([*base, "--task", "squad", "--train-file", str(bad)], capsys, "malformed JSON")
    fails([*base, "--task", "squad", "--train-file", str(tmp_path / "nope.json")], capsys, "does not exist")
    empty = tmp_path / "empty.json"
    empty.write_text(
        json.dumps(
            {
                "data": [
                    {"paragraphs": [{"context": "", "qas": [{"id": "1", "question": "Q?", "answers": []}]}]}
                ]
            }
        )
    )
    fails(
        [*base, "--task", "squad", "--train-file", str(empty)], capsys, "no usable questions", "empty context"
    )
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fails([*base, "--task", "squad_v2"], capsys, "offline", "--train-file")
    fails(["evaluate", str(tmp_path / "missing"), "--task", "squad"], capsys, "does not exist")
    fails(["evaluate", tiny["model"], "--task", "squad3"], capsys, "unknown question-answering task")
    fails(
        ["evaluate", tiny["model"], "--task", "squad", "--validation-file", str(bad)],
        capsys,
        "malformed JSON",
    )
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")


# ---- end to end -------------------------------------------------------------------------------


def test_pydoc_qa_offline_set():
    train, held = S.pydoc_qa()
    assert len(train) > 400 and len(held) > 80
    skipped = collections.Counter()
    assert S.check_examples(train + held, False, skipped) == train + held and not skipped  # all at offset
    assert not {r["context"] for r in train} & {r["context"] for r in held}
    assert all(S.normalize_answer(r["answers"]["text"][0]) for r in train + held)
    train2, held2 = S.pydoc_qa(version_2=True)
    none = [r for r in train2 + held2 if not r["answers"]["text"]]
    assert len(none) > 50 and all(r["id"].endswith("-none") for r in none)


def test_finetune_squad_v2_local_files_on_pruned_model_then_evaluate(tiny, tmp_path):
    from safetensors.torch import load_file

    pruned = tmp_path / "pruned"
    text = write_text(tmp_path / "text.txt", 120)
    argv = ["prune", "--model", tiny["model"], "--dataset", text, "--output-dir", str(pruned)]
    assert (
        main([*argv, "--max-steps", "12", "--target-sparsity", "0.5", "--seq-len", "32", "--batch-size", "8"])
        == 0
    )

    out = tmp_path / "qa"
    argv = ["finetune", "--task", "squad_v2", "--model", str(pruned), "--train-file", tiny["train"]]
    argv += ["--validation-file", tiny["dev"], "--output-dir", str(out), "--max-length", "64"]
    assert main([*argv, "--max-steps", "6", "--batch-size", "8", "--logging-steps", "3"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["task"] == "squad_v2" and report["version_2"] is True
    assert report["sparsity_before"] == report["sparsity_after"] == pytest.approx(0.5, abs=1e-3)
    assert report["steps"] == 6 and report["eval_examples"] == len(tiny["dev_rows"])
    assert {"exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1"} <= set(report["metrics"])
    masks_before, after = load_file(pruned / "rpp_masks.safetensors"), load_file(out / "model.safetensors")
    for name, mask in masks_before.items():
        assert torch.equal(after[name] != 0, mask.bool()), name

    # evaluate scores the saved model the same way, without training
    result = tmp_path / "eval.json"
    argv = [
        "evaluate",
        str(out),
        "--task",
        "squad_v2",
        "--validation-file",
        tiny["dev"],
        "--max-length",
        "64",
    ]
    assert main([*argv, "--output", str(result)]) == 0
    scored = json.loads(result.read_text())
    for key in ("exact", "f1", "best_f1"):
        assert scored["metrics"][key] == pytest.approx(report["metrics"][key])
    # questions too long for a 64-token window are counted, and scored as unanswered
    too_long = scored["skipped"].get("question_too_long", 0)
    assert set(scored["predictions"]) <= {r["id"] for r in tiny["dev_rows"]}
    assert len(scored["predictions"]) + too_long == len(tiny["dev_rows"])


def heldout_loss(model_dir, tokenizer, examples, max_length=128, stride=42) -> float:
    """Mean start/end cross-entropy over the windows of `examples` (seeded head for a fresh model)."""
    from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding, set_seed

    set_seed(0)  # the seed finetune uses, so a fresh head starts where the run started
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    features = S.prepare_train_features(tokenizer, examples, max_length, stride, collections.Counter())
    collate, losses = DataCollatorWithPadding(tokenizer), []
    with torch.no_grad():
        for at in range(0, len(features), 64):
            losses.append(float(model(**collate(features[at : at + 64])).loss))
    return float(np.mean(losses))


def test_finetune_offline_pydoc_qa_improves_over_start(tiny, tokenizer, tmp_path):
    out = tmp_path / "ft"
    argv = ["finetune", "--task", "pydoc-qa", "--model", tiny["model"], "--output-dir", str(out)]
    argv += ["--max-length", "128", "--max-steps", "200", "--batch-size", "16", "--lr", "1e-3"]
    assert main([*argv, "--logging-steps", "50"]) == 0
    report = json.loads((out / "finetune_report.json").read_text())
    before, after = report["metrics_before"], report["metrics"]
    assert before["total"] == after["total"] == report["eval_examples"]
    # A random 2-layer BERT learns slowly from ~600 questions; exact match must rise, and the held-out
    # span loss (a smoother measure of the same thing) must fall clearly.
    assert after["exact"] > before["exact"], (before, after)
    _, held = S.pydoc_qa()
    start, end = heldout_loss(tiny["model"], tokenizer, held), heldout_loss(str(out), tokenizer, held)
    assert end < 0.8 * start, (start, end)
