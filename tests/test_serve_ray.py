"""The Ray Serve deployment, started the way a user starts it (`rpp-triton serve DIR --ray`), answers
like the model and like the single-machine server. Ray takes ~15 s to start: one module fixture."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'rpp_triton[ray]')")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, serve_models):
    model_dir = serve_models["classify"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "rpp_triton", "serve", model_dir, "--ray", "--replicas", "1"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dense", "--max-wait-ms", "100"]
    cmd += ["--max-inputs", "4", "--timeout", "10"]
    log = open(tmp_path_factory.mktemp("ray-log") / "serve.log", "w+")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    )
    url = f"http://127.0.0.1:{port}"

    def output():
        log.seek(0)
        return log.read()[-4000:]

    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, output()
            assert time.monotonic() < deadline, "Ray Serve did not become ready:\n" + output()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, model_dir, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def direct(model_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.inference_mode():
        outs = [model(**tokenizer(t, return_tensors="pt"), output_hidden_states=True) for t in texts]
    return [o.hidden_states[-1][0].mean(0) for o in outs], [torch.softmax(o.logits[0], -1) for o in outs]


def test_ray_deployment_answers_like_the_model(ray_server, serve_texts):
    url, model_dir, _ = ray_server
    embeddings, probs = direct(model_dir, serve_texts[:4])
    r = httpx.post(url + "/v1/embed", json={"inputs": serve_texts[:4]}, timeout=30)
    assert r.status_code == 200, r.text
    torch.testing.assert_close(
        torch.tensor(r.json()["embeddings"]), torch.stack(embeddings), atol=1e-5, rtol=1e-5
    )
    r = httpx.post(url + "/v1/classify", json={"inputs": serve_texts[:4]}, timeout=30)
    assert r.status_code == 200, r.text
    got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
    torch.testing.assert_close(got, torch.stack(probs), atol=1e-5, rtol=1e-5)
    assert r.json()["label_names"] == ["neg", "neu", "pos"]


def test_ray_deployment_batches_concurrent_requests(ray_server, metric, serve_texts):
    url, _, _ = ray_server
    before = metric(url, "rpp_batch_size_count") or 0
    before_sum = metric(url, "rpp_batch_size_sum") or 0

    async def clients():
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/embed", json={"inputs": f"{t} a"}) for t in serve_texts)
            )

    responses = asyncio.run(clients())
    assert all(r.status_code == 200 for r in responses)
    batches = metric(url, "rpp_batch_size_count") - before
    assert metric(url, "rpp_batch_size_sum") - before_sum == len(serve_texts)
    assert batches < len(serve_texts), "concurrent requests should share forwards"


def test_ray_deployment_rejects_bad_input_and_keeps_serving(ray_server):
    url, _, _ = ray_server
    for body, status in (
        (b'{"inputs": ', 400),
        (b'{"inputs": []}', 422),
        (b'{"inputs": ["a","a","a","a","a"]}', 413),
    ):
        r = httpx.post(
            url + "/v1/embed", content=body, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == status, r.text
        assert "error" in r.json()
        assert httpx.post(url + "/v1/embed", json={"inputs": "a"}, timeout=30).status_code == 200
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ready"
    assert httpx.get(url + "/info", timeout=30).json()["tasks"] == ["embed", "classify"]


def test_ray_listens_on_loopback_only(ray_server):
    """With --host 127.0.0.1 no Ray process (GCS, raylet, agents, controller, proxy) listens
    elsewhere. The one exception is Ray Serve's own: each replica opens its inter-deployment gRPC
    server on "[::]:0", hard-coded in ray/serve/_private/replica.py."""
    import psutil

    _, _, proc = ray_server
    addresses = set()
    for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        try:
            listening = [c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
        addresses.update((addr.ip, p.name()) for addr in listening)
    assert addresses, "found no listening sockets"
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    elsewhere = [(ip, name) for ip, name in addresses if ip not in loopback]
    assert elsewhere == [("::", "ray::ServeReplica:rpp_triton:RPPPredictor")], elsewhere


def test_ray_deployment_stops_on_sigterm(ray_server):
    url, _, proc = ray_server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)
