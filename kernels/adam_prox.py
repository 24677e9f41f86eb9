"""Fused RPP optimizer step: AdamW (or LAMB) update + reweighted proximal thresholding + mask.

Part 1 (`*_ref`) is the readable statement of the maths in docs/design.md. It is the PyTorch fallback
(compiled with torch.compile on the CPU) and the oracle the Triton kernel is tested against, so
the two cannot drift apart.

Part 2 (`_adam_prox_kernel`) reads p, g, m, v (and alpha, or the frozen mask) once and writes p,
m, v (and alpha on reweight steps) once. Variants are constexpr flags (MODE, REWEIGHT, TRUST).

Multi-tensor scheme: offset tables. A BERT has ~200 parameter tensors; one launch per tensor
would cost ~200 launches a step. Instead each launch takes, per kind of tensor (p, g, m, v, alpha),
the first tensor as a base pointer and an int64 table of every tensor's element offset from it,
plus a per-program work table (tensor index, first element or first tile), built once per set of
parameters and cached (`AdamProxPlan`). Offsets rather than raw addresses, so the compiler still
knows the alignment and vectorises the loads. Tensors are left where they are: a flat buffer would be
one pointer, but would force every parameter to be a view into it. Limits: all tensors of a launch
share hyperparameters and step count (the optimizer groups them so), and the tables must be
rebuilt when a parameter is reallocated (the plan is keyed on data pointers).

Tiles: in tiled mode a program owns NT whole tiles of one tile-row (a [BH, NT, BW] block), so the
tile norms, the scaling and the reweighting happen in the same pass as the Adam update.

LAMB (`lamb=True`): the update of each tensor is scaled by its trust ratio ||p|| / ||r||, which
needs the whole tensor before any element can be written, so it takes two passes over memory.
Pass 1 (`_lamb_norms_kernel`, the same multi-tensor tables) reads p, g, m, v and writes per-program
partial sums of p^2 and r^2; `_lamb_trust_kernel` adds each tensor's partials in a fixed order
(reproducible, no atomics) into its ratio; pass 2 is `_adam_prox_kernel` with TRUST, recomputing
the moments rather than storing them in pass 1 (which would save nothing: pass 2 would still read g
to know which elements to skip). Bytes per element with fp32 gradients: 16 + 28 = 44, against
AdamW's 28 (1.57x); plus alpha or the mask in the pruned modes, as for AdamW.
"""

import math

import torch

from rpp_triton.kernels._compat import tl, triton
from rpp_triton.kernels.adam_prox_plan import (
    _TL_DTYPES,
    _TRUST_BLOCK,
    MODE_ADAMW,
    MODE_FROZEN,
    MODE_SOFT,
    MODE_TILES,
    AdamProxPlan,
    _offset_table,
    _plan_key,
    _set_aligned,
    make_plan,
)
from rpp_triton.tiles import Block, tile_rms, tiles_4d


def prox_ref(z: torch.Tensor, tau: torch.Tensor, block: Block) -> torch.Tensor:
    """Proximal operator of tau * sqrt(|B|) * ||z_B||_2 per tile: z_B * max(0, 1 - tau_B / rms(z_B)).

    For 1x1 tiles this is the soft threshold sign(z) * max(|z| - tau, 0). Tiles with rms 0 stay 0.
    `tau` has one entry per tile ([out/bh, in/bw]; z's shape for 1x1).
    """
    if block == (1, 1):
        return z.sign() * (z.abs() - tau).clamp_min(0)
    rms = tile_rms(z, block)
    scale = torch.where(rms > 0, (1 - tau / rms).clamp_min(0), torch.zeros_like(rms))
    return (tiles_4d(z, block) * scale[:, None, :, None]).view_as(z)


def reweight_ref(p: torch.Tensor, block: Block, reweight_eps: float) -> torch.Tensor:
    """alpha_B = 1 / (rms(p_B) + reweight_eps): small tiles get a larger penalty next time."""
    return 1.0 / (tile_rms(p, block) + reweight_eps)


