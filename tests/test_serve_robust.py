"""What clients and operators can get wrong, against the real server on loopback: bad flags and model
directories refused before anything loads, work bounded per request, slow or vanished clients,
queue slots freed by timeouts, and answers that never leak the server's internals."""

import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

from rpp_triton.serve.config import HttpConfig
from rpp_triton.serve.predictor import Predictor


def wait_until(condition, what: str, seconds: float = 20):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def raw_request(url: str, body: bytes, path: str = "/v1/embed", length: int | None = None) -> socket.socket:
    """A socket that has sent a POST with `body` (and a Content-Length of `length`)."""
    host, port = url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {length or len(body)}\r\n\r\n".encode() + body)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if b"content-length:" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                break
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


# ------------------------------------------------ refused before anything loads
@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test (instead of serving) if the command gets as far as loading weights."""

    def loaded(*args, **kwargs):
        raise AssertionError("the model started to load")

    monkeypatch.setattr(Predictor, "load", loaded)
    monkeypatch.setattr("rpp_triton.serve.server._serve_local", loaded)


BAD_FLAGS = [
    (["--timeout", "nan"], "request_timeout_s"),
    (["--max-wait-ms", "nan"], "max_wait_ms"),
    (["--read-timeout", "inf"], "read_timeout_s"),
    (["--block-size", "0"], "block_size"),
    (["--block-size", "-1"], "block_size"),
    (["--threads", "-1"], "threads"),
    (["--device", "bogus"], "device"),
    (["--device", "cuda:7"], "device"),
    (["--min-sparsity", "2"], "min_sparsity"),
    (["--max-tokens", "1"], "max_tokens"),
    (["--max-tokens", "65"], "positions"),  # the tiny model has 64
    (["--doc-stride", "40"], "doc_stride"),
    (["--max-inputs", "0"], "max_inputs"),
    (["--max-connections", "0"], "max_connections"),
    (["--port", "70000"], "port"),
    (["--ray", "--replicas", "0"], "replicas"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2(serve_models, flags, named, capsys, no_loading):
    from rpp_triton.cli import main

    assert main(["serve", serve_models["base"], *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpp-triton serve: error:") and err.count("\n") == 1 and named in err, err


def test_triton_backend_needs_a_gpu_or_the_interpreter(serve_models, capsys, monkeypatch, no_loading):
    from rpp_triton.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["serve", serve_models["base"], "--backend", "triton"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_bad_block_size_in_the_report_is_refused(serve_models, tmp_path, capsys, no_loading):
    from rpp_triton.cli import main

    model_dir = shutil.copytree(serve_models["base"], tmp_path / "m")
    (model_dir / "rpp_report.json").write_text(json.dumps({"sparsity": 0.5, "block_size": [0, 32]}))
    assert main(["serve", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert "block_size" in err and err.count("\n") == 1


def test_model_without_tokenizer_files_is_refused(serve_models, tmp_path):
    """Served anyway, it would map every word to [UNK] (transformers falls back to 5 special tokens)."""
    from transformers import AutoModel

    model_dir = tmp_path / "no-tokenizer"
    AutoModel.from_pretrained(serve_models["base"]).save_pretrained(model_dir)
    cmd = [sys.executable, "-m", "rpp_triton", "serve", str(model_dir), "--port", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no tokenizer files" in proc.stderr


def test_help_lists_every_limit_with_its_default():
    from rpp_triton.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = " ".join(sub.format_help().split())
    for flag in (
        "--max-inputs",
        "--max-chars",
        "--max-tokens",
        "--max-body-bytes",
        "--timeout",
        "--read-timeout",
        "--max-connections",
        "--keep-alive",
        "--max-header-bytes",
        "--max-batch-size",
        "--max-batch-tokens",
        "--max-wait-ms",
        "--max-queue",
    ):
        after = text.split(f"{flag} {flag[2:].upper().replace('-', '_')} ", 1)[1]
        assert "(default:" in after.split(" --", 1)[0], flag


# ------------------------------------------------------- work per request
def test_pair_truncation_matches_the_tokenizer(serve_models, random_serve_words):
    """Pairs (and single texts) come out token for token as `tokenizer(a, b, truncation=True)`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serve_models["base"])
    predictor = Predictor.from_pretrained(serve_models["base"], sparse=False, max_tokens=16)
    rng = random.Random(0)
    inputs = [
        (random_serve_words(rng.randint(0, 20), 2 * i), random_serve_words(rng.randint(0, 20), 2 * i + 1))
        for i in range(150)
    ]
    inputs += [random_serve_words(n, n) for n in range(0, 25, 3)] + [("a", "")]
    for x, got in zip(inputs, predictor.encode_texts(inputs)):
        args = (x,) if isinstance(x, str) else x
        want = tokenizer(*args, truncation=True, max_length=16)
        full = tokenizer(*args)["input_ids"]
        assert got.input_ids == want["input_ids"] and got.token_type_ids == want["token_type_ids"], x
        assert got.truncated == (len(full) > 16)


