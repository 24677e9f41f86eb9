"""What the benchmarks share: BERT encoder shapes, names for the machine and device, the thread
count on the CPU, random tile pruning, and a benchmark's median that survives `--benchmark-disable`.

Benchmarks and scripts in bench/ import it as `_common` (pytest and `python bench/x.py` both put
bench/ on the path).
"""

from __future__ import annotations

import datetime
import os
import platform

import torch
from torch import nn

# (layers, hidden, ffn) of the two BERT encoders.
BERT = {"bert-base": (12, 768, 3072), "bert-large": (24, 1024, 4096)}
# BERT-base's distinct linear layers, (out_features, in_features).
BERT_BASE_LINEARS = {"ffn_in": (3072, 768), "ffn_out": (768, 3072), "attn": (768, 768)}
BERT_BASE_TOKENS = 8192  # a batch of 64 sequences of 128 tokens


def bert_shapes(layers: int, hidden: int, ffn: int) -> list[tuple[int, int]]:
    """The pruned weights of a BERT encoder: per layer q, k, v, out [h, h], ffn in [ffn, h], out [h, ffn]."""
    return [s for _ in range(layers) for s in [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]]


ENCODER_SHAPES = {name: bert_shapes(*dims) for name, dims in BERT.items()}  # 85M and 302M weights


def cpu_threads() -> int:
    """Torch threads for CPU benchmarks: `RPP_BENCH_CPU_THREADS`, default 1. Two OpenMP threads on a
    shared 2-core machine stall each other at every barrier (fused AdamW went from 42 to 580 ms)."""
    return int(os.environ.get("RPP_BENCH_CPU_THREADS", "1"))


def device_name(device) -> str:
    """The GPU's name, or the CPU with its torch thread count."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"


def machine_info() -> dict:
    """Date, machine and library versions, recorded beside results."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
    }


@torch.no_grad()
def zero_tiles_(weight: torch.Tensor, sparsity: float, tile: int, generator=None) -> torch.Tensor:
    """Zero exactly round(sparsity * tiles) of `weight`'s tile x tile tiles, chosen at random; in place."""
    rows, cols = weight.shape[0] // tile, weight.shape[1] // tile
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols, generator=generator)[: round(sparsity * rows * cols)]] = False
    mask = keep.view(rows, cols).repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    return weight.mul_(mask.to(device=weight.device, dtype=weight.dtype))


def pruned_linear(out_f, in_f, sparsity, tile, dtype=torch.float32, device="cpu") -> nn.Linear:
    """A random `nn.Linear` (no gradients) with `sparsity` of its tiles zero."""
    linear = nn.Linear(in_f, out_f).to(device=device, dtype=dtype).requires_grad_(False)
    zero_tiles_(linear.weight, sparsity, tile)
    return linear


def pruned_bert(sparsity: float, tile: int, dtype=torch.float32, device="cpu", config=None) -> nn.Module:
    """A random BERT encoder (BERT-base unless `config`), no pooler, eval mode, with `sparsity` of the
    tiles of every encoder linear weight zero."""
    import transformers

    model = transformers.BertModel(config or transformers.BertConfig(), add_pooling_layer=False)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for module in model.encoder.modules():
        if isinstance(module, nn.Linear):
            zero_tiles_(module.weight, sparsity, tile)
    return model


def median_seconds(benchmark) -> float | None:
    """The median of a finished pytest-benchmark run; None when timing is off (`--benchmark-disable`)."""
    stats = benchmark.stats
    return stats.stats.median if stats is not None else None


def record(benchmark, seconds: float | None, info: dict, per_second: dict | None = None) -> None:
    """Store `info` in the benchmark's extra_info, and each `per_second` amount divided by `seconds`
    (a rate) unless timing was off."""
    benchmark.extra_info.update(info)
    if seconds is not None:
        benchmark.extra_info.update({k: v / seconds for k, v in (per_second or {}).items()})
