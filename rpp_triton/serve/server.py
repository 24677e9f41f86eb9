"""Running the server: `serve(model_dir, ...)` checks the model directory against the options
(before any weights load), then serves it with uvicorn on this machine or as a Ray Serve
deployment, and returns the process's exit status."""

from __future__ import annotations

import logging
import threading

from rpp_triton.errors import UsageError
from rpp_triton.serve.config import HttpConfig, LoadConfig, RayConfig, ServerConfig
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
        try:
            from rpp_triton.serve import ray_app
        except ImportError as exc:
            raise UsageError(f"--ray needs Ray Serve: pip install 'rpp_triton[ray]' ({exc})") from None
        return ray_app.serve_forever(model_dir, load, server, http, ray)
    return _serve_local(lambda: Predictor.load(source, load), server, http)


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
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=http.host,
            port=http.port,
            log_level=http.log_level,
            # In-flight requests finish within their own timeout; do not wait longer than that.
            timeout_graceful_shutdown=int(config.request_timeout_s) + 5,
            timeout_keep_alive=http.keep_alive_s,
        )
    )
    server.run()
    if failed:
        log.error("the model failed to load: %s", failed[0])
        return 1
    return 0