def test_long_text_pair_is_cheap(serve_models, running, loader, random_serve_words):
    """2 x 20,000 characters with a 16-token limit: the tokenizer's own pair truncation would build
    millions of overflow windows (minutes, gigabytes) before the 30 s client timeout."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    a, b = random_serve_words(5000, 1)[:20_000], random_serve_words(5000, 2)[:20_000]
    with running(loader(serve_models["classify"], max_tokens=16), max_chars=20_000) as srv:
        r = httpx.post(srv.url + "/v1/classify", json={"inputs": [[a, b]]}, timeout=30)
        assert r.status_code == 200, r.text
    assert r.json()["truncated"] == [True]
    tokenizer = AutoTokenizer.from_pretrained(serve_models["classify"])
    model = AutoModelForSequenceClassification.from_pretrained(serve_models["classify"]).eval()
    with torch.inference_mode():  # the first 200 characters of each hold far more than 16 tokens
        logits = model(
            **tokenizer(a[:200], b[:200], truncation=True, max_length=16, return_tensors="pt")
        ).logits
    got = torch.tensor(r.json()["predictions"][0]["probabilities"])
    torch.testing.assert_close(got, torch.softmax(logits[0], -1), atol=1e-5, rtol=1e-5)


def test_pairs_count_once_and_errors_name_the_input(serve_models, running, loader):
    with running(loader(serve_models["classify"]), max_inputs=4, max_chars=50) as srv:
        pairs = [["a", "the model"]] * 4
        assert httpx.post(srv.url + "/v1/classify", json={"inputs": pairs}).status_code == 200
        r = httpx.post(srv.url + "/v1/classify", json={"inputs": pairs + [["a", "b"]]})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("5 inputs;")
        r = httpx.post(srv.url + "/v1/classify", json={"inputs": ["a", ["b", "c " * 30], "d"]})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("input 1 has a text of 60")


# --------------------------------------------------- queue slots and clients
@pytest.fixture
def worker_held(running, gated_forward):
    """`with worker_held(model_dir, **config) as (srv, seen)`: a server whose one worker is busy
    with a first request until the block ends; `seen` gets the sequence lengths of every input the
    model computes."""

    @contextmanager
    def held(model_dir: str, **config):
        predictor = Predictor.from_pretrained(model_dir, sparse=False)
        seen = []
        with gated_forward(predictor) as (entered, release):
            gated = predictor.forward
            predictor.forward = lambda batch: seen.extend(len(e) for e in batch) or gated(batch)
            with running(lambda: predictor, max_wait_ms=0, warmup=False, **config) as srv:
                post = dict(
                    target=httpx.post, args=(srv.url + "/v1/embed",), kwargs={"json": {"inputs": "a"}}
                )
                first = threading.Thread(**post)
                first.start()
                assert entered.wait(10)
                yield srv, seen
                release.set()
                first.join(30)

    return held


def test_timed_out_request_frees_its_queue_slots(serve_models, worker_held):
    with worker_held(serve_models["base"], max_queue=2, max_inputs=2, request_timeout_s=0.5) as (srv, _):
        for _ in range(2):  # each fills the queue, then times out; the next one must still fit
            r = httpx.post(srv.url + "/v1/embed", json={"inputs": ["a", "b"]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "timeout", r.text
            assert srv.service.batcher.depth == 0


def test_work_of_a_client_that_went_away_is_dropped(serve_models, worker_held, metric):
    with worker_held(serve_models["base"]) as (srv, seen):
        gone = raw_request(srv.url, json.dumps({"inputs": ["the model is sparse"] * 3}).encode())
        wait_until(lambda: srv.service.batcher.depth == 3, "the request did not reach the queue")
        gone.close()
        wait_until(lambda: srv.service.batcher.depth == 0, "the closed request's inputs stayed queued")
        closed = lambda: metric(srv.url, "rpp_requests_total", route="/v1/embed", status="499") == 1
        wait_until(closed, "the closed request was not counted as 499")
    assert seen == [3]  # only the first request's "a" ([CLS] a [SEP]) was computed


def test_slow_clients_are_cut_off(serve_models, running, loader):
    with running(loader(serve_models["base"]), read_timeout_s=0.5, max_header_bytes=4096) as srv:
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        slow_head = socket.create_connection((host, int(port)), timeout=20)
        slow_head.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert slow_head.recv(1024) == b"", "a connection with unfinished headers stayed open"
        slow_body = raw_request(srv.url, b'{"inputs": ', length=100)  # 89 bytes never come
        status, body = read_response(slow_body)
        assert status == 408 and json.loads(body)["error"]["type"] == "read_timeout"
        big_head = socket.create_connection((host, int(port)), timeout=20)
        big_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert read_response(big_head)[0] in (400, 431)  # 400 from h11 if the head arrives in pieces
        assert httpx.get(srv.url + "/health").status_code == 200
    with running(loader(serve_models["base"]), http=HttpConfig(max_connections=2)) as srv:
        host, port = srv.url.rsplit("/", 1)[1].split(":")
        idle = [socket.create_connection((host, int(port)), timeout=20) for _ in range(2)]
        assert httpx.get(srv.url + "/health").status_code == 503
        for sock in idle:
            sock.close()
        wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200, "connections were not freed")


def test_client_gone_while_sending_is_not_a_server_error(serve_models, running, loader, metric):
    with running(loader(serve_models["base"])) as srv:
        raw_request(srv.url, b'{"inputs": ', length=100).close()
        wait_until(lambda: metric(srv.url, "rpp_requests_total", status="499") == 1, "not counted as 499")
        assert metric(srv.url, "rpp_requests_total", status="500") is None


# ------------------------------------------------------ what answers show
def test_answers_never_show_internals(serve_models, running):
    predictor = Predictor.from_pretrained(serve_models["base"], sparse=False)
    predictor.forward = lambda batch: (_ for _ in ()).throw(RuntimeError(f"secret {serve_models['base']}"))
    with running(lambda: predictor, max_wait_ms=0, warmup=False) as srv:
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a"})
        assert r.status_code == 500 and r.json() == {
            "error": {"type": "internal", "message": "internal error"}
        }
        assert (
            serve_models["base"]
            not in httpx.get(srv.url + "/health").text + httpx.get(srv.url + "/info").text
        )
        r = httpx.post(srv.url + "/v1/embed", json={"inputs": "a", "x" * 100_000: 1})
        assert r.status_code == 422 and len(r.content) < 500


SURROGATES = [
    ("/v1/embed", b'{"inputs": ["a", "\\ud800"]}'),
    ("/v1/embeddings", b'{"input": "b\\udfff"}'),
    ("/embed", b'{"inputs": "\\ud800"}'),
    ("/v1/classify", b'{"inputs": [["a", "\\ud800"]]}'),
]


def test_lone_surrogate_is_a_4xx(serve_models, running, loader):
    with running(loader(serve_models["classify"])) as srv:
        for path, body in SURROGATES:
            r = httpx.post(srv.url + path, content=body, headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_text", (path, r.text)
        r = httpx.post(srv.url + "/v1/embed", content=b'{"inputs": "a", "\\ud800": 1}')
        assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request"
        assert httpx.post(srv.url + "/v1/embed", json={"inputs": "a"}).status_code == 200
