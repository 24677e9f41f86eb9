"""Sweep the fused step's work per program and warps on the GPU (BERT-base weights, fp32).

    python bench/sweep_adam_prox.py

Prints the step time and GB/s for each (elements per program, num_warps), 1x1 and 32x32 tiles,
beside torch.optim.AdamW(fused=True) and a device copy of the same bytes, all in one process. The
kernel is launched through `adam_prox` with its tuning arguments, the way the optimizer calls it.
"""

import torch

from rpp_triton.kernels import adam_prox as k


def timed(fn, reps=30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def fused_step(params, tile: int, **tuning):
    """One RPP step (reweighting on) over `params` as a closure, reusing the launcher's plan."""
    mode = k.MODE_SOFT if tile == 1 else k.MODE_TILES
    device = params[0].device
    alphas = [torch.ones(p.shape if tile == 1 else (p.shape[0] // tile, p.shape[1] // tile), device=device)
              for p in params]  # fmt: skip
    state = dict(
        m=[torch.zeros_like(p) for p in params],
        v=[torch.zeros_like(p) for p in params],
        counters=[torch.zeros((), dtype=torch.int64, device=device) for _ in params],
        plan=None,
    )
    step_size, inv_sqrt_bias2 = k.adam_scalars(1e-4, 0.9, 0.999, 10)

    def step():
        state["plan"] = k.adam_prox(
            params, [p.grad for p in params], state["m"], state["v"], alphas, state["counters"],
            lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step_size=step_size,
            inv_sqrt_bias2=inv_sqrt_bias2, rpp_lambda=1e-2, mode=mode, block=(tile, tile),
            reweight=True, plan=state["plan"], **tuning,
        )  # fmt: skip

    return step


def main() -> None:
    if not torch.cuda.is_available():
        print("sweep_adam_prox: needs a CUDA device; skipped")
        return
    shapes = [s for _ in range(12) for s in [(768, 768)] * 4 + [(3072, 768), (768, 3072)]]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    copy_dst = [torch.empty_like(p) for p in params]
    grads = [p.grad for p in params]
    t_copy = timed(lambda: torch._foreach_copy_(copy_dst, grads))
    t_adamw = timed(torch.optim.AdamW(params, lr=1e-4, fused=True).step)
    print(
        f"copy {t_copy * 1e3:.3f} ms {8 * numel / t_copy / 1e9:.0f} GB/s; adamw_fused {t_adamw * 1e3:.3f} ms"
    )
    for tile in (1, 32):
        for elements in (1024, 2048, 4096):
            for warps in (4, 8):
                t = timed(fused_step(params, tile, elements_per_program=elements, num_warps=warps))
                gbytes = (32 if tile == 1 else 28) * numel / 1e9
                print(
                    f"tile={tile:>2} elements={elements:>5} warps={warps}: {t * 1e3:.3f} ms "
                    f"{gbytes / t:.0f} GB/s  {t / t_adamw:.2f}x adamw_fused"
                )


if __name__ == "__main__":
    main()
