"""Fused RPP optimizer step: AdamW update + reweighted proximal thresholding + mask, one pass.

Part 1 (`*_ref`) is the readable statement of the maths in docs/design.md. It is the PyTorch fallback
(compiled with torch.compile on the CPU) and the oracle the Triton kernel is tested against, so
the two cannot drift apart.

Part 2 (`_adam_prox_kernel`) reads p, g, m, v (and alpha, or the frozen mask) once and writes p,
m, v (and alpha on reweight steps) once. Variants are constexpr flags (MODE, REWEIGHT).

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
"""

import math
from dataclasses import dataclass

import torch

from rpp_triton.kernels._compat import tl, triton
from rpp_triton.tiles import Block, tile_mask, tile_rms, tiles_4d


def tile_rms_ref(x: torch.Tensor, block: Block) -> torch.Tensor:
    """rms(x_B) = sqrt(mean(x_B ** 2)) per tile, shape [out/bh, in/bw]; |x| for 1x1 tiles."""
    return tile_rms(x, block)


def prox_ref(z: torch.Tensor, tau: torch.Tensor, block: Block) -> torch.Tensor:
    """Proximal operator of tau * sqrt(|B|) * ||z_B||_2 per tile: z_B * max(0, 1 - tau_B / rms(z_B)).

    For 1x1 tiles this is the soft threshold sign(z) * max(|z| - tau, 0). Tiles with rms 0 stay 0.
    `tau` has one entry per tile ([out/bh, in/bw]; z's shape for 1x1).
    """
    if block == (1, 1):
        return z.sign() * (z.abs() - tau).clamp_min(0)
    rms = tile_rms_ref(z, block)
    scale = torch.where(rms > 0, (1 - tau / rms).clamp_min(0), torch.zeros_like(rms))
    return (tiles_4d(z, block) * scale[:, None, :, None]).view_as(z)


def reweight_ref(p: torch.Tensor, block: Block, reweight_eps: float) -> torch.Tensor:
    """alpha_B = 1 / (rms(p_B) + reweight_eps): small tiles get a larger penalty next time."""
    return 1.0 / (tile_rms_ref(p, block) + reweight_eps)


def tile_mask_ref(p: torch.Tensor, block: Block) -> torch.Tensor:
    """Bool mask of p's shape: True where p's tile holds any non-zero element."""
    return tile_mask(p, block)


def adam_scalars(lr: float, beta1: float, beta2: float, step: int) -> tuple[float, float]:
    """Adam's bias corrections folded into two scalars, computed on the host once per step:
    step_size = lr / (1 - beta1**t) and inv_sqrt_bias2 = 1 / sqrt(1 - beta2**t)."""
    return lr / (1.0 - beta1**step), 1.0 / math.sqrt(1.0 - beta2**step)


