"""HTTP routes of the inference server (FastAPI), shared by the single-machine server and Ray Serve.

Routes: `POST /v1/embed`, `POST /v1/classify` (models with a sequence-classification head),
`POST /v1/qa` (models with a question-answering head), `GET /health`, `GET /metrics`, `/docs`.

Every failure is answered `{"error": {"type", "message"}}` with the status that
`rpp_triton.serve.errors` gives its kind. `build_app(get_service)` wires the routes to a `Service`;
`create_app(load, config)` is the single-machine server: it loads the model in the background, so
`/health` answers 503 until the model is loaded and warm, and drains queued work on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from rpp_triton.serve.config import ServerConfig
from rpp_triton.serve.errors import Kind, ServeError, error_response
from rpp_triton.serve.metrics import BodyLimitMiddleware, MetricsMiddleware
from rpp_triton.serve.predictor import Predictor
from rpp_triton.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    QARequest,
    QAResponse,
)
from rpp_triton.serve.service import LocalService, Service

log = logging.getLogger("rpp_triton.serve")

__all__ = ["ServerConfig", "build_app", "create_app"]


def _as_list(inputs) -> list:
    # A bare pair arrives as a tuple; a list of inputs as a list.
    return list(inputs) if isinstance(inputs, list) else [inputs]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error_response(exc.kind, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(Kind.MALFORMED_JSON, "the request body is not valid JSON")
        parts = []
        for err in errors[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return error_response(Kind.INVALID_REQUEST, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body at all (e.g. not UTF-8)
            return error_response(Kind.MALFORMED_JSON, f"the request body is not valid JSON ({exc.detail})")
        kind = {404: Kind.NOT_FOUND, 405: Kind.METHOD_NOT_ALLOWED}.get(exc.status_code, Kind.INTERNAL)
        return error_response(kind, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(Kind.INTERNAL, f"{type(exc).__name__}: {exc}")


def build_app(get_service: Callable[[], Service | None], lifespan=None) -> FastAPI:
    """The FastAPI app. `get_service()` is looked up per request (Ray builds the service later)."""
    app = FastAPI(
        title="rpp_triton inference server",
        description="Embeddings and task heads of a pruned, block-sparse BERT-family encoder.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)

    def service() -> Service:
        svc = get_service()
        if svc is None:
            raise ServeError("the model is still loading", Kind.UNAVAILABLE)
        return svc

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
        return Response(generate_latest(service().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed", response_model=EmbedResponse, summary="Mean-pooled embeddings of texts")
    async def embed(body: EmbedRequest):
        embeddings, encoded = await service().embed(_as_list(body.inputs), "/v1/embed")
        if body.normalize:
            embeddings = [[x / (sum(v * v for v in e) ** 0.5 or 1.0) for x in e] for e in embeddings]
        return {"embeddings": embeddings, "truncated": [e.truncated for e in encoded]}

    @app.post("/v1/classify", response_model=ClassifyResponse, summary="Labels from a classification head")
    async def classify(body: ClassifyRequest):
        svc = service()
        inputs = [x if isinstance(x, str) else tuple(x) for x in _as_list(body.inputs)]
        predictions, encoded = await svc.classify(inputs, "/v1/classify")
        return {
            "labels": [p["label"] for p in predictions],
            "scores": [p["score"] for p in predictions],
            "predictions": predictions,
            "label_names": svc.predictor.label_names,
            "truncated": [e.truncated for e in encoded],
        }

    @app.post("/v1/qa", response_model=QAResponse, summary="Answer spans from a question-answering head")
    async def qa(body: QARequest):
        pairs = [(it.question, it.context) for it in _as_list(body.inputs)]
        threshold = body.null_threshold if body.allow_no_answer else None
        answers = await service().answer(pairs, threshold, "/v1/qa")
        return {"answers": answers, "truncated": [False] * len(pairs)}

    def limit() -> int | None:
        svc = get_service()
        return None if svc is None else svc.config.max_body_bytes

    def metrics_of() -> object:
        svc = get_service()
        return None if svc is None else svc.metrics

    # Metrics outermost, so even the body limit's 413s are counted.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=limit)
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
