"""The multi-tensor plan of the fused RPP step (kernels/adam_prox.py): per kind of tensor a base
pointer and an int64 table of every tensor's element offset from it, and a per-program work table
(tensor index, first element or first tile), built once per set of parameters and cached. LAMB's
norm pass gets its own work and partial-sum tables here too."""

import math
from dataclasses import dataclass

import torch

from rpp_triton.kernels._compat import tl
from rpp_triton.tiles import Block

# The step's modes, one kernel each way (compared by name in the kernel and the plan).
MODE_ADAMW: tl.constexpr = tl.constexpr(0)  # p = z
MODE_FROZEN: tl.constexpr = tl.constexpr(1)  # p = z * mask
MODE_SOFT: tl.constexpr = tl.constexpr(2)  # 1x1 tiles: soft threshold
MODE_TILES: tl.constexpr = tl.constexpr(3)  # group prox per tile

_TL_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Work per program by default (bench/sweep_adam_prox.py measures choices). Measured on an H100 with
# BERT-base weights (fused AdamW 0.94 ms): tiles ran best with 2048 elements and 8 warps (0.85 ms),
# elementwise modes with 1024 and 8 (1.08 ms); 8192 elements spilled registers (4-15 ms).
_DEFAULT_ELEMENTS = {"tiles": 2048, "elementwise": 1024}
_TRUST_BLOCK = 1024  # partial sums a LAMB trust program adds per iteration


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
    lamb: dict | None = None  # LAMB's pass 1: work tables, partial sums, trust ratios, meta


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n)))


def _element_work(params, elements: int) -> tuple[list, list, list]:
    """Programs of `elements` consecutive elements: tensor index, first element, and each tensor's
    first program (n + 1 entries)."""
    work_tensor, work_start, first = [], [], [0]
    for i, p in enumerate(params):
        for s in range(0, p.numel(), elements):
            work_tensor.append(i)
            work_start.append(s)
        first.append(len(work_tensor))
    return work_tensor, work_start, first


def _tile_work(params, block: Block, nt: int) -> tuple[list, list]:
    """Programs of `nt` whole tiles of one tile-row: tensor index and first tile (row-major)."""
    bh, bw = block
    work_tensor, work_start = [], []
    for i, p in enumerate(params):
        rows, cols = p.shape[0] // bh, p.shape[1] // bw
        for r in range(rows):
            for c in range(0, cols, nt):
                work_tensor.append(i)
                work_start.append(r * cols + c)
    return work_tensor, work_start


def _work_tables(work_tensor, work_start, device) -> dict:
    return dict(
        work_tensor=torch.tensor(work_tensor, dtype=torch.int32, device=device),
        work_start=torch.tensor(work_start, dtype=torch.int64, device=device),
    )


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
    lamb: bool = False,
) -> AdamProxPlan:
    """Build the pointer and work tables for `adam_prox` (host work, done once per tensor set)."""
    device = params[0].device
    key = _plan_key(
        params, grads, exp_avgs, exp_avg_sqs, auxes, counters, mode, block, elements_per_program, lamb
    )
    elements = elements_per_program or _DEFAULT_ELEMENTS["elementwise"]
    element_work = _element_work(params, elements)
    if mode == MODE_TILES:
        bh, bw = block
        BH, BW = _pow2(bh), _pow2(bw)
        # NT whole tiles of one tile-row per program: ~elements_per_program elements, no wider than a row.
        widest = max(p.shape[1] // bw for p in params)
        NT = min(max(1, (elements_per_program or _DEFAULT_ELEMENTS["tiles"]) // (BH * BW)), _pow2(widest))
        meta = dict(BLOCK=1, TILE_H=bh, TILE_W=bw, BH=BH, BW=BW, NT=NT)
        tables = _work_tables(*_tile_work(params, block, NT), device)
    else:
        meta = dict(BLOCK=elements, TILE_H=1, TILE_W=1, BH=1, BW=1, NT=1)
        tables = _work_tables(*element_work[:2], device)
    tables.update(
        p=_offset_table(params, device),
        g=_offset_table(grads, device),
        m=_offset_table(exp_avgs, device),
        v=_offset_table(exp_avg_sqs, device),
        aux=_offset_table(auxes, device),
        bad=_address_table(counters, device),
        numel=torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device),
        cols=torch.tensor([p.shape[-1] if p.dim() else 1 for p in params], dtype=torch.int64, device=device),
    )
    n_programs = len(tables["work_tensor"])
    nnz = torch.zeros(n_programs, dtype=torch.int32, device=device)
    grad_key = tuple(g.data_ptr() for g in grads)
    plan = AdamProxPlan(key, mode, block, tables, n_programs, nnz, meta, grad_key)
    if lamb:
        # Elementwise modes share the work tables; tiles get elementwise ones for pass 1.
        work = tables if mode != MODE_TILES else _work_tables(*element_work[:2], device)
        n_norm = len(element_work[0])
        plan.lamb = dict(
            work_tensor=work["work_tensor"],
            work_start=work["work_start"],
            first=torch.tensor(element_work[2], dtype=torch.int64, device=device),
            sums=torch.empty(2, n_norm, dtype=torch.float32, device=device),
            trust=torch.empty(len(params), dtype=torch.float32, device=device),
            meta=dict(BLOCK=elements),
        )
    _set_aligned(plan, (params, grads, exp_avgs, exp_avg_sqs, auxes), params)
    return plan


def _plan_key(params, grads, exp_avgs, exp_avg_sqs, auxes, counters, *options):
    ptrs = tuple(
        t.data_ptr() if t is not None else 0
        for ts in (params, exp_avgs, exp_avg_sqs, auxes, counters)
        for t in ts
    )
    return (*options, tuple(g.dtype for g in grads), ptrs)


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


def _set_aligned(plan: AdamProxPlan, tensor_lists, params) -> None:
    """Set each pass's ALIGNED: every tensor starts on 16 bytes and rows (tiles) or sizes
    (elementwise) keep the loads aligned, so the kernel may promise vectorisable access."""
    ptrs_ok = all(t.data_ptr() % 16 == 0 for ts in tensor_lists for t in ts if t is not None)
    sizes_ok = ptrs_ok and all(p.numel() % 16 == 0 for p in params)
    if plan.mode == MODE_TILES:
        plan.meta["ALIGNED"] = ptrs_ok and all(p.shape[1] % 4 == 0 for p in params)
    else:
        plan.meta["ALIGNED"] = sizes_ok
    if plan.lamb:
        plan.lamb["meta"]["ALIGNED"] = sizes_ok
