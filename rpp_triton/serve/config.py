"""Options of the inference server as typed, frozen dataclasses, each checked when it is built.

`rpp-triton serve` turns its flags into these and makes one call (`server.serve`); a library user
builds them directly. Each field's default is the flag's default. Checks here need no model, so a
bad option is refused before anything loads; a ValueError names the field.

Only the standard library is imported at module level: the command line reads the defaults from
here for `--help`.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "triton", "torch")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def check_number(owner, name: str, low: float, *, above: bool = False, integer: bool = False) -> None:
    """`owner.name` must be a finite number >= `low` (> `low` with `above`), an int with `integer`;
    None is allowed for optional fields."""
    value = getattr(owner, name)
    if value is None:
        return
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and (value > low if above else value >= low)):
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"{name} must be {what} {'>' if above else '>='} {low:g}, got {value!r}")


def check_buckets(owner, name: str, low: int) -> None:
    """`owner.name`, when set, becomes a sorted tuple of distinct integers >= `low` (at least one)."""
    value = getattr(owner, name)
    if value is None:
        return
    items = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not items or not all(isinstance(b, int) and not isinstance(b, bool) and b >= low for b in items):
        raise ValueError(f"{name} must be one or more integers >= {low}, got {value!r}")
    object.__setattr__(owner, name, tuple(sorted(set(items))))


def check_choice(owner, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Limits per request, batching and timeouts of the HTTP API (one machine and Ray alike)."""

    max_inputs: int = 64  # inputs per request (a text pair or a question + context is one input)
    max_chars: int = 20_000  # characters per text
    max_body_bytes: int = 1_000_000  # request body
    max_batch_size: int = 32  # sequences per forward
    max_batch_tokens: int = 16_384  # padded tokens per forward (sequences x longest)
    max_wait_ms: float = 5.0  # how long a batch waits for more requests
    max_queue: int = 1024  # inputs waiting for a batch
    request_timeout_s: float = 30.0  # from the body read to the answer; then 503
    read_timeout_s: float = 10.0  # for a client to send a request's headers, and again its body
    max_header_bytes: int = 16_384  # request line and headers
    warmup: bool = True

    def __post_init__(self):
        for name in ("max_inputs", "max_chars", "max_body_bytes", "max_batch_size", "max_batch_tokens"):
            check_number(self, name, 1, integer=True)
        check_number(self, "max_queue", 1, integer=True)
        check_number(self, "max_wait_ms", 0)
        check_number(self, "request_timeout_s", 0, above=True)
        check_number(self, "read_timeout_s", 0, above=True)
        check_number(self, "max_header_bytes", 1024, integer=True)
        if self.max_inputs > self.max_queue:
            raise ValueError(f"max_inputs ({self.max_inputs}) cannot exceed max_queue ({self.max_queue})")


@dataclass(frozen=True)
class LoadConfig:
    """How the model directory is loaded and run: device, precision, which layers run block-sparse,
    compilation with the shapes batches are padded to, and the tokenization limits."""

    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"
    sparse: bool = True
    block_size: int | tuple[int, int] | None = None  # None: the model's rpp_report.json, else 32
    min_sparsity: float = 0.5  # tile sparsity from which a Linear layer runs block-sparse
    backend: str = "auto"
    max_tokens: int | None = None  # None: the model's positions
    truncate: bool = True  # over-long inputs: truncate, or refuse with 413
    threads: int | None = None  # torch CPU threads; None: torch's choice
    doc_stride: int | None = None  # question-answering window overlap; None: max_tokens // 3
    choose_layers: bool = True  # at warm-up a layer stays block-sparse only where that measures faster
    compile: bool | None = None  # torch.compile, CUDA graphs on a GPU; None: on for CUDA, off on CPU
    # Batches are padded up to the smallest bucket that holds them (the limits, max batch size and
    # max tokens, are always buckets). None: 1, 8 and 32, 64, 128 with compile, no padding without.
    batch_buckets: tuple[int, ...] | None = None
    length_buckets: tuple[int, ...] | None = None

    def __post_init__(self):
        check_choice(self, "dtype", DTYPES)
        check_choice(self, "backend", BACKENDS)
        check_number(self, "min_sparsity", 0)
        if self.min_sparsity is None or self.min_sparsity > 1:
            raise ValueError(f"min_sparsity must be in [0, 1], got {self.min_sparsity!r}")
        check_number(self, "max_tokens", 2, integer=True)
        check_number(self, "threads", 1, integer=True)
        check_number(self, "doc_stride", 0, integer=True)
        check_buckets(self, "batch_buckets", 1)
        check_buckets(self, "length_buckets", 2)
        if self.block_size is not None:
            from rpp_triton.tiles import as_block

            object.__setattr__(self, "block_size", as_block(self.block_size))
        self._check_device()

    def _check_device(self) -> None:
        """The device exists here, and backend="triton" can run on it."""
        import torch

        from rpp_triton.backend import resolve

        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}") from None
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
            if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
                raise ValueError(
                    f"device {self.device!r}: this machine has {torch.cuda.device_count()} CUDA devices"
                )
        if self.sparse:
            try:
                resolve(self.backend, device)
            except RuntimeError as exc:
                raise ValueError(f"backend: {exc}") from None


@dataclass(frozen=True)
class HttpConfig:
    """The single-machine HTTP server (uvicorn): address and the limits on connections."""

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    max_connections: int = 256  # open connections plus running requests; past it uvicorn answers 503
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this

    def __post_init__(self):
        check_choice(self, "log_level", LOG_LEVELS)
        check_number(self, "port", 1, integer=True)
        if self.port > 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        check_number(self, "max_connections", 1, integer=True)
        check_number(self, "keep_alive_s", 0, above=True)


@dataclass(frozen=True)
class RayConfig:
    """Serving as a Ray Serve deployment."""

    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    address: str | None = None  # an existing cluster; None starts a local one

    def __post_init__(self):
        check_number(self, "replicas", 1, integer=True)
        check_number(self, "replica_cpus", 0)
        check_number(self, "replica_gpus", 0)
