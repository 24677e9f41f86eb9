"""One RPP optimizer step against AdamW, on BERT-sized parameter sets.

    python -m pytest bench/bench_adam_prox.py -q --benchmark-json=bench/results/adam_prox_cpu.json

Groups (one per device x parameter set x tile), candidates side by side with their baselines:
- `adamw_fused`: torch.optim.AdamW(fused=True) alone (the baseline of every group);
- `adamw_foreach`: torch.optim.AdamW(foreach=True);
- `adamw_fused+torch_prox` (GPU): fused AdamW followed by the PyTorch prox/reweight ops, unfused;
- `rpp_torch`: RPPAdamW(backend="torch") (compiled on the CPU; compilation is outside the timing);
- `rpp_triton` (GPU): RPPAdamW(backend="triton"), the fused kernel.
The GPU cases also time a device-to-device copy of the same bytes, so the fused step's GB/s reads
as a fraction of the card's measured copy bandwidth. Bytes per element counted: read p, g, m, v
(+ alpha for 1x1 tiles) and write p, m, v: 28 (32 with elementwise alpha).
"""

import os

import pytest
import torch

import rpp_triton as rpp
from rpp_triton.tiles import tiles_4d

HAS_CUDA = torch.cuda.is_available()
# One thread by default: with 2 OpenMP threads on a 2-core machine that anything else is using, a
# thread that loses its core stalls the other at every barrier (fused AdamW went from 42 to 580 ms).
CPU_THREADS = int(os.environ.get("RPP_BENCH_CPU_THREADS", "1"))


def bert_shapes(layers: int, hidden: int, ffn: int) -> list[tuple[int, int]]:
    """The pruned tensors of a BERT encoder: per layer q, k, v, out [h, h], ffn in [4h, h], out [h, 4h]."""
    return [s for _ in range(layers) for s in [(hidden, hidden)] * 4 + [(ffn, hidden), (hidden, ffn)]]


SETS = {
    "bert-base": bert_shapes(12, 768, 3072),  # 85M weights
    "bert-large": bert_shapes(24, 1024, 4096),  # 302M weights
}
CPU_CASES = [("bert-base", 1), ("bert-base", 32)]
GPU_CASES = [("bert-base", 1), ("bert-base", 32), ("bert-large", 1), ("bert-large", 32)]
CPU_IMPLS = ["adamw_fused", "adamw_foreach", "rpp_torch"]
GPU_IMPLS = ["adamw_fused", "adamw_fused+torch_prox", "rpp_torch", "rpp_triton", "copy"]


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def make_params(shapes, device):
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen) * 0.02)
        p.grad = torch.randn(s, device=device, generator=gen) * 1e-3
        params.append(p)
    return params


def torch_prox(params, alphas, tau, block, reweight_eps=1e-3):
    """The unfused composition: after AdamW, the reweighted prox and reweighting in PyTorch ops."""
    with torch.no_grad():
        if block == (1, 1):
            thresholds = torch._foreach_mul(alphas, tau)
            shrunk = torch._foreach_sub(torch._foreach_abs(params), thresholds)
            torch._foreach_clamp_min_(shrunk, 0.0)
            signs = torch._foreach_sign(params)
            new = torch._foreach_mul(shrunk, signs)
            torch._foreach_copy_(params, new)
            torch._foreach_add_(shrunk, reweight_eps)
            torch._foreach_reciprocal_(shrunk)
            torch._foreach_copy_(alphas, shrunk)
            return
        for p, alpha in zip(params, alphas):
            pt = tiles_4d(p, block)
            rms = pt.square().mean(dim=(1, 3)).sqrt()
            scale = torch.where(rms > 0, (1 - tau * alpha / rms).clamp_min(0), torch.zeros_like(rms))
            pt.mul_(scale[:, None, :, None])
            alpha.copy_(1.0 / (scale * rms + reweight_eps))


def make_step(impl, params, tile, device):
    block = (tile, tile)
    lr, lam = 1e-4, 1e-2
    if impl == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True).step
    if impl == "adamw_foreach":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True).step
    if impl == "adamw_fused+torch_prox":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        alphas = [
            torch.ones(p.shape if tile == 1 else (p.shape[0] // tile, p.shape[1] // tile), device=device)
            for p in params
        ]

        def step():
            opt.step()
            torch_prox([p.data for p in params], alphas, lr * lam, block)

        return step
    if impl == "copy":
        src = [p.grad for p in params]
        dst = [torch.empty_like(p) for p in params]
        return lambda: torch._foreach_copy_(dst, src)
    backend = {"rpp_torch": "torch", "rpp_triton": "triton"}[impl]
    opt = rpp.RPPAdamW(params, lr=lr, rpp_lambda=lam, block_size=tile, reweight_every=1, backend=backend)
    return opt.step


def step_bytes(impl, numel, tile):
    if impl == "copy":
        return 8 * numel  # read + write fp32
    if impl.startswith("rpp") and tile == 1:
        return 32 * numel
    return 28 * numel


def run_case(benchmark, device, set_name, tile, impl, rounds):
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    params = make_params(SETS[set_name], device)
    step = make_step(impl, params, tile, device)
    for _ in range(2):  # compile and warm up outside the timing
        step()
    if device == "cuda":
        torch.cuda.synchronize()

        def timed():
            step()
            torch.cuda.synchronize()
    else:
        timed = step
    benchmark.group = f"{device} rpp step {set_name} tile={tile} fp32"
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
    numel = sum(p.numel() for p in params)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        impl=impl,
        baseline=impl == "adamw_fused",
        shape=f"{len(params)} tensors, {numel / 1e6:.1f}M fp32 weights",
        dtype="float32",
        tile=[tile, tile],
        device=device_name(device),
        gbps=step_bytes(impl, numel, tile) / seconds / 1e9,
    )


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-tile{c[1]}")
def test_cpu_step(benchmark, case, impl):
    run_case(benchmark, "cpu", *case, impl, rounds=5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-tile{c[1]}")
def test_cuda_step(benchmark, case, impl):
    if impl == "rpp_torch" and case[0] != "bert-base":
        pytest.skip("the compiled PyTorch path is timed on bert-base only (compile time)")
    run_case(benchmark, "cuda", *case, impl, rounds=20)
    torch.cuda.empty_cache()
