"""One RPP optimizer step (RPPAdamW, RPPLamb) against AdamW, on BERT-sized parameter sets.

    python -m pytest bench/bench_adam_prox.py -q --benchmark-json=bench/results/adam_prox_cpu.json

Groups (one per device x parameter set x tile), candidates side by side with their baselines:
- `adamw_fused`: torch.optim.AdamW(fused=True) alone (the baseline of every group);
- `adamw_foreach`: torch.optim.AdamW(foreach=True);
- `adamw_fused+torch_prox` (GPU): fused AdamW followed by the PyTorch prox/reweight ops, unfused;
- `lamb_torch_ops+torch_prox`: LAMB written as plain PyTorch (foreach) ops, then the same prox ops;
- `rpp_torch`, `rpp_lamb_torch`: RPPAdamW / RPPLamb(backend="torch") (compiled on the CPU;
  compilation is outside the timing);
- `rpp_triton`, `rpp_lamb_triton` (GPU): the fused kernels.
The GPU cases also time a device-to-device copy of the same bytes, so the fused step's GB/s reads
as a fraction of the card's measured copy bandwidth. Bytes per element counted: read p, g, m, v
(+ alpha for 1x1 tiles) and write p, m, v: 28 (32 with elementwise alpha); LAMB's norm pass reads
p, g, m, v once more: 44 (48).
"""

import pytest
import torch
from _common import ENCODER_SHAPES as SETS
from _common import cpu_threads, device_name, median_seconds, record

import rpp_triton as rpp
from rpp_triton.tiles import tiles_4d

HAS_CUDA = torch.cuda.is_available()
CPU_CASES = [("bert-base", 1), ("bert-base", 32)]
GPU_CASES = [("bert-base", 1), ("bert-base", 32), ("bert-large", 1), ("bert-large", 32)]
CPU_IMPLS = ["adamw_fused", "adamw_foreach", "rpp_torch", "lamb_torch_ops+torch_prox", "rpp_lamb_torch"]
GPU_IMPLS = [
    "adamw_fused",
    "adamw_fused+torch_prox",
    "rpp_torch",
    "rpp_triton",
    "lamb_torch_ops+torch_prox",
    "rpp_lamb_triton",
    "copy",
]
OPTIMIZERS = {"rpp": rpp.RPPAdamW, "rpp_lamb": rpp.RPPLamb}


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


def lamb_torch_ops(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """LAMB as plain PyTorch (foreach) ops, the way a user would write it: a step function."""
    beta1, beta2 = betas
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    steps = [0]

    @torch.no_grad()
    def step():
        steps[0] += 1
        t = steps[0]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        denom = torch._foreach_div(vs, 1 - beta2**t)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        r = torch._foreach_div(ms, denom)
        torch._foreach_div_(r, 1 - beta1**t)
        torch._foreach_add_(r, params, alpha=weight_decay)
        p_norms, r_norms = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(r))
        trust = torch.where((p_norms > 0) & (r_norms > 0), p_norms / r_norms, 1.0)
        torch._foreach_mul_(r, list((-lr * trust).unbind()))
        torch._foreach_add_(params, r)

    return step


def make_step(impl, params, tile, device):
    block = (tile, tile)
    lr, lam = 1e-4, 1e-2
    if impl == "adamw_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True).step
    if impl == "adamw_foreach":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True).step
    if impl in ("adamw_fused+torch_prox", "lamb_torch_ops+torch_prox"):
        update = (
            torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True).step
            if impl.startswith("adamw")
            else lamb_torch_ops(params, lr)
        )
        alphas = [
            torch.ones(p.shape if tile == 1 else (p.shape[0] // tile, p.shape[1] // tile), device=device)
            for p in params
        ]

        def step():
            update()
            torch_prox([p.data for p in params], alphas, lr * lam, block)

        return step
    if impl == "copy":
        src = [p.grad for p in params]
        dst = [torch.empty_like(p) for p in params]
        return lambda: torch._foreach_copy_(dst, src)
    name, backend = impl.rsplit("_", 1)
    opt = OPTIMIZERS[name](params, lr=lr, rpp_lambda=lam, block_size=tile, reweight_every=1, backend=backend)
    return opt.step


def step_bytes(impl, numel, tile):
    if impl == "copy":
        return 8 * numel  # read + write fp32
    alpha = 4 if impl.startswith("rpp") and tile == 1 else 0
    norms = 16 if "lamb" in impl else 0
    return (28 + alpha + norms) * numel


def run_case(benchmark, device, set_name, tile, impl, rounds):
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
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
    info = dict(
        impl=impl,
        baseline=impl == "adamw_fused",
        shape=f"{len(params)} tensors, {numel / 1e6:.1f}M fp32 weights",
        dtype="float32",
        tile=[tile, tile],
        device=device_name(device),
    )
    record(
        benchmark, median_seconds(benchmark), info, per_second={"gbps": step_bytes(impl, numel, tile) / 1e9}
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
