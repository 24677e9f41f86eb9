"""Sweep the fused step's work per program and warps on the GPU (BERT-base weights, fp32).

    python bench/sweep_adam_prox.py

Prints the step time and GB/s for each (elements per program, num_warps), 1x1 and 32x32 tiles,
beside torch.optim.AdamW(fused=True) and a device copy of the same bytes, all in one process.
"""

import torch

import rpp_triton as rpp
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
                k.ELEMENTS_PER_PROGRAM = k.ELEMENTWISE_ELEMENTS_PER_PROGRAM = elements
                k.GPU_NUM_WARPS = warps
                opt = rpp.RPPAdamW(params, lr=1e-4, rpp_lambda=1e-2, block_size=tile, reweight_every=1)
                t = timed(opt.step)
                gbytes = (32 if tile == 1 else 28) * numel / 1e9
                print(
                    f"tile={tile:>2} elements={elements:>5} warps={warps}: {t * 1e3:.3f} ms "
                    f"{gbytes / t:.0f} GB/s  {t / t_adamw:.2f}x adamw_fused"
                )


if __name__ == "__main__":
    main()
