"""HTTP routes of the inference server (FastAPI), shared by the single-machine server and Ray Serve.

Native routes: `POST /v1/embed`, `POST /v1/classify` and `POST /v1/qa` (models with that head).
Clients of other servers work unchanged: `POST /v1/embeddings` speaks OpenAI's embeddings API,
`POST /embed` (and `POST /`, where `huggingface_hub.InferenceClient` posts) text-embeddings-
inference's. `GET /health`, `GET /info`, `GET /metrics`; the OpenAPI document at `/openapi.json`
and `/docs` lists the inference routes this model serves and every error each one answers.

Every failure is answered `{"error": {"type", "message"}}` with the status that
`rpp_triton.serve.errors` gives its kind. `build_app(get_service)` wires the routes to a `Service`;
`create_app(load, config)` is the single-machine server: it loads the model in the background, so
`/health` answers 503 until the model is loaded and warm, and drains queued work on shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from rpp_triton import __version__
from rpp_triton.serve.config import ServerConfig
from rpp_triton.serve.errors import STATUS, Kind, ServeError, error_response
from rpp_triton.serve.metrics import MetricsMiddleware, RequestLimitsMiddleware
from rpp_triton.serve.predictor import Predictor
from rpp_triton.serve.schemas import (
    LIMIT,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorBody,
    Health,
    Info,
    OpenAIEmbeddingsRequest,
    OpenAIEmbeddingsResponse,
    QARequest,
    QAResponse,
    TEIEmbedRequest,
)
from rpp_triton.serve.service import LocalService, Service

log = logging.getLogger("rpp_triton.serve")

__all__ = ["ServerConfig", "build_app", "create_app"]

# Inference routes that need a task head; every other route is served by every model.
TASK_ROUTES = {"/v1/classify": "classify", "/v1/qa": "qa"}
# What any inference route may answer besides 200.
_INFERENCE_ERRORS = (
    Kind.MALFORMED_JSON,
    Kind.PAYLOAD_TOO_LARGE,
    Kind.TOO_MANY_INPUTS,
    Kind.INPUT_TOO_LONG,
    Kind.INVALID_REQUEST,
    Kind.EMPTY_INPUTS,
    Kind.INVALID_TEXT,
    Kind.READ_TIMEOUT,
    Kind.HEADERS_TOO_LARGE,
    Kind.OVERLOADED,
    Kind.INTERNAL,
    Kind.UNAVAILABLE,
    Kind.TIMEOUT,
)


def documented(*kinds: Kind) -> dict:
    """OpenAPI `responses` for the error kinds a route answers, grouped by status."""
    by_status: dict[int, list[str]] = {}
    for kind in kinds:
        by_status.setdefault(STATUS[kind], []).append(kind.value)
    return {
        status: {"model": ErrorBody, "description": "error types: " + ", ".join(names)}
        for status, names in sorted(by_status.items())
    }


def _as_list(inputs) -> list:
    # A bare pair arrives as a tuple; a list of inputs as a list.
    return list(inputs) if isinstance(inputs, list) else [inputs]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _validation_error(errors: list[dict]) -> JSONResponse:
    """A 422 naming (at most three) offending fields; an empty input list and a blank question or
    context are kinds of their own."""
    for e in errors:
        kind, loc = e.get("type"), e.get("loc", ())
        if kind == "json_invalid":
            return error_response(Kind.MALFORMED_JSON, "the request body is not valid JSON")
        if kind == "too_short" and loc[1:2] in (("inputs",), ("input",)):
            return error_response(Kind.EMPTY_INPUTS, "inputs is an empty list; send at least one input")
        if kind == "string_pattern_mismatch" and loc[-1] in ("question", "context"):
            where = f"input {loc[-2]}" if isinstance(loc[-2], int) else "the input"
            return error_response(Kind.EMPTY_INPUT, f"{where} has an empty {loc[-1]}")
    parts = []
    for err in errors[:3]:
        where = ".".join(_shown(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {_shown(err.get('msg', 'invalid'), 200)}")
    return error_response(Kind.INVALID_REQUEST, "; ".join(parts) or "invalid request")


def _shown(value, limit: int = 40) -> str:
    """`value` as text fit to echo back: at most `limit` characters, lone surrogates escaped."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _state_limits(node, config: ServerConfig | None) -> None:
    """Turn the `LIMIT` marks of a JSON schema into maxLength / maxItems with `config`'s values
    (or drop them while there is no config yet)."""
    if isinstance(node, dict):
        name = node.pop(LIMIT, None)
        if name is not None and config is not None:
            node["maxLength" if node.get("type") == "string" else "maxItems"] = getattr(config, name)
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return
    for child in children:
        _state_limits(child, config)


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work` unless the client goes away first: then cancel it, which takes its inputs off
    the batcher's queue before they are computed."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request was cancelled itself
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task not in done:
        task.cancel()
        raise ServeError("the client closed the connection", Kind.CLIENT_CLOSED)
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc.kind, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body at all (e.g. not UTF-8)
            return error_response(Kind.MALFORMED_JSON, "the request body is not valid JSON")
        kind = {404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED}.get(exc.status_code, Kind.INTERNAL)
        return error_response(kind, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(Kind.INTERNAL, "internal error")


def build_app(get_service: Callable[[], Service | None], lifespan=None) -> FastAPI:
    """The FastAPI app. `get_service()` is looked up per request (Ray builds the service later)."""
    app = FastAPI(
        title="rpp_triton inference server",
        description="Embeddings and task heads of a pruned, block-sparse BERT-family encoder.",
        version=__version__,
        lifespan=lifespan,
    )
    _install_error_handlers(app)

    def service() -> Service:
        svc = get_service()
        if svc is None:
            raise ServeError("the model is still loading", Kind.UNAVAILABLE)
        return svc

    def served_routes(tasks) -> list[str]:
        inference = [r.path for r in app.routes if "POST" in getattr(r, "methods", ())]
        return [p for p in inference if TASK_ROUTES.get(p, "embed") in tasks]

    @app.get(
        "/health",
        response_model=Health,
        summary="Readiness: 200 once the model is loaded and warm, 503 before",
        responses={
            503: {"model": Health, "description": "loading, draining or failed"},
            **documented(Kind.HEADERS_TOO_LARGE),
        },
    )
    async def health():
        svc = get_service()
        body = {"status": "loading" if svc is None else svc.state}
        if svc is not None and svc.predictor is not None:
            body["model_id"] = svc.predictor.info.model_id
        ready = body["status"] == "ready"
        return JSONResponse(
            body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "1"}
        )

    @app.get(
        "/info",
        response_model=Info,
        summary="The model, its sparsity and the limits it is served with",
        responses=documented(Kind.HEADERS_TOO_LARGE, Kind.UNAVAILABLE, Kind.INTERNAL),
    )
    async def info():
        svc = service()
        body = svc.info()
        body["routes"] = served_routes(svc.predictor.tasks)
        return body

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            **documented(Kind.HEADERS_TOO_LARGE, Kind.UNAVAILABLE),
        },
    )
    async def metrics():
        return Response(generate_latest(service().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        summary="Mean-pooled embeddings of texts",
        responses=documented(*_INFERENCE_ERRORS),
    )
    async def embed(body: EmbedRequest, request: Request):
        work = service().embed(_as_list(body.inputs), "/v1/embed")
        embeddings, encoded = await unless_disconnected(request, work)
        if body.normalize:
            embeddings = [_unit(e) for e in embeddings]
        return {"embeddings": embeddings, "truncated": [e.truncated for e in encoded]}

    @app.post(
        "/v1/embeddings",
        response_model=OpenAIEmbeddingsResponse,
        summary="Embeddings in OpenAI's API shape (unit length)",
        responses=documented(*_INFERENCE_ERRORS),
    )
    async def openai_embeddings(body: OpenAIEmbeddingsRequest, request: Request):
        svc = service()
        embeddings, encoded = await unless_disconnected(
            request, svc.embed(_as_list(body.input), "/v1/embeddings")
        )
        data = []
        for i, vector in enumerate(embeddings):
            vector = _unit(vector)
            if body.encoding_format == "base64":
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(e) for e in encoded)
        return {
            "object": "list",
            "data": data,
            "model": svc.predictor.info.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def tei_embed(body: TEIEmbedRequest, request: Request):
        work = service().embed(_as_list(body.inputs), "/embed", truncate=body.truncate)
        embeddings, _ = await unless_disconnected(request, work)
        return [_unit(e) for e in embeddings] if body.normalize else embeddings

    for path in ("/embed", "/"):
        app.post(
            path,
            response_model=list[list[float]],
            summary="Embeddings in text-embeddings-inference's API shape (a bare list of vectors)",
            responses=documented(*_INFERENCE_ERRORS),
            operation_id=f"tei_embed{path.replace('/', '_')}",
        )(tei_embed)

    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        summary="Labels from a classification head",
        responses=documented(*_INFERENCE_ERRORS),
    )
    async def classify(body: ClassifyRequest, request: Request):
        svc = service()
        inputs = [x if isinstance(x, str) else tuple(x) for x in _as_list(body.inputs)]
        predictions, encoded = await unless_disconnected(request, svc.classify(inputs, "/v1/classify"))
        return {
            "labels": [p["label"] for p in predictions],
            "scores": [p["score"] for p in predictions],
            "predictions": predictions,
            "label_names": svc.predictor.label_names,
            "truncated": [e.truncated for e in encoded],
        }

    @app.post(
        "/v1/qa",
        response_model=QAResponse,
        summary="Answer spans from a question-answering head",
        responses=documented(*_INFERENCE_ERRORS, Kind.EMPTY_INPUT),
    )
    async def qa(body: QARequest, request: Request):
        pairs = [(it.question, it.context) for it in _as_list(body.inputs)]
        threshold = body.null_threshold if body.allow_no_answer else None
        answers = await unless_disconnected(request, service().answer(pairs, threshold, "/v1/qa"))
        return {"answers": answers, "truncated": [False] * len(pairs)}

    def openapi() -> dict:
        """The OpenAPI document, listing task routes only for a model with that head (all of them
        while the model is loading)."""
        svc = get_service()
        tasks = svc.predictor.tasks if svc is not None and svc.predictor is not None else None
        if tasks is not None and app.openapi_schema is not None:
            return app.openapi_schema
        routes = [
            r
            for r in app.routes
            if tasks is None or TASK_ROUTES.get(getattr(r, "path", ""), "") in ("", *tasks)
        ]
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=routes)
        _state_limits(schema, None if svc is None else svc.config)
        if tasks is not None:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi

    def config() -> ServerConfig | None:
        svc = get_service()
        return None if svc is None else svc.config

    def metrics_of() -> object:
        svc = get_service()
        return None if svc is None else svc.metrics

    # Metrics outermost, so even the limits' 413s are counted.
    app.add_middleware(RequestLimitsMiddleware, config=config)
    app.add_middleware(MetricsMiddleware, get_metrics=metrics_of, routes={r.path for r in app.routes})
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
