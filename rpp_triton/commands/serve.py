"""`rpp-triton serve MODEL_DIR`: the inference server (uvicorn on one machine, or Ray Serve)."""

import argparse
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a (pruned) model over HTTP: embeddings, task heads, health, metrics",
        description=(
            "Load MODEL_DIR (a save_pretrained directory with its tokenizer), swap its sparse Linear "
            "layers for block-sparse ones, warm it up and serve POST /v1/embed (plus /v1/classify or "
            "/v1/qa when the model has that head), GET /health, GET /metrics and /docs."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model directory (e.g. the output of prune/finetune)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    m = p.add_argument_group("model")
    m.add_argument("--dense", action="store_true", help="serve the dense model (no block-sparse layers)")
    m.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tile size of the block-sparse layers (default: the model's rpp_report.json, else 32)",
    )
    m.add_argument(
        "--min-sparsity",
        type=float,
        default=0.5,
        help="only Linear layers with at least this tile sparsity become block-sparse",
    )
    m.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument("--no-warmup", action="store_true", help="report ready without a warm-up forward")

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    lim.add_argument("--max-chars", type=int, default=20_000, help="characters per input")
    lim.add_argument("--max-tokens", type=int, default=None, help="tokens per input (default: the model's)")
    lim.add_argument(
        "--on-long",
        choices=["truncate", "refuse"],
        default="truncate",
        help="what to do with inputs over --max-tokens: truncate them or answer 413 "
        "(question answering reads a long context in overlapping windows instead)",
    )
    lim.add_argument(
        "--doc-stride",
        type=int,
        default=None,
        help="tokens of overlap between the windows of a long question-answering context "
        "(default: max tokens // 3)",
    )
    lim.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size")
    lim.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (then 503)")

    b = p.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=int, default=32, help="sequences per model forward")
    b.add_argument("--max-batch-tokens", type=int, default=16_384, help="padded tokens per model forward")
    b.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    b.add_argument("--max-queue", type=int, default=1024, help="queued inputs before answering 429")

    r = p.add_argument_group("ray serve")
    r.add_argument(
        "--ray", action="store_true", help="serve as a Ray Serve deployment (pip install '.[ray]')"
    )
    r.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica")
    r.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.set_defaults(func=run)


def server_config(args):
    from rpp_triton.serve.app import ServerConfig

    return ServerConfig(
        max_inputs=args.max_inputs,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.timeout,
        warmup=not args.no_warmup,
    )


def load_options(args) -> dict:
    return dict(
        device=args.device,
        dtype=args.dtype,
        sparse=not args.dense,
        block_size=args.block_size,
        min_sparsity=args.min_sparsity,
        backend=args.backend,
        max_tokens=args.max_tokens,
        truncate=args.on_long == "truncate",
        threads=args.threads,
        doc_stride=args.doc_stride,
    )


def run(args) -> int:
    from rpp_triton.errors import UsageError

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise UsageError(f"{args.model_dir!r} is not a model directory (no config.json)")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    try:
        config = server_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.ray:
        return _run_ray(args, config)
    return _run_local(args, config)


def _run_local(args, config) -> int:
    import logging
    import threading

    import uvicorn

    from rpp_triton.serve.app import create_app
    from rpp_triton.serve.predictor import Predictor

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    options = load_options(args)
    failed = []

    def load():
        return Predictor.from_pretrained(args.model_dir, **options)

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

    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # In-flight requests finish within their own timeout; do not wait longer than that.
        timeout_graceful_shutdown=config.request_timeout_s + 5,
        timeout_keep_alive=5,
    )
    server = Server(uv_config)
    server.run()
    if failed:
        print(f"rpp-triton serve: error: the model failed to load: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _run_ray(args, config) -> int:
    from rpp_triton.errors import UsageError

    try:
        from rpp_triton.serve import ray_app
    except ImportError as exc:
        raise UsageError(f"--ray needs Ray Serve: pip install 'rpp_triton[ray]' ({exc})") from None
    return ray_app.serve_forever(
        args.model_dir,
        load_options(args),
        config,
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        address=args.ray_address,
    )
