"""Fused RPP optimizer step: AdamW update + reweighted proximal thresholding + mask, one pass.

Part 1 (`*_ref`) is the readable statement of the maths in DESIGN.md. It is the PyTorch fallback
(compiled into one loop per tensor with torch.compile on the CPU) and the oracle the Triton kernel
is tested against, so the two cannot drift apart.
"""

import torch

Block = tuple[int, int]


def as_block(block_size) -> Block:
    """Normalise an int or (bh, bw) pair to a (bh, bw) tuple of positive ints."""
    if isinstance(block_size, int):
        block = (block_size, block_size)
    else:
        block = tuple(block_size)
    if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block):
        raise ValueError(f"block_size must be a positive int or a (bh, bw) pair, got {block_size!r}")
    return block


def tiles_ref(x: torch.Tensor, block: Block) -> torch.Tensor:
    """View a 2-D `x[out, in]` as `[out/bh, bh, in/bw, bw]` so tile reductions are over dims (1, 3)."""
    bh, bw = block
    return x.view(x.shape[0] // bh, bh, x.shape[1] // bw, bw)


def tile_rms_ref(x: torch.Tensor, block: Block) -> torch.Tensor:
    """rms(x_B) = sqrt(mean(x_B ** 2)) per tile, shape [out/bh, in/bw]; |x| for 1x1 tiles."""
    if block == (1, 1):
        return x.abs()
    return tiles_ref(x, block).square().mean(dim=(1, 3)).sqrt()


def expand_tiles(t: torch.Tensor, block: Block) -> torch.Tensor:
    """Broadcast a per-tile `[R, C]` tensor back to the element shape `[R*bh, C*bw]`."""
    if block == (1, 1):
        return t
    return t.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)


def prox_ref(z: torch.Tensor, tau: torch.Tensor, block: Block) -> torch.Tensor:
    """Proximal operator of tau * sqrt(|B|) * ||z_B||_2 per tile: z_B * max(0, 1 - tau_B / rms(z_B)).

    For 1x1 tiles this is the soft threshold sign(z) * max(|z| - tau, 0). Tiles with rms 0 stay 0.
    `tau` has one entry per tile ([out/bh, in/bw]; z's shape for 1x1).
    """
    if block == (1, 1):
        return z.sign() * (z.abs() - tau).clamp_min(0)
    rms = tile_rms_ref(z, block)
    scale = torch.where(rms > 0, (1 - tau / rms).clamp_min(0), torch.zeros_like(rms))
    return (tiles_ref(z, block) * scale[:, None, :, None]).view_as(z)


def reweight_ref(p: torch.Tensor, block: Block, reweight_eps: float) -> torch.Tensor:
    """alpha_B = 1 / (rms(p_B) + reweight_eps): small tiles get a larger penalty next time."""
    return 1.0 / (tile_rms_ref(p, block) + reweight_eps)


def tile_mask_ref(p: torch.Tensor, block: Block) -> torch.Tensor:
    """Bool mask of p's shape: True where p's tile holds any non-zero element."""
    if block == (1, 1) or p.dim() != 2:
        return p != 0
    kept = tiles_ref(p != 0, block).any(dim=3).any(dim=1)
    return expand_tiles(kept, block)


def bias_corrections(beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's (1 - beta1**t, 1 - beta2**t), computed on the host once per tensor and step."""
    return 1.0 - beta1**step, 1.0 - beta2**step


def adamw_ref(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, bias1, bias2):
    """One AdamW update in fp32; returns (z, m, v) without touching the inputs.
    `bias1, bias2 = bias_corrections(beta1, beta2, t)`."""
    g = g.float()
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    z = p - lr * ((m / bias1) / ((v / bias2).sqrt() + eps) + weight_decay * p)
    return z, m, v


def adamw_step_ref(
    p,
    g,
    m,
    v,
    alpha=None,
    *,
    bias1,
    bias2,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    soft_tau=None,
    reweight_eps=1e-3,
    reweight=False,
):
    """In place: p <- z (or soft_threshold(z, soft_tau * alpha) for 1x1 pruning), m, v <- moments.

    Elements whose gradient is NaN or Inf are left as they were (p, m, v, alpha) and counted;
    the count comes back as a 0-d int64 tensor (no host sync).
    """
    z, m_new, v_new = adamw_ref(
        p,
        g,
        m,
        v,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        bias1=bias1,
        bias2=bias2,
    )
    bad = g.isfinite().logical_not()
    if soft_tau is not None:
        z = prox_ref(z, soft_tau * alpha, (1, 1))
        if reweight:
            alpha.copy_(torch.where(bad, alpha, reweight_ref(z, (1, 1), reweight_eps)))
    p.copy_(torch.where(bad, p, z))
    m.copy_(torch.where(bad, m, m_new))
    v.copy_(torch.where(bad, v, v_new))
    return bad.sum()


def tile_prox_step_ref(p, alpha, *, tau, block: Block, reweight_eps=1e-3, reweight=False):
    """In place on a 2-D p after the Adam update: p_B <- p_B * max(0, 1 - tau * alpha_B / rms(p_B)),
    then on reweight steps alpha_B <- 1 / (rms(p_B) + reweight_eps).

    rms of the result is scale_B * rms(z_B) (scale_B >= 0), so reweighting needs no second pass.
    """
    pt = tiles_ref(p, block)
    rms = pt.square().mean(dim=(1, 3)).sqrt()
    scale = torch.where(rms > 0, (1 - tau * alpha / rms).clamp_min(0), torch.zeros_like(rms))
    pt.mul_(scale[:, None, :, None])
    if reweight:
        alpha.copy_(1.0 / (scale * rms + reweight_eps))


def rpp_step_ref(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    bias1: float,
    bias2: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rpp_lambda: float = 0.0,
    reweight_eps: float = 1e-3,
    block: Block = (1, 1),
    prune: bool = True,
    frozen: bool = False,
    reweight: bool = False,
) -> torch.Tensor:
    """One RPP step for one parameter, in place on p, m, v (and alpha on reweight steps).

    `bias1, bias2 = bias_corrections(beta1, beta2, t)` with t the parameter's step count.
    z = AdamW(p);  not pruned: p = z;  frozen: p = z * mask;  otherwise p = prox(z, lr *
    rpp_lambda * alpha) per tile and, on reweight steps, alpha = 1 / (rms(p_B) + reweight_eps).
    Elements with a NaN or Inf gradient skip the Adam update (their z is the old p); returns how
    many, as a 0-d int64 tensor.
    """
    adam = dict(bias1=bias1, bias2=bias2, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    pruning = prune and not frozen
    if pruning and block == (1, 1):
        return adamw_step_ref(
            p, g, m, v, alpha, **adam, soft_tau=lr * rpp_lambda, reweight_eps=reweight_eps, reweight=reweight
        )
    skipped = adamw_step_ref(p, g, m, v, **adam)
    if prune and frozen:
        p.mul_(mask)
    elif pruning:
        tile_prox_step_ref(
            p, alpha, tau=lr * rpp_lambda, block=block, reweight_eps=reweight_eps, reweight=reweight
        )
    return skipped
