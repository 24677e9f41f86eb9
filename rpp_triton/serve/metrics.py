"""Prometheus metrics of one server, and the two ASGI middlewares in front of the routes: one counts
and times every request, one holds each request to the server's limits on headers and body."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from rpp_triton.serve.config import ServerConfig
from rpp_triton.serve.errors import STATUS, Kind, error_response

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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
            buckets=LATENCY_BUCKETS,
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
            "rpp_forward_seconds", "Model forward time per batch", buckets=LATENCY_BUCKETS[:-2], registry=r
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
    """Counts every HTTP request by route and status and times it (outermost, so 413s count too).
    Paths that are not routes of the app count as route "other"; a request answered nothing because
    its client went away (while sending the body, say) counts as status 499, not as an error."""

    def __init__(self, app, get_metrics: Callable[[], Metrics | None], routes: set[str]):
        self.app, self.get_metrics, self.routes = app, get_metrics, routes

    async def __call__(self, scope, receive, send):
        metrics = self.get_metrics() if scope["type"] == "http" else None
        if metrics is None:
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = STATUS[Kind.CLIENT_CLOSED]
        start = time.perf_counter()

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            status = STATUS[Kind.INTERNAL]  # the server error middleware outside answers 500
            raise
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(route, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)


class RequestLimitsMiddleware:
    """Checks a request against the limits of `config()` before any route sees it: headers over
    `max_header_bytes` are refused with 431; a body is read whole first, refused with 413 past
    `max_body_bytes` and with 408 if it has not fully arrived `read_timeout_s` after the headers (a
    slow or stalled client).

    The API only takes JSON, so a body sent without a JSON content type (curl's `-d` default is a
    form) is read as JSON rather than refused."""

    def __init__(self, app, config: Callable[[], ServerConfig | None]):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        config = self.config() if scope["type"] == "http" else None
        if config is None:
            await self.app(scope, receive, send)
            return
        head = len(scope.get("raw_path") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope.get("headers") or []
        )
        if head > config.max_header_bytes:
            message = f"the request line and headers are over the limit of {config.max_header_bytes} bytes"
            await error_response(Kind.HEADERS_TOO_LARGE, message)(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = config.max_body_bytes
        too_large = error_response(
            Kind.PAYLOAD_TOO_LARGE, f"the request body is over the limit of {limit} bytes"
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
        deadline = time.monotonic() + config.read_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except asyncio.TimeoutError:
                slow = f"the request body did not arrive within {config.read_timeout_s:g} s"
                await error_response(Kind.READ_TIMEOUT, slow, {"Connection": "close"})(scope, receive, send)
                return
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
