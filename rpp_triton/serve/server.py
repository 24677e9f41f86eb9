"""Running the server: `serve(model_dir, ...)` checks the model directory against the options
(before any weights load), then serves it with uvicorn on this machine or as a Ray Serve
deployment, and returns the process's exit status.

Slow clients are bounded at every step: `max_connections` open connections (uvicorn answers 503
past it), `read_timeout_s` for a request's headers (the connection is closed) and again for its
body (408, in `metrics.RequestLimitsMiddleware`), `max_header_bytes` of headers (431; 400 from h11
when they arrive in pieces), `keep_alive_s` of idle time between requests.
"""

from __future__ import annotations

import logging
import os
import threading

from uvicorn.protocols.http.h11_impl import H11Protocol

from rpp_triton.errors import UsageError
from rpp_triton.serve.config import HttpConfig, LoadConfig, RayConfig, ServerConfig, is_loopback
from rpp_triton.serve.predictor import Predictor, inspect_model

log = logging.getLogger("rpp_triton.serve")


def serve(
    model_dir: str,
    load: LoadConfig,
    server: ServerConfig,
    http: HttpConfig,
    ray: RayConfig | None = None,
) -> int:
    """Serve `model_dir` until SIGTERM or Ctrl-C; 0 after a clean drain, 1 when the model failed
    to load. Bad input (the directory, its tokenizer or report, options it cannot take) is a
    UsageError before anything loads."""
    logging.basicConfig(
        level=http.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    source = inspect_model(model_dir, load)
    if ray is not None:
        if ray.address is None and is_loopback(http.host):
            # Ray's single-machine mode (its default on macOS and Windows): every Ray process listens
            # on loopback only. Read when Ray is imported, so it is set first.
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            from rpp_triton.serve import ray_app
        except ImportError as exc:
            raise UsageError(f"--ray needs Ray Serve: pip install 'rpp_triton[ray]' ({exc})") from None
        return ray_app.serve_forever(model_dir, load, server, http, ray)
    return _serve_local(lambda: Predictor.load(source, load), server, http)


class _HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived
    `head_timeout_s` after it opened or after its previous response (uvicorn itself waits forever,
    so a client sending headers slowly would hold a connection slot)."""

    head_timeout_s = 10.0
    _head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, config: ServerConfig, http: HttpConfig, **overrides):
    """uvicorn's settings for `app`: the address and every limit on clients."""
    import uvicorn

    protocol = type("HeadTimeoutH11", (_HeadTimeoutH11,), {"head_timeout_s": config.read_timeout_s})
    options = dict(
        host=http.host,
        port=http.port,
        log_level=http.log_level,
        http=protocol,
        limit_concurrency=http.max_connections,
        timeout_keep_alive=http.keep_alive_s,
        # h11 stops buffering a head this long (one that arrives whole is checked by the app).
        h11_max_incomplete_event_size=config.max_header_bytes,
        # In-flight requests finish within their own timeout; do not wait longer than that.
        timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
    )
    return uvicorn.Config(app, **{**options, **overrides})


def _serve_local(load, config: ServerConfig, http: HttpConfig) -> int:
    import uvicorn

    from rpp_triton.serve.app import create_app

    failed = []

    def on_failure(exc):
        failed.append(exc)
        server.should_exit = True

    app, service = create_app(load, config, on_failure=on_failure)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Flush the batcher at once; uvicorn then waits for the in-flight requests. A thread,
            # because the signal may interrupt the event loop while it holds the batcher's lock.
            threading.Thread(target=service.begin_shutdown, daemon=True).start()
            # uvicorn's own handler would raise the signal again after the drain; a clean drain
            # exits 0. A second Ctrl-C still forces the exit.
            self.force_exit = self.should_exit
            self.should_exit = True

    server = Server(uvicorn_config(app, config, http))
    server.run()
    if failed:
        log.error("the model failed to load: %s", failed[0])
        return 1
    return 0
