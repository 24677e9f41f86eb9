"""The inference server, started for real on a loopback port with tiny random BERTs.

Answers are checked against the model's own outputs computed here, one text at a time and
unpadded, so padding, batching and pooling in the server are all under test."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from rpp_triton.serve.app import ServerConfig, create_app
from rpp_triton.serve.config import HttpConfig
from rpp_triton.serve.predictor import Predictor
from rpp_triton.serve.server import uvicorn_config

WORDS = (
    "the a an of to in is it for on with as by at from that this be are was model sparse pruning "
    "server batch text question answer who wrote what where when weight tile block dense layer"
).split()
TEXTS = [
    "the model is sparse",
    "a",
    "pruning the weight of a dense layer with a tile of block sparse text",
    "who wrote the server",
    "",
]


# ------------------------------------------------------------------ fixtures
def write_model(path, head: str = "base", max_positions: int = 64) -> str:
    """A 2-layer BERT (hidden 32) with a hand-written vocabulary; `head` is base, classify or qa."""
    from transformers import (
        BertConfig,
        BertForQuestionAnswering,
        BertForSequenceClassification,
        BertModel,
        BertTokenizerFast,
    )

    path.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ",", "?", *letters]
    vocab += [f"##{c}" for c in letters]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    if head == "classify":
        config.id2label = {0: "neg", 1: "neu", 2: "pos"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        model = BertForSequenceClassification(config)
    elif head == "qa":
        model = BertForQuestionAnswering(config)
    else:
        model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    return {head: write_model(root / head, head) for head in ("base", "classify", "qa")}


@pytest.fixture(scope="module")
def reference(models):
    """Direct, unbatched model outputs to compare the server against."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    loaded = {
        "base": AutoModel.from_pretrained(models["base"]).eval(),
        "classify": AutoModelForSequenceClassification.from_pretrained(models["classify"]).eval(),
    }
    tokenizer = AutoTokenizer.from_pretrained(models["base"])

    @torch.inference_mode()
    def embed(text, head="base"):
        out = loaded[head](**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return out.hidden_states[-1][0].mean(0)  # one unpadded sequence: a plain mean

    @torch.inference_mode()
    def logits(text):
        args = (text,) if isinstance(text, str) else tuple(text)
        return loaded["classify"](**tokenizer(*args, return_tensors="pt")).logits[0]

    return embed, logits


class Running:
    def __init__(self, server, thread, url, service):
        self.server, self.thread, self.url, self.service = server, thread, url, service

    def stop(self, timeout=30):
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not stop"


@contextmanager
def running(load, wait_ready=True, http=None, **config):
    """Start the real app under uvicorn, with the HTTP limits `rpp-triton serve` sets, in a thread
    on a free loopback port."""
    import uvicorn

    app, service = create_app(load, ServerConfig(**config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    options = uvicorn_config(app, service.config, http or HttpConfig(), log_level="warning")
    server = uvicorn.Server(options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    srv = Running(server, thread, url, service)
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        while wait_ready and service.state != "ready":
            assert service.state != "failed", "the model failed to load (see the log)"
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.01)
        yield srv
    finally:
        if thread.is_alive():
            srv.stop()
        sock.close()


def loader(model_dir, **options):
    options.setdefault("sparse", False)
    return lambda: Predictor.from_pretrained(model_dir, **options)


def metric(url, name, **labels):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    total = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total = (total or 0) + sample.value
    return total


@pytest.fixture(scope="module")
def base_server(models):
    with running(loader(models["base"]), max_inputs=4, max_chars=200, max_body_bytes=2000) as srv:
        yield srv


# -------------------------------------------------------------- the answers
def test_embed_matches_model(base_server, reference):
    embed, _ = reference
    r = httpx.post(base_server.url + "/v1/embed", json={"inputs": TEXTS[:4]})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["embeddings"])
    want = torch.stack([embed(t) for t in TEXTS[:4]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert r.json()["truncated"] == [False] * 4

    one = httpx.post(base_server.url + "/v1/embed", json={"inputs": TEXTS[4], "normalize": True}).json()
    assert len(one["embeddings"]) == 1
    v = torch.tensor(one["embeddings"][0])
    torch.testing.assert_close(v, embed(TEXTS[4]) / embed(TEXTS[4]).norm(), atol=1e-5, rtol=1e-5)


def test_classify_matches_model(models, reference):
    _, logits = reference
    inputs = ["the model is sparse", ["who wrote it", "the server"], "a"]
    with running(loader(models["classify"])) as srv:
        r = httpx.post(srv.url + "/v1/classify", json={"inputs": inputs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label_names"] == ["neg", "neu", "pos"]
        for i, x in enumerate(inputs):
            probs = torch.softmax(logits(x), -1)
            torch.testing.assert_close(
                torch.tensor(body["predictions"][i]["probabilities"]), probs, atol=1e-5, rtol=0
            )
            assert body["labels"][i] == body["label_names"][int(probs.argmax())]
            assert body["scores"][i] == pytest.approx(probs.max().item(), abs=1e-5)
        # The classification model still serves embeddings, from its encoder.
        emb = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).json()["embeddings"][0]
        torch.testing.assert_close(
            torch.tensor(emb), reference[0]("a", head="classify"), atol=1e-5, rtol=1e-5
        )
        assert (
            httpx.post(srv.url + "/v1/qa", json={"inputs": {"question": "a", "context": "b"}}).status_code
            == 404
        )


def test_qa_answers_best_span(models):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    question, context = "who wrote the server", "the sparse model was pruning a dense layer at the block"
    with running(loader(models["qa"])) as srv:
        r = httpx.post(srv.url + "/v1/qa", json={"inputs": [{"question": question, "context": context}]})
        assert r.status_code == 200, r.text
        got = r.json()["answers"][0]
    tokenizer = AutoTokenizer.from_pretrained(models["qa"])
    enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets, seq = enc.pop("offset_mapping")[0].tolist(), enc.sequence_ids(0)
    with torch.inference_mode():
        out = AutoModelForQuestionAnswering.from_pretrained(models["qa"]).eval()(**enc)
    s, e = out.start_logits[0], out.end_logits[0]
    ctx = [i for i, k in enumerate(seq) if k == 1]
    best = max(
        ((i, j) for i in ctx for j in ctx if 0 <= j - i < 30), key=lambda p: (s[p[0]] + e[p[1]]).item()
    )
    start, end = offsets[best[0]][0], offsets[best[1]][1]
    assert (got["start"], got["end"]) == (start, end)
    assert got["answer"] == context[start:end]
    want = torch.softmax(s, 0)[best[0]] * torch.softmax(e, 0)[best[1]]
    assert got["score"] == pytest.approx(want.item(), rel=1e-4)


def test_no_head_means_404(base_server):
    r = httpx.post(base_server.url + "/v1/classify", json={"inputs": "a"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "route_not_supported"


def test_docs_and_health(base_server):
    assert httpx.get(base_server.url + "/docs").status_code == 200
    spec = httpx.get(base_server.url + "/openapi.json").json()
    assert {"/v1/embed", "/v1/embeddings", "/embed", "/health", "/info", "/metrics"} <= set(spec["paths"])
    assert not {"/v1/classify", "/v1/qa"} & set(spec["paths"])  # this model has no task head
    health = httpx.get(base_server.url + "/health").json()
    assert health == {"status": "ready", "model_id": "base"}


# ------------------------------------------------------------- bad requests
def _chunks(data: bytes, size: int = 500):
    for i in range(0, len(data), size):
        yield data[i : i + size]


BAD = [
    ("malformed json", dict(content=b'{"inputs": '), 400, "malformed_json"),
    ("not utf-8", dict(content=b"\xff\xfe\x00"), 400, "malformed_json"),
    ("not an object", dict(json=["a"]), 422, "invalid_request"),
    ("number", dict(json={"inputs": 5}), 422, "invalid_request"),
    ("list of numbers", dict(json={"inputs": [1, 2]}), 422, "invalid_request"),
    ("null", dict(json={"inputs": None}), 422, "invalid_request"),
    ("missing inputs", dict(json={}), 422, "invalid_request"),
    ("unknown field", dict(json={"inputs": "a", "pooling": "max"}), 422, "invalid_request"),
    ("empty batch", dict(json={"inputs": []}), 422, "empty_inputs"),
    ("too many inputs", dict(json={"inputs": ["a"] * 5}), 413, "too_many_inputs"),
    ("too many characters", dict(json={"inputs": ["a", "b " * 101]}), 413, "input_too_long"),
    ("body over the limit", dict(json={"inputs": ["a " * 1500]}), 413, "payload_too_large"),
    (
        "chunked body over the limit",
        dict(content=_chunks(b" " * 3000 + b'{"inputs": "a"}')),
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize("name,request_kwargs,status,kind", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_and_server_keeps_serving(base_server, name, request_kwargs, status, kind):
    r = httpx.post(
        base_server.url + "/v1/embed", headers={"content-type": "application/json"}, **request_kwargs
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind
    ok = httpx.post(base_server.url + "/v1/embed", json={"inputs": ["the model"]})
    assert ok.status_code == 200 and len(ok.json()["embeddings"]) == 1


def test_wrong_method_and_route(base_server):
    assert httpx.get(base_server.url + "/v1/embed").json()["error"]["type"] == "method_not_allowed"
    assert httpx.post(base_server.url + "/v2/nothing", json={}).status_code == 404
    assert metric(base_server.url, "rpp_requests_total", route="other", status="404") >= 1


def test_body_without_json_content_type_is_read_as_json(base_server):
    r = httpx.post(
        base_server.url + "/v1/embed", content=b'{"inputs": "a"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 200, r.text


def test_long_inputs_truncate_or_refuse(models, reference):
    embed, _ = reference
    long_text = " ".join(["model"] * 30)  # 32 tokens with [CLS] and [SEP]
    with running(loader(models["base"], max_tokens=8)) as srv:
        body = httpx.post(srv.url + "/v1/embed", json={"inputs": [long_text, "a"]}).json()
        assert body["truncated"] == [True, False]
        truncated = " ".join(["model"] * 6)  # what fits in 8 tokens
        torch.testing.assert_close(
            torch.tensor(body["embeddings"][0]), embed(truncated), atol=1e-5, rtol=1e-5
        )
    with running(loader(models["base"], max_tokens=8, truncate=False)) as srv:
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": ["a", long_text]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_long"
        assert "input 1 has 32 tokens" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200


@contextmanager
def gated_forward(predictor):
    """Make `predictor.forward` wait on a gate; yields (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    forward = predictor.forward

    def gated(batch):
        entered.set()
        release.wait(30)
        return forward(batch)

    predictor.forward = gated
    try:
        yield entered, release
    finally:
        release.set()


def test_full_queue_answers_429(models):
    predictor = Predictor.from_pretrained(models["base"], sparse=False)
    with gated_forward(predictor) as (entered, release):
        with running(lambda: predictor, max_queue=4, max_inputs=4, max_wait_ms=0, warmup=False) as srv:
            results = {}

            def post(key, n):
                results[key] = httpx.post(srv.url + "/v1/embed", json={"inputs": ["a"] * n}, timeout=60)

            first = threading.Thread(target=post, args=("first", 4))
            first.start()
            assert entered.wait(10)  # the worker holds the first batch
            second = threading.Thread(target=post, args=("second", 4))
            second.start()
            deadline = time.monotonic() + 10
            while srv.service.batcher.depth < 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert metric(srv.url, "rpp_queue_depth") == 4
            full = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
            assert full.status_code == 429 and full.json()["error"]["type"] == "overloaded"
            assert full.headers["retry-after"] == "1"
            release.set()
            first.join(30)
            second.join(30)
            assert results["first"].status_code == results["second"].status_code == 200
            assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200


def test_request_timeout_answers_503(models):
    predictor = Predictor.from_pretrained(models["base"], sparse=False)
    with gated_forward(predictor) as (entered, release):
        with running(lambda: predictor, request_timeout_s=0.3, warmup=False) as srv:
            r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "timeout"
            release.set()
            assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200


# ------------------------------------------------------------------ batching
def test_concurrent_clients_are_batched(models, reference):
    embed, _ = reference
    texts = [f"{w} model" for w in WORDS[:16]]
    with running(loader(models["base"]), max_wait_ms=200, max_batch_size=32) as srv:

        async def clients():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/embed", json={"inputs": t}) for t in texts))

        responses = asyncio.run(clients())
        assert all(r.status_code == 200 for r in responses)
        for t, r in zip(texts, responses):
            torch.testing.assert_close(
                torch.tensor(r.json()["embeddings"][0]), embed(t), atol=1e-5, rtol=1e-5
            )
        batches = metric(srv.url, "rpp_batch_size_count")
        assert metric(srv.url, "rpp_batch_size_sum") == 16
        assert batches < 16, "16 concurrent requests should share forwards"
        assert metric(srv.url, "rpp_requests_total", route="/v1/embed", status="200") == 16
        assert metric(srv.url, "rpp_inputs_total", route="/v1/embed") == 16
        assert metric(srv.url, "rpp_request_latency_seconds_count", route="/v1/embed") == 16


# ----------------------------------------------------- readiness and shutdown
def test_health_is_503_until_warm(models):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return Predictor.from_pretrained(models["base"], sparse=False)

    with running(slow_load, wait_ready=False) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"
        assert metric(srv.url, "rpp_ready") == 0
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(srv.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert srv.service.predictor.info.warmup_seconds > 0  # ready only after the warm-up
        assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200
        assert metric(srv.url, "rpp_ready") == 1


def test_failed_load_is_reported(tmp_path):
    def broken():
        raise OSError("disk on fire")

    with running(broken, wait_ready=False) as srv:
        deadline = time.monotonic() + 10
        while srv.service.state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json() == {"status": "failed"}
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
        assert "disk on fire" not in r.text  # the reason is in the server log, not in answers


def test_shutdown_drains_in_flight_requests(models, reference):
    embed, _ = reference
    predictor = Predictor.from_pretrained(models["base"], sparse=False)
    with gated_forward(predictor) as (entered, release):
        with running(lambda: predictor, warmup=False, max_batch_size=2) as srv:
            results = [None] * 5

            def post(i):
                results[i] = httpx.post(srv.url + "/v1/embed", json={"inputs": TEXTS[i]}, timeout=60)

            threads = [threading.Thread(target=post, args=(i,)) for i in range(5)]
            for t in threads:
                t.start()
            assert entered.wait(10)
            deadline = time.monotonic() + 10
            while srv.service.batcher.in_flight < 5:  # all five inside the server
                assert time.monotonic() < deadline
                time.sleep(0.01)
            srv.server.should_exit = True  # what SIGTERM does
            host, port = srv.url.rsplit("/", 1)[1].split(":")
            while True:  # the listening socket closes: no new connections while draining
                assert time.monotonic() < deadline, "the server kept accepting connections"
                try:
                    socket.create_connection((host, int(port)), timeout=1).close()
                except ConnectionRefusedError:
                    break
                time.sleep(0.05)
            release.set()
            srv.thread.join(30)
            assert not srv.thread.is_alive()
            for t in threads:
                t.join(10)
    for text, r in zip(TEXTS, results):
        assert r is not None and r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]), embed(text), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- CLI
def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from rpp_triton.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_serves_and_drains_on_sigterm(models):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # A long batch window keeps the request in flight when SIGTERM arrives; draining runs it at once.
    cmd = [
        sys.executable,
        "-m",
        "rpp_triton",
        "serve",
        models["base"],
        "--port",
        str(port),
        "--max-wait-ms",
        "8000",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        result = {}

        def post():
            result["r"] = httpx.post(url + "/v1/embed", json={"inputs": "a"}, timeout=30)
            result["done"] = time.monotonic()

        client = threading.Thread(target=post)
        started = time.monotonic()
        client.start()
        while metric(url, "rpp_queue_depth") != 1:  # the request waits in the batch window
            assert time.monotonic() - started < 10, "the request did not reach the server"
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        client.join(30)
        assert proc.wait(30) == 0  # a clean drain
        assert result["r"].status_code == 200
        assert result["done"] - signalled < 5, "draining should not wait out the 8 s batch window"
        assert len(result["r"].json()["embeddings"][0]) == 32
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -------------------------------------------------------------------- sparse
def test_sparse_model_serves_same_answers(tmp_path, reference):
    pytest.importorskip(
        "rpp_triton.sparse", reason="rpp_triton.sparse (block-sparse layers) is not built yet"
    )
    from transformers import AutoModel

    model_dir = write_model(tmp_path / "m")
    model = AutoModel.from_pretrained(model_dir)
    with torch.no_grad():  # zero 3 of every 4 16x16 tiles of the encoder's Linear weights
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}.":
                w = module.weight
                rows, cols = w.shape[0] // 16, w.shape[1] // 16
                keep = (torch.arange(rows * cols) % 4 == 0).view(rows, cols)
                w.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    model.save_pretrained(model_dir)
    report = {"sparsity": 0.75, "target_sparsity": 0.75, "block_size": [16, 16], "layers": []}
    (tmp_path / "m" / "rpp_report.json").write_text(json.dumps(report))

    @torch.inference_mode()
    def embed(text):
        from transformers import AutoTokenizer

        enc = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")
        return model(**enc).last_hidden_state[0].mean(0)

    # No block size given: the server takes the pruning's 16x16 tiles from rpp_report.json. Every
    # sparse layer stays block-sparse (on layers this small, dense F.linear usually measures faster).
    with running(loader(model_dir, sparse=True, min_sparsity=0.5, choose_layers=False)) as srv:
        info = httpx.get(srv.url + "/info").json()
        assert info["block_size"] == [16, 16] and info["pruning"]["sparsity"] == 0.75
        assert len(info["sparse_layers"]) == 12 and info["sparse_error"] is None  # 2 layers x 6 Linear
        body = httpx.post(srv.url + "/v1/embed", json={"inputs": TEXTS}).json()
    for text, got in zip(TEXTS, body["embeddings"]):
        torch.testing.assert_close(torch.tensor(got), embed(text), atol=1e-4, rtol=1e-4)