def adamw_ref(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step_size, inv_sqrt_bias2):
    """One AdamW update in fp32; returns (z, m, v) without touching the inputs.

    z = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p) with m_hat = m / (1 - beta1**t),
    v_hat = v / (1 - beta2**t), written with `adam_scalars` so each element costs one sqrt and one
    division (three divisions made the CPU step compute-bound)."""
    g = g.float()
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    z = p - step_size * m / (v.sqrt() * inv_sqrt_bias2 + eps) - (lr * weight_decay) * p
    return z, m, v


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
        step_size=step_size,
        inv_sqrt_bias2=inv_sqrt_bias2,
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
    rms = tile_rms_ref(p, block)
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
) -> torch.Tensor:
    """One RPP step for one parameter, in place on p, m, v (and alpha on reweight steps).

    `step_size, inv_sqrt_bias2 = adam_scalars(lr, beta1, beta2, t)` with t the parameter's step count.
    z = AdamW(p);  not pruned: p = z;  frozen: p = z * mask;  otherwise p = prox(z, lr *
    rpp_lambda * alpha) per tile and, on reweight steps, alpha = 1 / (rms(p_B) + reweight_eps).
    Elements with a NaN or Inf gradient skip the Adam update (their z is the old p); returns how
    many, as a 0-d int64 tensor.
    """
    adam = dict(
        step_size=step_size,
        inv_sqrt_bias2=inv_sqrt_bias2,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
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
MODE_ADAMW: tl.constexpr = tl.constexpr(0)  # p = z
MODE_FROZEN: tl.constexpr = tl.constexpr(1)  # p = z * mask
MODE_SOFT: tl.constexpr = tl.constexpr(2)  # 1x1 tiles: soft threshold
MODE_TILES: tl.constexpr = tl.constexpr(3)  # group prox per tile


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

_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Work per program by default (bench/sweep_adam_prox.py measures choices). Measured on an H100 with
# BERT-base weights (fused AdamW 0.94 ms): tiles ran best with 2048 elements and 8 warps (0.85 ms),
# elementwise modes with 1024 and 8 (1.08 ms); 8192 elements spilled registers (4-15 ms).
_DEFAULT_ELEMENTS = {"tiles": 2048, "elementwise": 1024}


@dataclass
class AdamProxPlan:
    """Address and work tables for one set of tensors; valid while their data pointers are."""

    key: tuple
    mode: int
    block: Block
    tables: dict
    n_programs: int
    nnz: torch.Tensor  # per program, written by each launch (pruned modes)
    meta: dict
    grad_key: tuple  # gradient addresses in tables["g"]; gradients move more often than weights


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def make_plan(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    auxes,
    counters,
    *,
    mode: int,
    block: Block,
    elements_per_program: int | None = None,
) -> AdamProxPlan:
    """Build the pointer and work tables for `adam_prox` (host work, done once per tensor set)."""
    device = params[0].device
    key = _plan_key(params, grads, exp_avgs, exp_avg_sqs, auxes, counters, mode, block, elements_per_program)
    work_tensor, work_start = [], []
    if mode == MODE_TILES:
        bh, bw = block
        BH, BW = _pow2(bh), _pow2(bw)
        # NT whole tiles of one tile-row per program: ~elements_per_program elements, no wider than a row.
        widest = max(p.shape[1] // bw for p in params)
        elements = elements_per_program or _DEFAULT_ELEMENTS["tiles"]
        NT = min(max(1, elements // (BH * BW)), _pow2(widest))
        meta = dict(BLOCK=1, TILE_H=bh, TILE_W=bw, BH=BH, BW=BW, NT=NT)
        for i, p in enumerate(params):
            rows, cols = p.shape[0] // bh, p.shape[1] // bw
            for r in range(rows):
                for c in range(0, cols, NT):
                    work_tensor.append(i)
                    work_start.append(r * cols + c)
    else:
        block_elems = elements_per_program or _DEFAULT_ELEMENTS["elementwise"]
        meta = dict(BLOCK=block_elems, TILE_H=1, TILE_W=1, BH=1, BW=1, NT=1)
        for i, p in enumerate(params):
            for s in range(0, p.numel(), block_elems):
                work_tensor.append(i)
                work_start.append(s)

    tables = dict(
        p=_offset_table(params, device),
        g=_offset_table(grads, device),
        m=_offset_table(exp_avgs, device),
        v=_offset_table(exp_avg_sqs, device),
        aux=_offset_table(auxes, device),
        bad=_address_table(counters, device),
        numel=torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device),
        cols=torch.tensor([p.shape[-1] if p.dim() else 1 for p in params], dtype=torch.int64, device=device),
        work_tensor=torch.tensor(work_tensor, dtype=torch.int32, device=device),
        work_start=torch.tensor(work_start, dtype=torch.int64, device=device),
    )
    nnz = torch.zeros(len(work_tensor), dtype=torch.int32, device=device)
    grad_key = tuple(g.data_ptr() for g in grads)
    meta["ALIGNED"] = _aligned((params, grads, exp_avgs, exp_avg_sqs, auxes), params, mode)
    return AdamProxPlan(key, mode, block, tables, len(work_tensor), nnz, meta, grad_key)


def _plan_key(params, grads, exp_avgs, exp_avg_sqs, auxes, counters, mode, block, elements_per_program):
    ptrs = tuple(
        t.data_ptr() if t is not None else 0
        for ts in (params, exp_avgs, exp_avg_sqs, auxes, counters)
        for t in ts
    )
    return (mode, block, elements_per_program, tuple(g.dtype for g in grads), ptrs)


def _to_device(values: list[int], device) -> torch.Tensor:
    table = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _address_table(tensors, device) -> torch.Tensor:
    return _to_device([t.data_ptr() for t in tensors], device)


def _offset_table(tensors, device) -> torch.Tensor:
    """Element offsets of each tensor's data from the first one's (None -> 0, never read)."""
    present = [t for t in tensors if t is not None]
    if not present:
        return _to_device([0] * len(tensors), device)
    base, size = present[0].data_ptr(), present[0].element_size()
    offsets = []
    for t in tensors:
        if t is None:
            offsets.append(0)
            continue
        delta = t.data_ptr() - base
        if t.element_size() != size or delta % size:
            raise ValueError("adam_prox: tensors of one kind must share a dtype")
        offsets.append(delta // size)
    return _to_device(offsets, device)


def _aligned(tensor_lists, params, mode) -> bool:
    """True when every tensor starts on 16 bytes and rows (tiles) or sizes (elementwise) keep the
    loads aligned: then the kernel may promise the compiler 16-byte-aligned, vectorisable access."""
    ptrs_ok = all(t.data_ptr() % 16 == 0 for ts in tensor_lists for t in ts if t is not None)
    if mode == MODE_TILES:
        return ptrs_ok and all(p.shape[1] % 4 == 0 for p in params)
    return ptrs_ok and all(p.numel() % 16 == 0 for p in params)


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
    plan: AdamProxPlan | None = None,
    elements_per_program: int | None = None,
    num_warps: int = 8,
) -> AdamProxPlan:
    """One fused RPP step over many tensors in one launch (per gradient dtype), in place.

    z = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), then by `mode`:
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
    key = _plan_key(params, grads, exp_avgs, exp_avg_sqs, auxes, counters, mode, block, elements_per_program)
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
        )
    grad_key = tuple(g.data_ptr() for g in grads)
    if grad_key != plan.grad_key:
        # zero_grad(set_to_none=True) may hand out new gradient buffers: refresh their offsets only.
        plan.tables["g"] = _offset_table(grads, params[0].device)
        plan.grad_key = grad_key
        plan.meta["ALIGNED"] = _aligned((params, grads, exp_avgs, exp_avg_sqs, auxes), params, mode)
    tb = plan.tables
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
        num_warps=num_warps if params[0].is_cuda else 1,
        **plan.meta,
    )
    return plan