def adam_scalars(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's bias corrections folded into two scalars, computed on the host once per step:
    step_size = lr / (1 - beta1**t) and inv_sqrt_bias2 = 1 / sqrt(1 - beta2**t)."""
    return lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)


def adam_moments_ref(g, m, v, *, beta1, beta2):
    """Adam's moments after gradient g, in fp32: (m, v), new tensors."""
    g = g.float()
    return beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g


def adamw_ref(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias2, trust=1.0):
    """One AdamW update in fp32; returns (z, m, v) without touching the inputs.

    z = p - lr * trust * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p) with m_hat = m / (1 -
    beta1**t), v_hat = v / (1 - beta2**t), written with `adam_scalars` so each element costs one sqrt
    and one division (three divisions made the CPU step compute-bound). `trust` is 1 for AdamW and
    `lamb_trust_ref` for LAMB."""
    step_size, lr = step_size * trust, lr * trust
    m, v = adam_moments_ref(g, m, v, beta1=beta1, beta2=beta2)
    z = p - step_size * m / (v.sqrt() * inv_sqrt_bias2 + eps) - (lr * weight_decay) * p
    return z, m, v


def lamb_trust_ref(p, g, m, v, *, beta1, beta2, eps, weight_decay, inv_bias1, inv_sqrt_bias2):
    """LAMB's trust ratio for one tensor, a 0-d fp32 tensor (no host sync): ||p|| / ||r|| where both
    norms are > 0, else 1, with r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p from the moments
    after g (`inv_bias1` = 1 / (1 - beta1**t)). Elements whose gradient is NaN or Inf skip the update,
    so they count as r = 0."""
    m, v = adam_moments_ref(g, m, v, beta1=beta1, beta2=beta2)
    r = inv_bias1 * m / (v.sqrt() * inv_sqrt_bias2 + eps) + weight_decay * p
    r = torch.where(g.isfinite(), r, 0.0)
    p_norm, r_norm = torch.linalg.vector_norm(p.float()), torch.linalg.vector_norm(r)
    return torch.where((p_norm > 0) & (r_norm > 0), p_norm / r_norm, 1.0)


def adamw_step_ref(
    p,
    g,
    m,
    v,
    alpha=None,
    *,
    step_size,
    inv_sqrt_bias2,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    lamb=False,
    inv_bias1=1.0,
    soft_tau=None,
    reweight_eps=1e-3,
    reweight=False,
):
    """In place: p <- z (or soft_threshold(z, soft_tau * alpha) for 1x1 pruning), m, v <- moments.
    With `lamb`, z is LAMB's update: AdamW's scaled by `lamb_trust_ref` (`inv_bias1` = 1 / (1 -
    beta1**t)).

    Elements whose gradient is NaN or Inf are left as they were (p, m, v, alpha) and counted;
    the count comes back as a 0-d int64 tensor (no host sync).
    """
    moments = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    trust = 1.0
    if lamb:
        trust = lamb_trust_ref(p, g, m, v, **moments, inv_bias1=inv_bias1, inv_sqrt_bias2=inv_sqrt_bias2)
    z, m_new, v_new = adamw_ref(
        p, g, m, v, lr=lr, step_size=step_size, inv_sqrt_bias2=inv_sqrt_bias2, trust=trust, **moments
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
    pt = tiles_4d(p, block)
    rms = tile_rms(p, block)
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
    step_size: float,
    inv_sqrt_bias2: float,
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
    lamb: bool = False,
    inv_bias1: float = 1.0,
) -> torch.Tensor:
    """One RPP step for one parameter, in place on p, m, v (and alpha on reweight steps).

    `step_size, inv_sqrt_bias2 = adam_scalars(lr, beta1, beta2, t)` with t the parameter's step count.
    z = AdamW(p), or with `lamb` LAMB's update (`inv_bias1` = 1 / (1 - beta1**t));  not pruned:
    p = z;  frozen: p = z * mask;  otherwise p = prox(z, lr * rpp_lambda * alpha) per tile and, on
    reweight steps, alpha = 1 / (rms(p_B) + reweight_eps). Elements with a NaN or Inf gradient
    skip the Adam update (their z is the old p); returns how many, as a 0-d int64 tensor.
    """
    adam = dict(
        step_size=step_size,
        inv_sqrt_bias2=inv_sqrt_bias2,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        lamb=lamb,
        inv_bias1=inv_bias1,
    )
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


# ---- part 2: the Triton kernel ------------------------------------------------------------------

# What the kernel does after the Adam update (a compile-time choice: one kernel, four variants).


@triton.jit
def _per_tensor(tab_ptr, t, ALIGNED: tl.constexpr):
    """Tensor t's entry of a per-tensor table (offsets, columns): a multiple of 4 when ALIGNED."""
    off = tl.load(tab_ptr + t)
    if ALIGNED:
        off = tl.multiple_of(off, 4)
    return off


@triton.jit
def _element_range(work_start_ptr, numel_ptr, pid, t, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """The BLOCK elements of tensor t that program pid owns, and which of them exist."""
    start = tl.load(work_start_ptr + pid)
    numel = tl.load(numel_ptr + t)
    if ALIGNED:
        start = tl.multiple_of(start, 4)  # an element index, a multiple of BLOCK
        # With numel a multiple of 16 the bounds mask is constant over 16 elements, so the
        # masked loads still vectorise (an unknown numel cost ~2x in the 1x1 mode on an H100).
        numel = tl.multiple_of(numel, 16)
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _adam_moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, inb, beta1, beta2):
    """Load p, g, m, v; return p, the old and new moments, and where g is finite."""
    p = tl.load(p_ptr + offs, mask=inb, other=0.0)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=inb, other=0.0)
    v = tl.load(v_ptr + offs, mask=inb, other=0.0)
    m_new = beta1 * m + (1 - beta1) * g
    v_new = beta2 * v + (1 - beta2) * g * g
    ok = (g == g) & (tl.abs(g) != float("inf"))
    return p, m, v, m_new, v_new, ok


