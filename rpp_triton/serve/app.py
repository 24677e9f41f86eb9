"""HTTP API of the inference server (FastAPI), shared by the single-machine server and Ray Serve.

Routes: `POST /v1/embed`, `POST /v1/classify` (models with a sequence-classification head),
`POST /v1/qa` (models with a question-answering head), `GET /health`, `GET /metrics`, `/docs`.

Every failure a client can cause is a 4xx with `{"error": {"type", "message"}}`: malformed JSON
(400), wrong types, empty input lists or an empty question or context (422), too many inputs,
too-long inputs or a too-large body (413), a full queue (429). Not ready yet, shutting down or
timed out is 503 (with Retry-After).

`build_app(get_service)` wires the routes to a `Service` (a predictor plus a way to run batches);
`create_app(load, config)` is the single-machine server: it loads the model in the background, so
`/health` answers 503 until the model is loaded and warm, and drains queued work on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rpp_triton.serve.batching import BatcherClosed, DynamicBatcher, QueueFull, RequestTimeout
from rpp_triton.serve.predictor import InputTooLong, Predictor, QuestionTooLong

log = logging.getLogger("rpp_triton.serve")

ROUTES = ("/v1/embed", "/v1/classify", "/v1/qa", "/health", "/metrics")
# Tokenizing more characters than this per request moves off the event loop.
_INLINE_TOKENIZE_CHARS = 4096


@dataclass
class ServerConfig:
    """Limits and batching settings (each one is a `rpp-triton serve` flag)."""

    max_inputs: int = 64  # inputs per request
    max_chars: int = 20_000  # characters per input
    max_body_bytes: int = 1_000_000  # request body
    max_batch_size: int = 32  # sequences per forward
    max_batch_tokens: int = 16_384  # padded tokens per forward (sequences x longest)
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    max_queue: int = 1024  # inputs waiting for a batch
    request_timeout_s: float = 30.0
    warmup: bool = True

    def __post_init__(self):
        for name in (
            "max_inputs",
            "max_chars",
            "max_body_bytes",
            "max_batch_size",
            "max_batch_tokens",
            "max_queue",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.max_inputs > self.max_queue:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_queue ({self.max_queue})")


class ApiError(Exception):
    """An error answered to the client as `{"error": {"type", "message"}}` with `status`."""

    def __init__(self, status: int, type_: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message}}, status_code=status, headers=headers)


# ------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics in a registry of their own (one per server, so tests can run several)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rpp_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "rpp_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batch_size = Histogram(
            "rpp_batch_size",
            "Sequences per model forward",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "rpp_batch_tokens",
            "Padded tokens per model forward (sequences x longest)",
            buckets=(64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.forward_seconds = Histogram(
            "rpp_forward_seconds",
            "Model forward time per batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.inputs = Counter("rpp_inputs", "Inputs (sequences) computed, by route", ["route"], registry=r)
        self.queue_depth = Gauge("rpp_queue_depth", "Inputs waiting for a batch", registry=r)
        self.in_flight = Gauge("rpp_requests_in_flight", "HTTP requests being handled", registry=r)
        self.ready = Gauge("rpp_ready", "1 when the model is loaded and warm", registry=r)
        self.sparse_layers = Gauge("rpp_sparse_layers", "Linear layers running block-sparse", registry=r)

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)


class MetricsMiddleware:
    """Counts every HTTP request by route and status and times it (outermost, so 413s count too)."""

    def __init__(self, app, get_service: Callable[[], Service | None]):
        self.app, self.get_service = app, get_service

    async def __call__(self, scope, receive, send):
        service = self.get_service() if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return
        metrics = service.metrics
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500
        start = time.perf_counter()

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Refuses request bodies over `max_body_bytes` with 413 before they reach the JSON parser.

    The API only takes JSON, so a body sent without a JSON content type (curl's `-d` default is a
    form) is read as JSON rather than refused."""

    def __init__(self, app, get_service: Callable[[], Service | None]):
        self.app, self.get_service = app, get_service

    async def __call__(self, scope, receive, send):
        service = self.get_service() if scope["type"] == "http" else None
        if service is None or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = service.config.max_body_bytes
        too_large = error_response(
            413, "payload_too_large", f"the request body is over the limit of {limit} bytes"
        )
        headers = dict(scope.get("headers") or [])
        if b"json" not in headers.get(b"content-type", b""):
            headers[b"content-type"] = b"application/json"
            scope = dict(scope, headers=list(headers.items()))
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# -------------------------------------------------------------------- service
class Service:
    """What the routes need: a predictor, limits, metrics and `run(encoded) -> outputs`."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.predictor: Predictor | None = None
        self.state = "loading"  # loading -> ready -> draining; or failed
        self.error: str | None = None

    async def run(self, encoded: list, timeout: float) -> list:
        raise NotImplementedError

    def set_ready(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.metrics.sparse_layers.set(predictor.info.sparse_layers)
        self.state = "ready"
        self.metrics.ready.set(1)

    def require(self, task: str) -> Predictor:
        if self.state != "ready" or self.predictor is None:
            message = {
                "loading": "the model is still loading",
                "draining": "the server is shutting down",
                "failed": f"the model failed to load: {self.error}",
            }.get(self.state, self.state)
            raise ApiError(503, "unavailable", message, {"Retry-After": "1"})
        if task not in self.predictor.tasks:
            raise ApiError(
                404,
                "route_not_supported",
                f"this model ({self.predictor.info.architecture}) has no head for {task}; "
                f"it serves: {', '.join(sorted(self.predictor.tasks))}",
            )
        return self.predictor


class LocalService(Service):
    """Single-machine service: loads in a background thread, batches with a DynamicBatcher."""

    def __init__(
        self, load: Callable[[], Predictor], config: ServerConfig, on_failure: Callable | None = None
    ):
        super().__init__(config)
        self._load = load
        self._on_failure = on_failure
        self.batcher: DynamicBatcher | None = None
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        self._loader = threading.Thread(target=self._load_and_warm, name="rpp-loader", daemon=True)
        self._loader.start()

    def _load_and_warm(self) -> None:
        try:
            predictor = self._load()
            if self.config.warmup:
                seconds = predictor.warmup(batch_size=min(8, self.config.max_batch_size))
                log.info("warm-up took %.2f s", seconds)
            cfg = self.config
            self.batcher = DynamicBatcher(
                predictor.forward,
                max_batch_size=cfg.max_batch_size,
                max_batch_tokens=cfg.max_batch_tokens,
                max_wait_s=cfg.max_wait_ms / 1000,
                max_queue=cfg.max_queue,
                on_batch=self.metrics.observe_batch,
            )
            self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
            if self.state == "loading":
                self.set_ready(predictor)
                info = predictor.info
                log.info(
                    "ready: %s on %s (%s), %d sparse Linear layers",
                    info.architecture,
                    info.device,
                    info.dtype,
                    info.sparse_layers,
                )
        except Exception as exc:  # noqa: BLE001 - reported through /health and on_failure
            if isinstance(exc, ValueError):  # bad model directory or options: the message says it all
                log.error("loading the model failed: %s", exc)
            else:
                log.exception("loading the model failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            if self._on_failure is not None:
                self._on_failure(exc)

    async def run(self, encoded: list, timeout: float) -> list:
        return await self.batcher.submit(encoded, [len(e) for e in encoded], timeout)

    def begin_shutdown(self) -> None:
        """Stop taking work and run what is queued now, without waiting out the batch window."""
        self.shutdown(drain_timeout=0)

    def shutdown(self, drain_timeout: float | None = None) -> None:
        """Refuse new work (503) and wait up to `drain_timeout` for the queued work to finish."""
        if self.state in ("loading", "ready"):
            self.state = "draining"
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.close(drain=True, timeout=drain_timeout)


# ------------------------------------------------------------------- requests
Text = str
TextOrPair = str | tuple[str, str]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | list[Text] = Field(description="one text or a list of texts")
    normalize: bool = Field(False, description="scale each embedding to unit length")


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    truncated: list[bool]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": ["A sentence."]}]})
    inputs: Text | list[TextOrPair] = Field(description="one text, or a list of texts and [text, text] pairs")


class Classification(BaseModel):
    label: str
    score: float
    probabilities: list[float] | None = None


class ClassifyResponse(BaseModel):
    labels: list[str]
    scores: list[float]
    predictions: list[Classification]
    label_names: list[str]
    truncated: list[bool]


class QAItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    context: str = Field(description="any length: a long context is read in overlapping windows")


class QARequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": {"question": "Who?", "context": "Ada wrote it."}}]},
    )
    inputs: QAItem | list[QAItem]
    allow_no_answer: bool = Field(
        False,
        description="answer empty (no_answer: true) when the null score beats the best span by more "
        "than null_threshold (SQuAD v2.0); otherwise the best span is always returned",
    )
    null_threshold: float = Field(
        0.0,
        allow_inf_nan=False,
        description="with allow_no_answer: the null_margin above which the answer is empty "
        "(`finetune` on SQuAD v2.0 reports the best one as best_f1_thresh)",
    )


class Answer(BaseModel):
    answer: str
    score: float = Field(description="start probability x end probability in the span's window")
    start: int = Field(description="character offset of the answer in the context (0 when empty)")
    end: int = Field(description="character offset just past the answer (0 when empty)")
    null_margin: float | None = Field(
        None, description="null score minus the best span's score, in logits (null when no span fits)"
    )
    no_answer: bool = Field(False, description="the null answer won (only with allow_no_answer)")


class QAResponse(BaseModel):
    answers: list[Answer]
    truncated: list[bool] = Field(description="always false: long contexts are windowed, never cut")


def _as_list(inputs) -> list:
    # A bare pair arrives as a tuple; a list of inputs as a list.
    return list(inputs) if isinstance(inputs, list) else [inputs]


def check_inputs(texts: list[str], config: ServerConfig, per_input: int = 1) -> None:
    """Limits on `texts`, which are `per_input` consecutive texts per input (2 for a QA pair)."""
    n = len(texts) // per_input
    if not texts:
        raise ApiError(422, "empty_inputs", "inputs is an empty list; send at least one input")
    if n > config.max_inputs:
        raise ApiError(413, "too_many_inputs", f"{n} inputs; the limit is {config.max_inputs} per request")
    for i, text in enumerate(texts):
        if len(text) > config.max_chars:
            raise ApiError(
                413,
                "input_too_long",
                f"input {i // per_input} has {len(text)} characters; the limit is {config.max_chars}",
            )


async def _encode(encode: Callable, inputs: list, chars: int) -> list:
    try:
        if chars <= _INLINE_TOKENIZE_CHARS:
            return encode(inputs)
        return await asyncio.to_thread(encode, inputs)
    except (InputTooLong, QuestionTooLong) as exc:
        raise ApiError(413, "input_too_long", str(exc)) from None


async def _run(service: Service, encoded: list, route: str, n_inputs: int | None = None) -> list:
    try:
        outputs = await service.run(encoded, service.config.request_timeout_s)
    except QueueFull as exc:
        raise ApiError(429, "overloaded", f"server busy: {exc}", {"Retry-After": "1"}) from None
    except RequestTimeout as exc:
        raise ApiError(503, "timeout", str(exc), {"Retry-After": "1"}) from None
    except BatcherClosed as exc:
        raise ApiError(503, "unavailable", str(exc), {"Retry-After": "1"}) from None
    service.metrics.inputs.labels(route).inc(len(encoded) if n_inputs is None else n_inputs)
    return outputs


# ------------------------------------------------------------------------ app
def build_app(get_service: Callable[[], Service | None], lifespan=None) -> FastAPI:
    """The FastAPI app. `get_service()` is looked up per request (Ray builds the service later)."""
    app = FastAPI(
        title="rpp_triton inference server",
        description="Embeddings and task heads of a pruned, block-sparse BERT-family encoder.",
        lifespan=lifespan,
    )

    def service() -> Service:
        svc = get_service()
        if svc is None:
            raise ApiError(503, "unavailable", "the model is still loading", {"Retry-After": "1"})
        return svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        parts = []
        for err in errors[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body at all (e.g. not UTF-8)
            return error_response(400, "malformed_json", f"the request body is not valid JSON ({exc.detail})")
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal", f"{type(exc).__name__}: {exc}")

    @app.get("/health", summary="Readiness: 200 once the model is loaded and warm, 503 before")
    async def health():
        svc = get_service()
        if svc is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        body = {"status": svc.state}
        if svc.predictor is not None:
            body["model"] = asdict(svc.predictor.info)
        if svc.error:
            body["error"] = svc.error
        return JSONResponse(body, status_code=200 if svc.state == "ready" else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        svc = service()
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed", response_model=EmbedResponse, summary="Mean-pooled embeddings of texts")
    async def embed(body: EmbedRequest):
        svc = service()
        predictor = svc.require("embed")
        texts = _as_list(body.inputs)
        check_inputs(texts, svc.config)
        encoded = await _encode(predictor.encode_texts, texts, sum(map(len, texts)))
        outputs = await _run(svc, encoded, "/v1/embed")
        embeddings = [o.embedding for o in outputs]
        if body.normalize:
            embeddings = [[x / (sum(v * v for v in e) ** 0.5 or 1.0) for x in e] for e in embeddings]
        return {"embeddings": embeddings, "truncated": [e.truncated for e in encoded]}

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Labels from a classification head")
    async def classify(body: ClassifyRequest):
        svc = service()
        predictor = svc.require("classify")
        inputs = [x if isinstance(x, str) else tuple(x) for x in _as_list(body.inputs)]
        check_inputs([t for x in inputs for t in ((x,) if isinstance(x, str) else x)], svc.config)
        if not inputs:
            raise ApiError(422, "empty_inputs", "inputs is an empty list; send at least one input")
        chars = sum(len(x) if isinstance(x, str) else len(x[0]) + len(x[1]) for x in inputs)
        encoded = await _encode(predictor.encode_texts, inputs, chars)
        outputs = await _run(svc, encoded, "/v1/classify")
        predictions = [predictor.classification(o) for o in outputs]
        return {
            "labels": [p["label"] for p in predictions],
            "scores": [p["score"] for p in predictions],
            "predictions": predictions,
            "label_names": predictor.label_names,
            "truncated": [e.truncated for e in encoded],
        }

    @app.post("/v1/qa", response_model=QAResponse, summary="Answer spans from a question-answering head")
    async def qa(body: QARequest):
        svc = service()
        predictor = svc.require("qa")
        items = _as_list(body.inputs)
        check_inputs([t for it in items for t in (it.question, it.context)], svc.config, per_input=2)
        for i, it in enumerate(items):
            for name in ("question", "context"):
                if not getattr(it, name).strip():
                    raise ApiError(422, "empty_input", f"input {i} has an empty {name}")
        pairs = [(it.question, it.context) for it in items]
        chars = sum(len(q) + len(c) for q, c in pairs)
        # One batcher input per window: windows of every request share the batches.
        windows = await _encode(predictor.encode_qa, pairs, chars)
        if len(windows) > svc.config.max_queue:
            raise ApiError(
                413,
                "input_too_long",
                f"the contexts make {len(windows)} windows of {predictor.max_tokens} tokens; "
                f"the limit is {svc.config.max_queue} per request (the queue size)",
            )
        outputs = await _run(svc, windows, "/v1/qa", n_inputs=len(pairs))
        threshold = body.null_threshold if body.allow_no_answer else None
        answers = predictor.answers(pairs, windows, outputs, null_threshold=threshold)
        return {"answers": answers, "truncated": [False] * len(pairs)}

    # Metrics outermost, so even the body limit's 413s are counted.
    app.add_middleware(BodyLimitMiddleware, get_service=get_service)
    app.add_middleware(MetricsMiddleware, get_service=get_service)
    return app


def create_app(
    load: Callable[[], Predictor],
    config: ServerConfig | None = None,
    on_failure: Callable | None = None,
) -> tuple[FastAPI, LocalService]:
    """The single-machine server: `load()` runs in a background thread once the app starts."""
    service = LocalService(load, config or ServerConfig(), on_failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        # uvicorn has already waited for in-flight requests; finish anything still queued.
        await asyncio.to_thread(service.shutdown, service.config.request_timeout_s)

    app = build_app(lambda: service, lifespan=lifespan)
    app.state.service = service
    return app, service
