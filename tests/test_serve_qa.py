"""`POST /v1/qa` on a tiny random BERT QA model: long contexts are read in overlapping windows and
the answer is the one `rpp_triton.qa` picks from the model's own, unbatched logits."""

import collections

import httpx
import pytest
import torch

from rpp_triton.errors import UsageError
from rpp_triton.qa import features as squad
from rpp_triton.qa.evaluate import predict_logits
from rpp_triton.serve.predictor import Predictor

MAX_TOKENS, STRIDE = 24, 8
QUESTION = "who wrote the server"


@pytest.fixture(scope="module")
def context(random_serve_words):
    """`context(n_words, seed)`: a sentence of `n_words` random serve words."""
    return lambda n_words, seed: random_serve_words(n_words, seed) + "."


@pytest.fixture(scope="module")
def qa_dir(serve_models):
    return serve_models["qa"]


@pytest.fixture(scope="module")
def server(qa_dir, running, loader):
    options = dict(max_tokens=MAX_TOKENS, doc_stride=STRIDE)
    with running(loader(qa_dir, **options), max_inputs=4, max_chars=1000, max_queue=30) as srv:
        yield srv


@pytest.fixture(scope="module")
def direct(qa_dir):
    """Windows and logits computed here, one unpadded window per forward."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qa_dir)
    model = AutoModelForQuestionAnswering.from_pretrained(qa_dir).eval()

    def run(pairs):
        examples = [{"id": str(i), "question": q, "context": c} for i, (q, c) in enumerate(pairs)]
        kept, features = squad.prepare_eval_features(
            tokenizer, examples, MAX_TOKENS, STRIDE, collections.Counter()
        )
        assert len(kept) == len(examples)
        starts, ends = predict_logits(model, tokenizer, features, batch_size=1)
        return examples, features, starts, ends

    return run


def ask(server, items, **options):
    r = httpx.post(server.url + "/v1/qa", json={"inputs": items, **options})
    assert r.status_code == 200, r.text
    return r.json()


def test_long_context_is_windowed_and_matches_squad_postprocess(server, direct, context):
    pairs = [(QUESTION, context(60, 1)), ("what is the block", "a dense layer"), (QUESTION, context(45, 2))]
    body = ask(server, [{"question": q, "context": c} for q, c in pairs])
    assert body["truncated"] == [False] * 3
    examples, features, starts, ends = direct(pairs)
    n_windows = collections.Counter(f["example_index"] for f in features)
    assert n_windows[0] >= 3 and n_windows[1] == 1 and n_windows[2] >= 2
    predictions, margins = squad.postprocess(examples, features, starts, ends)
    for i, (got, (_, ctx)) in enumerate(zip(body["answers"], pairs)):
        assert got["answer"] == predictions[str(i)] != ""
        assert ctx[got["start"] : got["end"]] == got["answer"]
        assert got["null_margin"] == pytest.approx(margins[str(i)], abs=1e-4)
        assert got["no_answer"] is False
        # The score: the span's start x end probability in the window that holds its best logit sum.
        windows = [k for k, f in enumerate(features) if f["example_index"] == i]
        null = min(float(starts[k][0] + ends[k][0]) for k in windows)
        candidates = []
        for k in windows:
            offs = features[k]["offsets"]
            for a, oa in enumerate(offs):
                for b, ob in enumerate(offs):
                    if oa and ob and (oa[0], ob[1]) == (got["start"], got["end"]):
                        s, e = torch.tensor(starts[k]), torch.tensor(ends[k])
                        prob = (torch.softmax(s, 0)[a] * torch.softmax(e, 0)[b]).item()
                        candidates.append((float(s[a] + e[b]), prob))
        best_sum, prob = max(candidates)
        assert null - best_sum == pytest.approx(got["null_margin"], abs=1e-4)
        assert got["score"] == pytest.approx(prob, rel=1e-4)


def test_answers_past_the_first_window_are_found(qa_dir, server, direct, context):
    """Over several long contexts some best span lies beyond what one window could hold."""
    predictor = Predictor.from_pretrained(qa_dir, sparse=False, max_tokens=MAX_TOKENS, doc_stride=STRIDE)
    pairs = [(QUESTION, context(60, seed)) for seed in range(10, 14)]
    windows = predictor.encode_qa(pairs)
    first_end = {}
    for w in windows:
        if w.example not in first_end:
            first_end[w.example] = max(o[1] for o in w.context_offsets if o is not None)
    body = ask(server, [{"question": q, "context": c} for q, c in pairs])
    starts = [a["start"] for a in body["answers"]]
    assert any(s >= first_end[i] for i, s in enumerate(starts)), (starts, first_end)
    # The predictor alone gives the same answers as the server's batched route.
    outputs = predictor.forward(windows)
    assert [a["answer"] for a in predictor.answers(pairs, windows, outputs)] == [
        a["answer"] for a in body["answers"]
    ]


def test_no_answer_when_the_null_score_wins(server, direct, context):
    pairs = [(QUESTION, context(40, 3)), ("what is the tile", context(8, 4))]
    items = [{"question": q, "context": c} for q, c in pairs]
    spans = ask(server, items)["answers"]
    margins = [a["null_margin"] for a in spans]

    # Never empty without allow_no_answer, whatever the threshold.
    assert ask(server, items, null_threshold=-1e9)["answers"] == spans
    # A threshold below every margin: every answer is empty.
    empty = ask(server, items, allow_no_answer=True, null_threshold=min(margins) - 1)["answers"]
    examples, features, starts, ends = direct(pairs)
    for i, a in enumerate(empty):
        assert (a["answer"], a["start"], a["end"], a["no_answer"]) == ("", 0, 0, True)
        assert a["null_margin"] == pytest.approx(margins[i], abs=1e-6)
        windows = [k for k, f in enumerate(features) if f["example_index"] == i]
        k = min(windows, key=lambda k: float(starts[k][0] + ends[k][0]))
        s, e = torch.tensor(starts[k]), torch.tensor(ends[k])
        assert a["score"] == pytest.approx((torch.softmax(s, 0)[0] * torch.softmax(e, 0)[0]).item(), rel=1e-4)
    # A threshold between the two margins: only the one above it is empty, as squad scores v2.0.
    lo, hi = sorted(margins)
    assert lo < hi
    mixed = ask(server, items, allow_no_answer=True, null_threshold=(lo + hi) / 2)["answers"]
    want, _ = squad.postprocess(
        examples, features, starts, ends, version_2=True, null_threshold=(lo + hi) / 2
    )
    assert [a["answer"] for a in mixed] == [want["0"], want["1"]]
    assert sorted(a["no_answer"] for a in mixed) == [False, True]
    # Above every margin: the spans come back unchanged.
    kept = ask(server, items, allow_no_answer=True, null_threshold=max(margins) + 1)["answers"]
    assert kept == spans


BAD = [
    ("missing question", {"inputs": {"context": "the model"}}, 422, "invalid_request"),
    ("missing context", {"inputs": [{"question": "who"}]}, 422, "invalid_request"),
    ("empty context", {"inputs": {"question": "who", "context": ""}}, 422, "empty_input"),
    ("blank question", {"inputs": [{"question": "  ", "context": "a"}]}, 422, "empty_input"),
    ("empty list", {"inputs": []}, 422, "empty_inputs"),
    ("threshold not a number", {"inputs": {"question": "a", "context": "b"}, "null_threshold": "x"}, 422,
     "invalid_request"),
    ("unknown field", {"inputs": {"question": "a", "context": "b"}, "stride": 3}, 422, "invalid_request"),
    ("too many inputs", {"inputs": [{"question": "a", "context": "b"}] * 5}, 413, "too_many_inputs"),
    ("too many characters", {"inputs": {"question": "a", "context": "b " * 501}}, 413, "input_too_long"),
    ("question fills the window", {"inputs": {"question": "a " * 14, "context": "b"}}, 413, "input_too_long"),
    # A payload built from the `context` fixture is a function of it.
    ("too many windows", lambda context: {"inputs": [{"question": "who", "context": context(120, 5)}] * 4},
     413, "input_too_long"),
]  # fmt: skip


@pytest.mark.parametrize("name,payload,status,kind", BAD, ids=[b[0] for b in BAD])
def test_bad_qa_request_gets_4xx(server, context, name, payload, status, kind):
    if callable(payload):
        payload = payload(context)
    r = httpx.post(server.url + "/v1/qa", json=payload)
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    assert (
        httpx.post(server.url + "/v1/qa", json={"inputs": {"question": "a", "context": "b"}}).status_code
        == 200
    )


def test_doc_stride_is_checked(qa_dir):
    with pytest.raises(UsageError, match="doc_stride"):
        Predictor.from_pretrained(qa_dir, sparse=False, max_tokens=MAX_TOKENS, doc_stride=MAX_TOKENS // 2)
    predictor = Predictor.from_pretrained(qa_dir, sparse=False, max_tokens=30)
    assert predictor.info.doc_stride == 10
