"""Clients written for other servers, unchanged, against the real server on loopback: the `openai`
Python client (`POST /v1/embeddings`), `huggingface_hub.InferenceClient` and text-embeddings-
inference's `POST /embed`; `GET /info`; and an OpenAPI document that says what the server does."""

import base64
import struct

import httpx
import pytest
import torch


@pytest.fixture(scope="module")
def server(serve_models, running, loader):
    with running(loader(serve_models["base"], max_tokens=16), max_inputs=8, max_chars=300) as srv:
        yield srv


@pytest.fixture(scope="module")
def unit(serve_models):
    """Unit-length embeddings computed here, one unpadded text at a time."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(serve_models["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(serve_models["base"])

    @torch.inference_mode()
    def embed(text):
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=16)
        v = model(**enc).last_hidden_state[0].mean(0)
        return v / v.norm()

    return embed


def close(got, want):
    if isinstance(got, str):  # base64 of little-endian float32
        raw = base64.b64decode(got)
        got = struct.unpack(f"<{len(raw) // 4}f", raw)
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32), want, atol=1e-5, rtol=1e-5)


def test_openai_client(server, unit, serve_texts):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    for fmt in ("float", "base64"):
        out = client.embeddings.create(model="base", input=serve_texts[:3], encoding_format=fmt)
        assert [d.index for d in out.data] == [0, 1, 2] and out.model == "base"
        for text, d in zip(serve_texts, out.data):
            close(d.embedding, unit(text))
        assert (
            out.usage.prompt_tokens == out.usage.total_tokens == 6 + 3 + 16
        )  # 4, 1 and 14 words with [CLS] and [SEP], the last truncated to 16
    # The client's default: it asks for base64 and decodes it itself.
    one = client.embeddings.create(model="anything", input="the model is sparse")
    close(one.data[0].embedding, unit("the model is sparse"))


def test_openai_base64_is_little_endian_float32(server, unit):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "a", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    embedding = r.json()["data"][0]["embedding"]
    assert isinstance(embedding, str) and len(base64.b64decode(embedding)) == 4 * 32
    close(embedding, unit("a"))
    assert r.json()["object"] == "list" and r.json()["data"][0]["object"] == "embedding"


def test_huggingface_hub_client(server, unit, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the server is on loopback, not the hub
    client = InferenceClient(model=server.url, timeout=30)
    got = client.feature_extraction("the model is sparse")
    assert got.shape == (1, 32)
    close(got[0], unit("the model is sparse"))
    raw = client.feature_extraction("the model is sparse", normalize=False)
    assert abs(float((raw[0] ** 2).sum()) - 1) > 1e-3  # not unit length: normalize=false was sent


def test_tei_embed(server, unit, serve_texts):
    r = httpx.post(server.url + "/embed", json={"inputs": serve_texts[:2]})
    assert r.status_code == 200, r.text
    for text, v in zip(serve_texts, r.json()):
        close(v, unit(text))
    long_text = " ".join(["model"] * 30)  # over the 16 tokens of this server
    assert httpx.post(server.url + "/embed", json={"inputs": long_text, "truncate": True}).status_code == 200
    r = httpx.post(server.url + "/embed", json={"inputs": long_text, "truncate": False})
    assert r.status_code == 413 and r.json()["error"]["type"] == "input_too_long"


def test_info(server):
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "base" and info["tasks"] == ["embed"]
    assert info["routes"] == ["/v1/embed", "/v1/embeddings", "/embed", "/"]
    assert info["limits"]["max_inputs"] == 8 and info["limits"]["max_tokens"] == 16
    assert info["limits"]["on_long"] == "truncate"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["sparse_layers"] == []


STRICT = [
    ("/v1/embed", {"inputs": "a", "normalize": "yes"}),
    ("/v1/embed", {"inputs": "a", "normalize": 1}),
    ("/embed", {"inputs": "a", "normalize": 0}),
    ("/embed", {"inputs": "a", "truncate": "false"}),
    ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}),
    ("/v1/embeddings", {"input": 5}),
    ("/v1/embeddings", {"input": "a", "dimensions": 8}),
]


@pytest.mark.parametrize("path,body", STRICT, ids=[f"{p} {b}" for p, b in STRICT])
def test_types_are_strict(server, path, body):
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request", r.text


@pytest.mark.parametrize(
    "path,field", [("/v1/embed", "inputs"), ("/embed", "inputs"), ("/v1/embeddings", "input")]
)
def test_empty_list_is_refused_as_the_schema_says(server, path, field):
    r = httpx.post(server.url + path, json={field: []})
    assert r.status_code == 422 and r.json()["error"]["type"] == "empty_inputs"
    body = httpx.get(server.url + "/openapi.json").json()
    request = body["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    name = request["$ref"].rsplit("/", 1)[1]
    variants = body["components"]["schemas"][name]["properties"][field]["anyOf"]
    assert {"type": "string", "maxLength": 300} in variants  # --max-chars of this server
    array = next(v for v in variants if v["type"] == "array")
    assert (array["minItems"], array["maxItems"]) == (1, 8)  # --max-inputs of this server


def test_openapi_documents_the_real_errors(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    error = spec["components"]["schemas"]["ErrorBody"]
    assert set(error["properties"]) == {"error"}
    for path in ("/v1/embed", "/v1/embeddings", "/embed"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "413", "422", "429", "503"} <= set(responses)
        for status in ("400", "413", "422", "429", "503"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody")
    # What the document promises is what a 422 looks like.
    r = httpx.post(server.url + "/v1/embed", json={"inputs": 5})
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"type", "message"}


def test_openapi_lists_task_routes_only_with_their_head(serve_models, running, loader):
    with running(loader(serve_models["classify"])) as srv:
        paths = set(httpx.get(srv.url + "/openapi.json").json()["paths"])
        assert "/v1/classify" in paths and "/v1/qa" not in paths
        assert httpx.get(srv.url + "/info").json()["routes"][-1] == "/v1/classify"
        r = httpx.post(srv.url + "/v1/qa", json={"inputs": {"question": "a", "context": "b"}})
        assert r.status_code == 404 and r.json()["error"]["type"] == "route_not_supported"
    with running(loader(serve_models["qa"])) as srv:
        paths = set(httpx.get(srv.url + "/openapi.json").json()["paths"])
        assert "/v1/qa" in paths and "/v1/classify" not in paths
        r = httpx.post(
            srv.url + "/v1/qa", json={"inputs": {"question": "a", "context": "b"}, "null_threshold": False}
        )
        assert r.status_code == 422