@triton.jit
def _lamb_norms_kernel(
    p_base_ptr,
    g_base_ptr,
    m_base_ptr,
    v_base_ptr,
    p_tab_ptr,
    g_tab_ptr,
    m_tab_ptr,
    v_tab_ptr,
    numel_ptr,
    work_tensor_ptr,
    work_start_ptr,
    p_sq_ptr,  # per program: sum of p^2 over its elements
    r_sq_ptr,  # per program: sum of r^2
    beta1,
    beta2,
    eps,
    weight_decay,
    inv_bias1,
    inv_sqrt_bias2,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """LAMB pass 1: partial sums of p^2 and r^2, r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p."""
    pid = tl.program_id(0)
    t = tl.load(work_tensor_ptr + pid)
    offs, inb = _element_range(work_start_ptr, numel_ptr, pid, t, BLOCK, ALIGNED)
    p, _, _, m_new, v_new, ok = _adam_moments(
        p_base_ptr + _per_tensor(p_tab_ptr, t, ALIGNED),
        g_base_ptr + _per_tensor(g_tab_ptr, t, ALIGNED),
        m_base_ptr + _per_tensor(m_tab_ptr, t, ALIGNED),
        v_base_ptr + _per_tensor(v_tab_ptr, t, ALIGNED),
        offs,
        inb,
        beta1,
        beta2,
    )
    r = inv_bias1 * m_new / (tl.sqrt(v_new) * inv_sqrt_bias2 + eps) + weight_decay * p
    r = tl.where(ok, r, 0.0)  # out of bounds, p = g = m = v = 0 and so r = 0
    tl.store(p_sq_ptr + pid, tl.sum(p * p))
    tl.store(r_sq_ptr + pid, tl.sum(r * r))


@triton.jit
def _lamb_trust_kernel(p_sq_ptr, r_sq_ptr, first_ptr, trust_ptr, BLOCK: tl.constexpr):
    """Tensor t's trust ratio ||p|| / ||r|| (1 unless both > 0) from its programs' partial sums,
    in a fixed order, so a step is reproducible bit for bit."""
    t = tl.program_id(0)
    lo = tl.load(first_ptr + t)
    hi = tl.load(first_ptr + t + 1)
    p_acc = tl.zeros([BLOCK], dtype=tl.float32)
    r_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        i = start + tl.arange(0, BLOCK)
        p_acc += tl.load(p_sq_ptr + i, mask=i < hi, other=0.0)
        r_acc += tl.load(r_sq_ptr + i, mask=i < hi, other=0.0)
    p_norm = tl.sqrt(tl.sum(p_acc))
    r_norm = tl.sqrt(tl.sum(r_acc))
    both = (p_norm > 0) & (r_norm > 0)
    tl.store(trust_ptr + t, tl.where(both, p_norm / tl.where(both, r_norm, 1.0), 1.0))


@triton.jit
def _adam_prox_kernel(
    p_base_ptr,  # the first tensor of each kind; the others are reached by element offsets from it
    g_base_ptr,
    m_base_ptr,
    v_base_ptr,
    aux_base_ptr,  # alpha (MODE_SOFT, MODE_TILES) or the uint8 mask (MODE_FROZEN)
    p_tab_ptr,  # per tensor: element offset of its data from the base above
    g_tab_ptr,
    m_tab_ptr,
    v_tab_ptr,
    aux_tab_ptr,
    bad_tab_ptr,  # per tensor: address of an int64 counter of skipped non-finite gradient elements
    numel_ptr,
    cols_ptr,
    work_tensor_ptr,
    work_start_ptr,
    nnz_ptr,  # per program: non-zeros written (pruned modes)
    trust_ptr,  # per tensor: LAMB's trust ratio (TRUST)
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step_size,
    inv_sqrt_bias2,
    tau,
    reweight_eps,
    MODE: tl.constexpr,
    ALIGNED: tl.constexpr,
    REWEIGHT: tl.constexpr,
    TRUST: tl.constexpr,
    BLOCK: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    NT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(work_tensor_ptr + pid)
    # Offsets from base pointers, not addresses loaded from memory: the compiler knows the bases are
    # 16-byte aligned and, with ALIGNED (checked on the host), that the offsets keep them so, and
    # then issues 128-bit loads. Pointers cast from loaded integers ran at ~40% of copy bandwidth.
    p_ptr = p_base_ptr + _per_tensor(p_tab_ptr, t, ALIGNED)
    g_ptr = g_base_ptr + _per_tensor(g_tab_ptr, t, ALIGNED)
    m_ptr = m_base_ptr + _per_tensor(m_tab_ptr, t, ALIGNED)
    v_ptr = v_base_ptr + _per_tensor(v_tab_ptr, t, ALIGNED)
    aux_ptr = aux_base_ptr + _per_tensor(aux_tab_ptr, t, ALIGNED)

    if MODE == MODE_TILES:
        # work_start is a tile index (row-major over [rows / TILE_H, cols / TILE_W]); NT tiles of a tile-row.
        start = tl.load(work_start_ptr + pid)
        cols = _per_tensor(cols_ptr, t, ALIGNED)
        n_tile_cols = cols // TILE_W
        tile_row = start // n_tile_cols
        tile_col = start % n_tile_cols + tl.arange(0, NT)
        r = tl.arange(0, BH)
        c = tl.arange(0, BW)
        offs = (
            (tile_row * TILE_H + r)[:, None, None] * cols
            + (tile_col * TILE_W)[None, :, None]
            + c[None, None, :]
        )
        inb = (
            (r < TILE_H)[:, None, None]
            & (tile_col < n_tile_cols)[None, :, None]
            & (c < TILE_W)[None, None, :]
        )
    else:
        offs, inb = _element_range(work_start_ptr, numel_ptr, pid, t, BLOCK, ALIGNED)

    p, m, v, m_new, v_new, ok = _adam_moments(p_ptr, g_ptr, m_ptr, v_ptr, offs, inb, beta1, beta2)
    if TRUST:
        trust = tl.load(trust_ptr + t)
        step_size = step_size * trust
        lr = lr * trust
    z = p - step_size * m_new / (tl.sqrt(v_new) * inv_sqrt_bias2 + eps) - (lr * weight_decay) * p
    # NaN or Inf in g: keep the element as it was (z = p, moments unchanged) and count it.
    z = tl.where(ok, z, p)
    m_new = tl.where(ok, m_new, m)
    v_new = tl.where(ok, v_new, v)
    n_bad = tl.sum((inb & ~ok).to(tl.int64))
    if n_bad > 0:
        bad_ptr = tl.load(bad_tab_ptr + t).to(tl.pointer_type(tl.int64))
        tl.atomic_add(bad_ptr, n_bad)

    if MODE == MODE_FROZEN:
        keep = tl.load(aux_ptr + offs, mask=inb, other=0)
        z = tl.where(keep != 0, z, 0.0)
    if MODE == MODE_SOFT:
        alpha = tl.load(aux_ptr + offs, mask=inb, other=1.0)
        shrunk = tl.maximum(tl.abs(z) - tau * alpha, 0.0)
        prox = tl.where(z < 0, -shrunk, shrunk)
        if REWEIGHT:
            tl.store(aux_ptr + offs, tl.where(ok, 1.0 / (shrunk + reweight_eps), alpha), mask=inb)
        z = tl.where(ok, prox, p)
    if MODE == MODE_TILES:
        tile_ok = tile_col < n_tile_cols
        alpha = tl.load(aux_ptr + tile_row * n_tile_cols + tile_col, mask=tile_ok, other=1.0)
        sumsq = tl.sum(tl.sum(z * z, axis=2), axis=0)
        rms = tl.sqrt(sumsq / (TILE_H * TILE_W))
        scale = tl.where(rms > 0, tl.maximum(1 - tau * alpha / tl.where(rms > 0, rms, 1.0), 0.0), 0.0)
        z = z * scale[None, :, None]
        if REWEIGHT:
            # rms(p_B) = scale_B * rms(z_B): no second pass over the tile.
            tl.store(
                aux_ptr + tile_row * n_tile_cols + tile_col,
                1.0 / (scale * rms + reweight_eps),
                mask=tile_ok,
            )

    tl.store(p_ptr + offs, z, mask=inb)
    tl.store(m_ptr + offs, m_new, mask=inb)
    tl.store(v_ptr + offs, v_new, mask=inb)
    if MODE != MODE_ADAMW:
        tl.store(nnz_ptr + pid, tl.sum((inb & (z != 0)).to(tl.int32)))


# ---- part 3: the launcher -----------------------------------------------------------------------


def adam_prox(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    auxes,
    counters,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step_size: float,
    inv_sqrt_bias2: float,
    rpp_lambda: float = 0.0,
    reweight_eps: float = 1e-3,
    mode: int = MODE_ADAMW,
    block: Block = (1, 1),
    reweight: bool = False,
    lamb: bool = False,
    inv_bias1: float | None = None,
    plan: AdamProxPlan | None = None,
    elements_per_program: int | None = None,
    num_warps: int = 8,
) -> AdamProxPlan:
    """One fused RPP step over many tensors in one launch (per gradient dtype), in place.

    z = p - lr * trust * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), with trust = 1, or with
    `lamb` LAMB's per-tensor ratio (`lamb_trust_ref`; needs `inv_bias1` = 1 / (1 - beta1**t)),
    computed by two more launches before the update. Then by `mode`:
    MODE_ADAMW p = z; MODE_FROZEN p = z * mask (`auxes` are uint8/bool masks); MODE_SOFT p =
    soft_threshold(z, lr * rpp_lambda * alpha) elementwise; MODE_TILES p_B = z_B * max(0, 1 - tau_B
    / rms(z_B)) per tile of `block`. On `reweight`, alpha = 1 / (rms(p_B) + reweight_eps).
    Elements with a non-finite gradient are skipped and counted in `counters` (int64, per tensor).
    Returns the plan (pass it back next step: its tables are rebuilt only if a weight or state
    moved, and only the gradient addresses if a gradient did); `plan.nnz` holds the non-zeros
    written by each program. Tuning (bench/sweep_adam_prox.py): `elements_per_program` (default 2048
    for tiles, 1024 elementwise) and `num_warps` (GPU only; the interpreter runs one).
    """
    if not params:
        raise ValueError("adam_prox needs at least one tensor")
    n = len(params)
    for name, ts in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if len(ts) != n:
            raise ValueError(f"adam_prox: {n} params but {len(ts)} {name}")
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        if p.dtype != torch.float32 or m.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError("adam_prox: params and moments must be float32")
        if g.dtype not in _TL_DTYPES:
            raise ValueError(f"adam_prox: gradient dtype {g.dtype} is not float32, bfloat16 or float16")
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()):
            raise ValueError("adam_prox: tensors must be contiguous")
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"adam_prox: shape mismatch for a parameter of shape {tuple(p.shape)}")
    if len({g.dtype for g in grads}) != 1:
        raise ValueError("adam_prox: one launch takes one gradient dtype")
    if lamb and inv_bias1 is None:
        raise ValueError("adam_prox: lamb=True needs inv_bias1 = 1 / (1 - beta1**t)")
    options = (mode, block, elements_per_program, lamb)
    key = _plan_key(params, grads, exp_avgs, exp_avg_sqs, auxes, counters, *options)
    if plan is None or plan.key != key:
        plan = make_plan(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            auxes,
            counters,
            mode=mode,
            block=block,
            elements_per_program=elements_per_program,
            lamb=lamb,
        )
    grad_key = tuple(g.data_ptr() for g in grads)
    if grad_key != plan.grad_key:
        # zero_grad(set_to_none=True) may hand out new gradient buffers: refresh their offsets only.
        plan.tables["g"] = _offset_table(grads, params[0].device)
        plan.grad_key = grad_key
        _set_aligned(plan, (params, grads, exp_avgs, exp_avg_sqs, auxes), params)
    tb = plan.tables
    warps = num_warps if params[0].is_cuda else 1
    trust = params[0]  # a placeholder pointer: without `lamb` the kernel never reads it
    if lamb:
        norms = plan.lamb
        p_sq, r_sq = norms["sums"]
        _lamb_norms_kernel[(len(norms["work_tensor"]),)](
            params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], tb["p"], tb["g"], tb["m"], tb["v"],
            tb["numel"], norms["work_tensor"], norms["work_start"], p_sq, r_sq, beta1, beta2, eps,
            weight_decay, inv_bias1, inv_sqrt_bias2, num_warps=warps, **norms["meta"],
        )  # fmt: skip
        trust = norms["trust"]
        _lamb_trust_kernel[(n,)](p_sq, r_sq, norms["first"], trust, BLOCK=_TRUST_BLOCK, num_warps=warps)
    first_aux = next((a for a in auxes if a is not None), params[0])
    _adam_prox_kernel[(plan.n_programs,)](
        params[0],
        grads[0],
        exp_avgs[0],
        exp_avg_sqs[0],
        first_aux,
        tb["p"],
        tb["g"],
        tb["m"],
        tb["v"],
        tb["aux"],
        tb["bad"],
        tb["numel"],
        tb["cols"],
        tb["work_tensor"],
        tb["work_start"],
        plan.nnz,
        trust,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        step_size,
        inv_sqrt_bias2,
        lr * rpp_lambda,
        reweight_eps,
        MODE=mode,
        REWEIGHT=bool(reweight),
        TRUST=bool(lamb),
        num_warps=warps,
        **plan.meta,
    )
    return plan
