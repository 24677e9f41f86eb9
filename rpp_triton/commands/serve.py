"""`rpp-triton serve MODEL_DIR`: flags -> the typed configs of `rpp_triton.serve.config` -> one call
of `rpp_triton.serve.server.serve`. Defaults come from the configs, so `--help` shows the real ones."""

import argparse

from rpp_triton.errors import UsageError
from rpp_triton.serve.config import (
    BACKENDS,
    DTYPES,
    LOG_LEVELS,
    HttpConfig,
    LoadConfig,
    RayConfig,
    ServerConfig,
)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where the help says what an unset flag means."""

    def _get_help_string(self, action):
        unset = action.default is None or action.default is False
        return action.help if unset else super()._get_help_string(action)


def _integers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a (pruned) model over HTTP: embeddings, task heads, health, metrics",
        description=(
            "Load MODEL_DIR (a save_pretrained directory with its tokenizer), swap its sparse Linear "
            "layers for block-sparse ones, keep those faster than dense, compile on a GPU, warm it up "
            "and serve POST /v1/embed, /v1/embeddings "
            "(OpenAI), /embed (text-embeddings-inference), /v1/classify or /v1/qa when the model has "
            "that head, GET /health, /info, /metrics and /docs. Every limit below answers a 4xx."
        ),
        formatter_class=_Help,
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model directory (e.g. the output of prune/finetune)"
    )
    h = p.add_argument_group("http")
    h.add_argument("--host", default=HttpConfig.host, help="address to listen on (0.0.0.0: every interface)")
    h.add_argument("--port", type=int, default=HttpConfig.port, help="port to listen on")
    h.add_argument("--log-level", default=HttpConfig.log_level, choices=LOG_LEVELS, help="log verbosity")
    h.add_argument(
        "--max-connections",
        type=int,
        default=HttpConfig.max_connections,
        help="open connections (and running requests) before answering 503",
    )
    h.add_argument(
        "--read-timeout",
        type=float,
        default=ServerConfig.read_timeout_s,
        help="seconds a client has to send a request's headers (then the connection is closed), "
        "and again its body (then 408)",
    )
    h.add_argument(
        "--keep-alive",
        type=float,
        default=HttpConfig.keep_alive_s,
        help="seconds an idle keep-alive connection stays open",
    )
    h.add_argument(
        "--max-header-bytes",
        type=int,
        default=ServerConfig.max_header_bytes,
        help="size of a request's line and headers (then 431)",
    )

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
        default=LoadConfig.min_sparsity,
        help="only Linear layers with at least this tile sparsity become block-sparse",
    )
    m.add_argument(
        "--backend",
        default=LoadConfig.backend,
        choices=BACKENDS,
        help="block-sparse matmul: Triton on CUDA (auto), Triton anywhere (needs TRITON_INTERPRET=1 "
        "without a GPU) or PyTorch",
    )
    m.add_argument("--device", default=LoadConfig.device, help="auto, cpu, cuda, cuda:1, ...")
    m.add_argument(
        "--dtype", default=LoadConfig.dtype, choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU"
    )
    m.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    m.add_argument(
        "--choose-layers",
        action=argparse.BooleanOptionalAction,
        default=LoadConfig.choose_layers,
        help="at warm-up, time each block-sparse layer against dense on a representative batch (max "
        "batch size x 128 tokens on a GPU, 8 x 64 on a CPU) and keep it block-sparse only where that "
        "is faster (GET /info shows the times)",
    )
    m.add_argument(
        "--no-warmup",
        action="store_true",
        help="report ready without a warm-up forward (layers are not chosen, CUDA graphs are "
        "captured by the first requests)",
    )

    c = p.add_argument_group("compile")
    c.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=LoadConfig.compile,
        help="torch.compile the model, with CUDA graphs captured per bucket at warm-up on a GPU "
        "(default: on for CUDA, off on CPU)",
    )
    c.add_argument(
        "--batch-buckets",
        type=_integers,
        default=None,
        help="batch sizes each batch is padded up to, e.g. 1,8 (the max batch size is always one; "
        "default with --compile: 1,8; without it and without buckets, batches are not padded)",
    )
    c.add_argument(
        "--length-buckets",
        type=_integers,
        default=None,
        help="token lengths each batch is padded up to, e.g. 32,64,128 (max tokens is always one; "
        "default with --compile: 32,64,128)",
    )

    lim = p.add_argument_group("limits")
    lim.add_argument("--max-inputs", type=int, default=ServerConfig.max_inputs, help="inputs per request")
    lim.add_argument("--max-chars", type=int, default=ServerConfig.max_chars, help="characters per text")
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
    lim.add_argument(
        "--max-body-bytes", type=int, default=ServerConfig.max_body_bytes, help="request body size"
    )
    lim.add_argument(
        "--timeout",
        type=float,
        default=ServerConfig.request_timeout_s,
        help="per-request timeout in seconds (then 503)",
    )

    b = p.add_argument_group("batching")
    b.add_argument(
        "--max-batch-size", type=int, default=ServerConfig.max_batch_size, help="sequences per model forward"
    )
    b.add_argument(
        "--max-batch-tokens",
        type=int,
        default=ServerConfig.max_batch_tokens,
        help="padded tokens per model forward",
    )
    b.add_argument(
        "--max-wait-ms", type=float, default=ServerConfig.max_wait_ms, help="how long a batch waits to fill"
    )
    b.add_argument(
        "--max-queue", type=int, default=ServerConfig.max_queue, help="queued inputs before answering 429"
    )

    r = p.add_argument_group("ray serve")
    r.add_argument(
        "--ray", action="store_true", help="serve as a Ray Serve deployment (pip install '.[ray]')"
    )
    r.add_argument("--replicas", type=int, default=RayConfig.replicas, help="Ray Serve replicas")
    r.add_argument(
        "--replica-cpus", type=float, default=RayConfig.replica_cpus, help="CPUs reserved per replica"
    )
    r.add_argument(
        "--replica-gpus", type=float, default=RayConfig.replica_gpus, help="GPUs reserved per replica"
    )
    r.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.set_defaults(func=run)


def configs(args) -> tuple[LoadConfig, ServerConfig, HttpConfig, RayConfig | None]:
    """The typed configs of parsed flags; a UsageError (one line) for any value they refuse."""
    try:
        load = LoadConfig(
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
            choose_layers=args.choose_layers,
            compile=args.compile,
            batch_buckets=args.batch_buckets,
            length_buckets=args.length_buckets,
        )
        server = ServerConfig(
            max_inputs=args.max_inputs,
            max_chars=args.max_chars,
            max_body_bytes=args.max_body_bytes,
            max_batch_size=args.max_batch_size,
            max_batch_tokens=args.max_batch_tokens,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            request_timeout_s=args.timeout,
            read_timeout_s=args.read_timeout,
            max_header_bytes=args.max_header_bytes,
            warmup=not args.no_warmup,
        )
        http = HttpConfig(
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            max_connections=args.max_connections,
            keep_alive_s=args.keep_alive,
        )
        ray = None
        if args.ray:
            ray = RayConfig(
                replicas=args.replicas,
                replica_cpus=args.replica_cpus,
                replica_gpus=args.replica_gpus,
                address=args.ray_address,
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return load, server, http, ray


def run(args) -> int:
    from rpp_triton.serve.server import serve

    return serve(args.model_dir, *configs(args))
