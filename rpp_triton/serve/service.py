"""The serving engine without HTTP: model state (loading, ready, draining, failed), request limits,
tokenization off the event loop, and running encoded inputs through a batcher.

`Service` is what the routes call; `run(encoded, timeout)` is left to the deployment (a
`DynamicBatcher` on one machine, Ray Serve's batching in a replica). Failures are `ServeError`s
of a kind (rpp_triton.serve.errors); the HTTP layer alone turns kinds into statuses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict

from rpp_triton.serve.batching import DynamicBatcher
from rpp_triton.serve.config import ServerConfig
from rpp_triton.serve.errors import Kind, ServeError
from rpp_triton.serve.metrics import Metrics
from rpp_triton.serve.predictor import Encoded, Predictor

log = logging.getLogger("rpp_triton.serve")


def check_inputs(inputs: list[tuple[str, ...]], config: ServerConfig) -> None:
    """Limits on a request's inputs, each one text or a pair of texts (a pair counts once)."""
    if not inputs:
        raise ServeError("inputs is an empty list; send at least one input", Kind.EMPTY_INPUTS)
    if len(inputs) > config.max_inputs:
        raise ServeError(
            f"{len(inputs)} inputs; the limit is {config.max_inputs} per request", Kind.TOO_MANY_INPUTS
        )
    for i, texts in enumerate(inputs):
        for text in texts:
            if len(text) > config.max_chars:
                raise ServeError(
                    f"input {i} has a text of {len(text)} characters; the limit is {config.max_chars}",
                    Kind.INPUT_TOO_LONG,
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON can escape a lone surrogate ("\ud800"); UTF-8 cannot
                raise ServeError(
                    f"input {i} is not valid Unicode (a lone surrogate)", Kind.INVALID_TEXT
                ) from None


class Service:
    """What the routes need: a predictor, limits, metrics and `run(encoded) -> outputs`."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.predictor: Predictor | None = None
        self.state = "loading"  # loading -> ready -> draining; or failed

    async def run(self, encoded: list[Encoded], timeout: float) -> list:
        raise NotImplementedError

    def set_ready(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.metrics.sparse_layers.set(len(predictor.info.sparse_layers))
        self.state = "ready"
        self.metrics.ready.set(1)

    def require(self, task: str) -> Predictor:
        """The predictor, if it is ready and has a head for `task`."""
        if self.state != "ready" or self.predictor is None:
            message = {
                "loading": "the model is still loading",
                "draining": "the server is shutting down",
                "failed": "the model failed to load (the server log says why)",
            }.get(self.state, self.state)
            raise ServeError(message, Kind.UNAVAILABLE)
        if task not in self.predictor.tasks:
            raise ServeError(
                f"this model ({self.predictor.info.architecture}) has no head for {task}; "
                f"it serves: {', '.join(sorted(self.predictor.tasks))}",
                Kind.ROUTE_NOT_SUPPORTED,
            )
        return self.predictor

    # ------------------------------------------------------------- requests
    def info(self) -> dict:
        """The model and the limits it is served with (GET /info)."""
        info = asdict(self.require("embed").info)
        cfg = self.config
        info["limits"] = {
            name: getattr(cfg, name)
            for name in (
                "max_inputs",
                "max_chars",
                "max_body_bytes",
                "max_batch_size",
                "max_batch_tokens",
                "max_wait_ms",
                "max_queue",
                "request_timeout_s",
            )
        }
        info["limits"].update(
            max_tokens=info["max_tokens"], on_long="truncate" if self.predictor.truncate else "refuse"
        )
        return info

    async def embed(
        self, texts: list[str], route: str, truncate: bool | None = None
    ) -> tuple[list[list[float]], list[Encoded]]:
        """Mean-pooled embeddings of `texts`, and their encodings (which say what was truncated).
        `truncate` overrides the server's choice for over-long inputs."""
        predictor = self.require("embed")
        check_inputs([(t,) for t in texts], self.config)
        encoded = await asyncio.to_thread(predictor.encode_texts, texts, truncate)
        outputs = await self._run(encoded, route)
        return [o.embedding for o in outputs], encoded

    async def classify(
        self, inputs: list[str | tuple[str, str]], route: str
    ) -> tuple[list[dict], list[Encoded]]:
        """Label, score and probabilities per text or text pair."""
        predictor = self.require("classify")
        check_inputs([(x,) if isinstance(x, str) else x for x in inputs], self.config)
        encoded = await asyncio.to_thread(predictor.encode_texts, inputs)
        outputs = await self._run(encoded, route)
        return [predictor.classification(o) for o in outputs], encoded

    async def answer(
        self, pairs: list[tuple[str, str]], null_threshold: float | None, route: str
    ) -> list[dict]:
        """The best answer span per (question, context) pair; long contexts are read in windows."""
        predictor = self.require("qa")
        check_inputs(pairs, self.config)
        # One batcher input per window: windows of every request share the batches.
        windows = await asyncio.to_thread(predictor.encode_qa, pairs)
        if len(windows) > self.config.max_queue:
            raise ServeError(
                f"the contexts make {len(windows)} windows of {predictor.max_tokens} tokens; "
                f"the limit is {self.config.max_queue} per request (the queue size)",
                Kind.INPUT_TOO_LONG,
            )
        outputs = await self._run(windows, route, n_inputs=len(pairs))
        return predictor.answers(pairs, windows, outputs, null_threshold=null_threshold)

    async def _run(self, encoded: list[Encoded], route: str, n_inputs: int | None = None) -> list:
        outputs = await self.run(encoded, self.config.request_timeout_s)
        self.metrics.inputs.labels(route).inc(len(encoded) if n_inputs is None else n_inputs)
        return outputs


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
            cfg = self.config
            seconds = predictor.prepare(cfg.max_batch_size, warmup=cfg.warmup)
            if cfg.warmup:
                log.info("warm-up took %.2f s", seconds)
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
                    "ready: %s on %s (%s), %d sparse Linear layers, compiled: %s",
                    info.architecture,
                    info.device,
                    info.dtype,
                    len(info.sparse_layers),
                    info.compile_mode or "no",
                )
        except Exception as exc:  # noqa: BLE001 - reported through /health and on_failure
            log.exception("loading the model failed")
            self.state = "failed"
            if self._on_failure is not None:
                self._on_failure(exc)

    async def run(self, encoded: list[Encoded], timeout: float) -> list:
        if self.batcher is None:
            raise ServeError("the model is still loading", Kind.UNAVAILABLE)
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
