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

import httpx
import pytest
import torch

from rpp_triton.serve.predictor import Predictor


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def reference(serve_models):
    """Direct, unbatched model outputs to compare the server against."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    loaded = {
        "base": AutoModel.from_pretrained(serve_models["base"]).eval(),
        "classify": AutoModelForSequenceClassification.from_pretrained(serve_models["classify"]).eval(),
    }
    tokenizer = AutoTokenizer.from_pretrained(serve_models["base"])

    @torch.inference_mode()
    def embed(text, head="base"):
        out = loaded[head](**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return out.hidden_states[-1][0].mean(0)  # one unpadded sequence: a plain mean

    @torch.inference_mode()
    def logits(text):
        args = (text,) if isinstance(text, str) else tuple(text)
        return loaded["classify"](**tokenizer(*args, return_tensors="pt")).logits[0]

    return embed, logits


@pytest.fixture(scope="module")
def base_server(serve_models, running, loader):
    with running(loader(serve_models["base"]), max_inputs=4, max_chars=200, max_body_bytes=2000) as srv:
        yield srv


# -------------------------------------------------------------- the answers
def test_embed_matches_model(base_server, reference, serve_texts):
    embed, _ = reference
    r = httpx.post(base_server.url + "/v1/embed", json={"inputs": serve_texts[:4]})
    assert r.status_code == 200, r.text
    got = torch.tensor(r.json()["embeddings"])
    want = torch.stack([embed(t) for t in serve_texts[:4]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert r.json()["truncated"] == [False] * 4

    one = httpx.post(base_server.url + "/v1/embed", json={"inputs": serve_texts[4], "normalize": True}).json()
    assert len(one["embeddings"]) == 1
    v = torch.tensor(one["embeddings"][0])
    torch.testing.assert_close(v, embed(serve_texts[4]) / embed(serve_texts[4]).norm(), atol=1e-5, rtol=1e-5)


def test_classify_matches_model(serve_models, reference, running, loader):
    _, logits = reference
    inputs = ["the model is sparse", ["who wrote it", "the server"], "a"]
    with running(loader(serve_models["classify"])) as srv:
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


def test_qa_answers_best_span(serve_models, running, loader):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    question, context = "who wrote the server", "the sparse model was pruning a dense layer at the block"
    with running(loader(serve_models["qa"])) as srv:
        r = httpx.post(srv.url + "/v1/qa", json={"inputs": [{"question": question, "context": context}]})
        assert r.status_code == 200, r.text
        got = r.json()["answers"][0]
    tokenizer = AutoTokenizer.from_pretrained(serve_models["qa"])
    enc = tokenizer(question, context, return_offsets_mapping=True, return_tensors="pt")
    offsets, seq = enc.pop("offset_mapping")[0].tolist(), enc.sequence_ids(0)
    with torch.inference_mode():
        out = AutoModelForQuestionAnswering.from_pretrained(serve_models["qa"]).eval()(**enc)
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


def test_wrong_method_and_route(base_server, metric):
    assert httpx.get(base_server.url + "/v1/embed").json()["error"]["type"] == "method_not_allowed"
    assert httpx.post(base_server.url + "/v2/nothing", json={}).status_code == 404
    assert metric(base_server.url, "rpp_requests_total", route="other", status="404") >= 1


def test_body_without_json_content_type_is_read_as_json(base_server):
    r = httpx.post(
        base_server.url + "/v1/embed", content=b'{"inputs": "a"}', headers={"content-type": "text/plain"}
    )
    assert r.status_code == 200, r.text


def test_long_inputs_truncate_or_refuse(serve_models, reference, running, loader):
    embed, _ = reference
    long_text = " ".join(["model"] * 30)  # 32 tokens with [CLS] and [SEP]
    with running(loader(serve_models["base"], max_tokens=8)) as srv:
        body = httpx.post(srv.url + "/v1/embed", json={"inputs": [long_text, "a"]}).json()
        assert body["truncated"] == [True, False]
        truncated = " ".join(["model"] * 6)  # what fits in 8 tokens
        torch.testing.assert_close(
            torch.tensor(body["embeddings"][0]), embed(truncated), atol=1e-5, rtol=1e-5
        )
    with running(loader(serve_models["base"], max_tokens=8, truncate=False)) as srv:
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": ["a", long_text]})
        assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_long"
        assert "input 1 has 32 tokens" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200


def test_full_queue_answers_429(serve_models, running, metric, gated_forward):
    predictor = Predictor.from_pretrained(serve_models["base"], sparse=False)
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


def test_request_timeout_answers_503(serve_models, running, gated_forward):
    predictor = Predictor.from_pretrained(serve_models["base"], sparse=False)
    with gated_forward(predictor) as (entered, release):
        with running(lambda: predictor, request_timeout_s=0.3, warmup=False) as srv:
            r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
            assert r.status_code == 503 and r.json()["error"]["type"] == "timeout"
            release.set()
            assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200


# ------------------------------------------------------------------ batching
def test_concurrent_clients_are_batched(serve_models, reference, running, loader, metric, serve_words):
    embed, _ = reference
    texts = [f"{w} model" for w in serve_words[:16]]
    with running(loader(serve_models["base"]), max_wait_ms=200, max_batch_size=32) as srv:

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
def test_health_is_503_until_warm(serve_models, running, metric):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return Predictor.from_pretrained(serve_models["base"], sparse=False)

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


def test_failed_load_is_reported(tmp_path, running):
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


def test_shutdown_drains_in_flight_requests(serve_models, reference, running, gated_forward, serve_texts):
    embed, _ = reference
    predictor = Predictor.from_pretrained(serve_models["base"], sparse=False)
    with gated_forward(predictor) as (entered, release):
        with running(lambda: predictor, warmup=False, max_batch_size=2) as srv:
            results = [None] * 5

            def post(i):
                results[i] = httpx.post(srv.url + "/v1/embed", json={"inputs": serve_texts[i]}, timeout=60)

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
    for text, r in zip(serve_texts, results):
        assert r is not None and r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["embeddings"][0]), embed(text), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- CLI
def test_cli_rejects_bad_arguments(tmp_path, capsys):
    from rpp_triton.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_cli_serves_and_drains_on_sigterm(serve_models, metric):
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
        serve_models["base"],
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
def test_sparse_model_serves_same_answers(
    tmp_path, reference, write_serve_model, running, loader, serve_texts
):
    pytest.importorskip(
        "rpp_triton.sparse", reason="rpp_triton.sparse (block-sparse layers) is not built yet"
    )
    from transformers import AutoModel

    model_dir = write_serve_model(tmp_path / "m")
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
        body = httpx.post(srv.url + "/v1/embed", json={"inputs": serve_texts}).json()
    for text, got in zip(serve_texts, body["embeddings"]):
        torch.testing.assert_close(torch.tensor(got), embed(text), atol=1e-4, rtol=1e-4)
