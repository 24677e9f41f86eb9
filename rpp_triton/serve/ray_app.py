"""The inference server as a Ray Serve deployment, for serving past one machine.

Same predictor, same FastAPI routes, limits and error answers as the single-machine server
(`app.build_app`); only the batching differs: Ray's `serve.batch` groups the concurrent calls of
one replica, and each group is cut to the token budget before it runs in a worker thread. Ray
routes requests over `replicas` copies of the model, answers 503 once a replica's queue is full
(`max_queued_requests`), and restarts replicas whose `check_health` fails.

    rpp-triton serve MODEL_DIR --ray --replicas 2      # local Ray, or --ray-address for a cluster

Each replica is its own process, so `/metrics` shows the replica that answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

from ray import serve

from rpp_triton.serve.app import build_app
from rpp_triton.serve.batching import RequestTimeout, split_by_budget
from rpp_triton.serve.config import HttpConfig, LoadConfig, RayConfig, ServerConfig, is_loopback
from rpp_triton.serve.predictor import Encoded, Predictor, SequenceOutput
from rpp_triton.serve.service import Service

log = logging.getLogger("rpp_triton.serve")

APP_NAME = "rpp_triton"
# This replica's service (one replica per process). Ray ships the deployment class by value, so its
# methods reach this through an import, never through their own copy of the module's globals.
_service: RayService | None = None


def _get_service() -> RayService | None:
    return _service


class RayService(Service):
    """Routes' view of a replica: each input is one call of the replica's `serve.batch` method."""

    def __init__(self, config: ServerConfig, run_one):
        super().__init__(config)
        self._run_one = run_one

    async def run(self, encoded: list, timeout: float) -> list:
        try:
            return await asyncio.wait_for(asyncio.gather(*(self._run_one(e) for e in encoded)), timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"the request was not served within {timeout:g} s") from None


@serve.deployment(name="RPPPredictor", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(build_app(_get_service))
class RPPDeployment:
    def __init__(self, model_dir: str, load: LoadConfig, cfg: ServerConfig):
        from rpp_triton.serve import ray_app

        self.service = ray_app._service = RayService(cfg, self._forward)
        self._forward.set_max_batch_size(cfg.max_batch_size)
        self._forward.set_batch_wait_timeout_s(cfg.max_wait_ms / 1000)
        self.predictor = Predictor.from_pretrained(model_dir, load)
        self.predictor.prepare(cfg.max_batch_size, warmup=cfg.warmup)
        self.service.set_ready(self.predictor)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _forward(self, batch: list[Encoded]) -> list[SequenceOutput]:
        cfg, metrics = self.service.config, self.service.metrics
        outputs, start = [], 0
        for n in split_by_budget([len(e) for e in batch], cfg.max_batch_size, cfg.max_batch_tokens):
            chunk = batch[start : start + n]
            start += n
            began = time.perf_counter()
            outputs += await asyncio.to_thread(self.predictor.forward, chunk)
            metrics.observe_batch(n, n * max(len(e) for e in chunk), time.perf_counter() - began)
        return outputs

    def check_health(self):
        if self.service.state != "ready":
            raise RuntimeError("the model is not loaded")


def build_application(model_dir: str, load: LoadConfig, config: ServerConfig, ray: RayConfig):
    """A bound Ray Serve application: `serve.run(build_application(...), route_prefix="/")`."""
    return RPPDeployment.options(
        num_replicas=ray.replicas,
        ray_actor_options={"num_cpus": ray.replica_cpus, "num_gpus": ray.replica_gpus},
        # Enough concurrent requests per replica for full batches; past the queue Ray answers 503.
        max_ongoing_requests=max(2 * config.max_batch_size, 8),
        max_queued_requests=config.max_queue,
        graceful_shutdown_timeout_s=config.request_timeout_s,
    ).bind(model_dir, load, config)


# Ray Serve gives its HTTP proxy 5 s to report ready; on a busy machine (a 2-core host training
# at the same time) it missed that three times in a row and `serve.start` failed. 30 s, unless set.
PATIENT_PROXY = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
}


def serve_forever(
    model_dir: str, load: LoadConfig, config: ServerConfig, http: HttpConfig, ray: RayConfig
) -> int:
    """Start (or join) Ray, deploy, and block until Ctrl-C or SIGTERM; then shut Serve down."""
    import ray as ray_core

    options = {}
    if ray.address is None and http.host not in ("0.0.0.0", "::"):
        # A local Ray listens where the server does (on loopback, with server.serve's setting).
        node = "127.0.0.1" if is_loopback(http.host) else http.host
        options = dict(_node_ip_address=node, dashboard_host=node)
    for name, value in PATIENT_PROXY.items():  # a local Ray's workers inherit these; set ones win
        os.environ.setdefault(name, value)
    ray_core.init(address=ray.address, include_dashboard=False, ignore_reinit_error=True, **options)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    try:
        serve.start(
            http_options={"host": http.host, "port": http.port, "keep_alive_timeout_s": http.keep_alive_s}
        )
        serve.run(build_application(model_dir, load, config, ray), name=APP_NAME, route_prefix="/")
        print(
            f"serving {model_dir} on http://{http.host}:{http.port} "
            f"with {ray.replicas} Ray Serve replica(s); Ctrl-C stops"
        )
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray_core.shutdown()
    return 0
