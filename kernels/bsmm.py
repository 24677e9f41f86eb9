"""Block-sparse matmul for inference: y = act(x @ W^T + b), W[out, in] stored as BSR tiles.

The layout is PyTorch's BSR: `values[nnz, bh, bw]` holds the stored tiles, `col_idx[nnz]` the
block-column of each, `row_ptr[out // bh + 1]` where each block-row's tiles start (so
`weight.to_sparse_bsr((bh, bw))` gives the same three tensors). Block-rows without tiles write the
bias.

GPU (Triton): one program computes BLOCK_M rows of x against one block-row of W (an output block
bh wide) and loops only over that block-row's stored tiles, so the work is proportional to the
number of stored tiles; autotuning may give a program ROWS consecutive block-rows, which re-reads
its x tiles from L1 instead of L2 (x is re-read once per stored tile: ~10x its size at 90%).
The epilogue adds the bias and, optionally, the exact (erf) GELU that BERT's
intermediate layer applies, so that layer needs no second pass. bh and bw are the tl.dot shapes and
must be >= 16. Measured on an H100 (bf16, 32x32 tiles, x[8192, 768] @ W[3072, 768]^T, CUDA-graph
replays, bench/bench_bsmm.py): 0.36x cuBLAS at 0% zero tiles, 0.62x at 50%, 1.23x at 80%, 1.63x at
90%; 1.9-2.5x PyTorch's BSR matmul throughout. Below ~70% sparsity cuBLAS's wide output tiles, which
re-read x far less, win; at high sparsity the M x out output write is the floor.

CPU (PyTorch fallback, `bsmm_ref`): measured on a 2-core AVX-512 EPYC, torch.set_num_threads(2),
fp32, x[8192, 768] @ W[3072, 768]^T, 32x32 tiles, 90% zero tiles (best of 6, interleaved runs):
    dense F.linear                                          231 ms   1.0x
    torch BSR  (F.linear on to_sparse_bsr)                  920 ms   0.2x  (CSR 420 ms)
    per block-column GEMM, scatter-add into y               234 ms   1.0x
    per block-row: gather x's column blocks, one GEMM       161 ms   1.4x  (all rows at once)
      ... same, x processed in chunks of 1024 rows          111 ms   2.1x
      ... chunks of 2048 rows, gather with index_select      73 ms   3.2x  <- chosen
      ... transposed form (W_r @ x^T[cols]) + transpose      93 ms   2.5x
(The same candidates on a busy machine, other jobs holding the cores: every method with many small
parallel ops falls behind one large dense GEMM, so ratios only mean something on an idle machine.)
So for each chunk of rows (a few MB of x, stays in cache) and each block-row, the x column blocks
that block-row needs are gathered into a contiguous [rows, k*bw] matrix and multiplied once by the
block-row's tiles laid side by side ([k*bw, bh]), writing straight into y's column slice; the
bias is added once at the end. Each GEMM then has k*bw as its depth, instead of k separate bw-deep
products. Above `dense_above` (default 0.6) of the tiles stored, the plan is the dense weight and
the fallback calls F.linear (at 50% zero tiles the gather path still measured ~2x ahead on a quiet
machine, and ~1x at x[2048, in] on a busy one: `rpp_triton.sparse.choose_layers` measures where
sparse pays per layer). The registered op (part 4) keeps each weight's plan between calls.
"""

import math
import weakref

import torch
import torch.nn.functional as F

from rpp_triton.backend import interpreting, resolve
from rpp_triton.kernels._compat import HAS_TRITON, tl, triton


def bsr_from_dense(weight: torch.Tensor, block_size: tuple[int, int]):
    """(values[nnz, bh, bw], col_idx[nnz], row_ptr[out//bh + 1]) of the non-zero tiles of `weight`."""
    bh, bw = block_size
    out_f, in_f = weight.shape
    tiles = weight.detach().reshape(out_f // bh, bh, in_f // bw, bw).transpose(1, 2)
    keep = tiles.ne(0).any(dim=-1).any(dim=-1)  # [out//bh, in//bw]
    rows, cols = keep.nonzero(as_tuple=True)  # row-major order: sorted by block-row, then column
    values = tiles[rows, cols].contiguous()
    counts = keep.sum(dim=1)
    row_ptr = torch.zeros(out_f // bh + 1, dtype=torch.int32, device=weight.device)
    row_ptr[1:] = counts.cumsum(0)
    return values, cols.to(torch.int32), row_ptr


def bsr_to_dense(values, col_idx, row_ptr, in_features: int) -> torch.Tensor:
    """The dense W[out, in] that the BSR tensors describe (zeros where no tile is stored)."""
    _, bh, bw = values.shape
    n_rows = row_ptr.numel() - 1
    dense = values.new_zeros(n_rows, in_features // bw, bh, bw)
    rows = torch.repeat_interleave(
        torch.arange(n_rows, device=values.device), (row_ptr[1:] - row_ptr[:-1]).long()
    )
    dense[rows, col_idx.long()] = values
    return dense.transpose(1, 2).reshape(n_rows * bh, in_features)


# ----------------------------------------------------------------------------------------------
# 1. Reference / CPU fallback
# ----------------------------------------------------------------------------------------------
def bsmm_ref(x, values, col_idx, row_ptr, bias=None, gelu=False, plan=None, chunk_bytes=6 << 20):
    """y = act(x @ W^T + bias) for W in BSR form, x[..., in]; act is exact GELU when `gelu`.

    Per block-row r with stored tiles at block-columns c_1..c_k:
        y[:, r] = [x[:, c_1] ... x[:, c_k]] @ [W[r, c_1] ... W[r, c_k]]^T
    `plan` is `bsmm_cpu_plan(...)`, precomputed by callers that reuse W. x is processed in chunks of
    `chunk_bytes` (~6 MB of fp32 x at in=768 stays in the L2/L3 caches).
    """
    _, bh, bw = values.shape
    in_f = x.shape[-1]
    out_f = (row_ptr.numel() - 1) * bh
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    M = x2.shape[0]
    if plan is None:
        plan = bsmm_cpu_plan(values, col_idx, row_ptr, in_f)
    if isinstance(plan, torch.Tensor):
        y = F.linear(x2, plan, bias)
    else:
        y = torch.empty(M, out_f, dtype=x.dtype, device=x.device)
        chunk = max(1, chunk_bytes // max(1, in_f * x2.element_size()))
        for s in range(0, M, chunk):
            xs = x2[s : s + chunk].reshape(-1, in_f // bw, bw)
            n = xs.shape[0]
            for r, (cols, w_row) in enumerate(plan):
                out = y[s : s + chunk, r * bh : (r + 1) * bh]
                if w_row is None:
                    out.zero_()
                else:
                    torch.mm(xs.index_select(1, cols).reshape(n, -1), w_row, out=out)
        if bias is not None:
            y += bias  # once over y: ~100 small bias copies per chunk cost more than the matmuls
    if gelu:
        y = F.gelu(y)
    return y.reshape(*lead, out_f)


def bsmm_cpu_plan(values, col_idx, row_ptr, in_features: int, dense_above: float = 0.6):
    """How `bsmm_ref` multiplies: the dense W[out, in] when more than `dense_above` of the tiles are
    stored (one GEMM wins there), else per block-row (block-columns to gather, tiles side by side as
    [k*bw, bh], or None for a block-row without tiles)."""
    _, bh, bw = values.shape
    n_rows = row_ptr.numel() - 1
    if values.shape[0] > dense_above * n_rows * (in_features // bw):
        return bsr_to_dense(values, col_idx, row_ptr, in_features)
    ptr = row_ptr.tolist()
    return [
        (col_idx[a:b].long(), values[a:b].transpose(1, 2).reshape(-1, bh) if b > a else None)
        for a, b in zip(ptr[:-1], ptr[1:])
    ]


# ----------------------------------------------------------------------------------------------
# 2. Triton kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bsmm_kernel(
    x_ptr,
    values_ptr,
    col_idx_ptr,
    row_ptr_ptr,
    bias_ptr,
    y_ptr,
    M,
    n_block_rows,
    M_BUCKET,  # autotuning key only: M rounded up to a power of two
    DENSITY_DECILE,  # autotuning key only: stored tiles / all tiles, in tenths (best config shifts)
    stride_xm,
    stride_xk,
    stride_vt,
    stride_vh,
    stride_vw,
    stride_ym,
    stride_yn,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Block-row groups fastest: neighbouring programs share the same rows of x (reuse in L2).
    pid = tl.program_id(0)
    n_groups = tl.cdiv(n_block_rows, ROWS)
    pid_g = pid % n_groups
    pid_m = pid // n_groups

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BH)
    offs_w = tl.arange(0, BW)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_w[None, :] * stride_xk
    # Tiles are read transposed, [bw, bh], so the product is x[BLOCK_M, bw] @ W_tile^T.
    w_offs = offs_w[:, None] * stride_vw + offs_h[None, :] * stride_vh

    # ROWS block-rows one after the other: their x tiles come again from L1 rather than L2.
    first = pid_g * ROWS
    for r in range(first, tl.minimum(first + ROWS, n_block_rows)):
        start = tl.load(row_ptr_ptr + r)
        end = tl.load(row_ptr_ptr + r + 1)
        col_ptr = col_idx_ptr + start
        w_tile = values_ptr + start.to(tl.int64) * stride_vt + w_offs
        acc = tl.zeros((BLOCK_M, BH), dtype=tl.float32)
        for _ in range(start, end):
            col = tl.load(col_ptr).to(tl.int64)
            a = tl.load(x_rows + col * BW * stride_xk, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_tile)
            if DOT_FP32:
                # The interpreter's low-precision dot is not exact; fp32 products of fp16/bf16 are.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            col_ptr += 1
            w_tile += stride_vt

        if HAS_BIAS:
            acc += tl.load(bias_ptr + r * BH + offs_h).to(tl.float32)[None, :]
        if GELU:
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + (r * BH + offs_h)[None, :] * stride_yn
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def _gpu_configs():
    # (BLOCK_M, ROWS, num_warps, num_stages). One block-row per program is the plain scheme; several
    # trade parallelism for x reuse in L1 (num_stages=1 keeps x loads L1-cached, not cp.async).
    shapes = [
        (64, 1, 4, 2), (64, 1, 4, 3), (128, 1, 4, 2), (128, 1, 4, 3), (128, 1, 8, 3), (256, 1, 8, 2),
        (64, 4, 4, 1), (64, 4, 4, 2), (128, 4, 4, 1), (128, 4, 8, 2), (64, 8, 4, 1), (128, 8, 8, 2),
    ]  # fmt: skip
    return [
        triton.Config({"BLOCK_M": bm, "ROWS": rows}, num_warps=w, num_stages=s) for bm, rows, w, s in shapes
    ]


# Autotuning needs a GPU driver; the interpreter (or a caller giving block_m and rows) launches the
# plain kernel.
_bsmm_kernel_tuned = (
    triton.autotune(
        configs=_gpu_configs(),
        key=["M_BUCKET", "DENSITY_DECILE", "n_block_rows", "BH", "BW", "HAS_BIAS", "GELU"],
    )(_bsmm_kernel)
    if HAS_TRITON
    else _bsmm_kernel
)


# ----------------------------------------------------------------------------------------------
# 3. Launcher
# ----------------------------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_bsmm_inputs(x, values, col_idx, row_ptr, bias=None):
    """Raise ValueError unless the tensors describe y = x @ W^T + bias with W in BSR form."""
    if values.dim() != 3:
        raise ValueError(f"values must be [nnz, bh, bw], got shape {tuple(values.shape)}")
    _, bh, bw = values.shape
    if x.dim() < 1 or x.shape[-1] % bw != 0:
        raise ValueError(f"x's last dimension ({x.shape[-1] if x.dim() else None}) must divide by bw={bw}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if values.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} but the weight tiles are {values.dtype}; cast one of them")
    for name, t in (("values", values), ("col_idx", col_idx), ("row_ptr", row_ptr), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move them to one device")
    if col_idx.numel() != values.shape[0] or row_ptr.dim() != 1 or row_ptr.numel() < 2:
        raise ValueError("col_idx must have one entry per tile and row_ptr out//bh + 1 entries")
    out_f = (row_ptr.numel() - 1) * bh
    if bias is not None and (bias.shape != (out_f,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_f}] of dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def bsmm(x, values, col_idx, row_ptr, bias=None, gelu=False, block_m=None, rows=None):
    """y = act(x @ W^T + bias), W[out, in] in BSR form (values[nnz, bh, bw], col_idx, row_ptr).

    x[..., in] in fp32/fp16/bf16, accumulated in fp32; act is the exact erf GELU when `gelu`.
    Runs the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1). Each program
    computes `block_m` rows of x against `rows` consecutive block-rows of W: autotuned on the GPU
    unless both are given; 32 and 2 in the interpreter (2 exercises the block-row loop's ragged tail).
    """
    check_bsmm_inputs(x, values, col_idx, row_ptr, bias)
    _, bh, bw = values.shape
    if not kernel_supports((bh, bw)):
        raise ValueError(f"the Triton kernel needs power-of-two tiles of at least 16, got {bh}x{bw}")
    in_f = x.shape[-1]
    n_rows = row_ptr.numel() - 1
    out_f = n_rows * bh
    x2 = x.reshape(-1, in_f)
    M = x2.shape[0]

    interp = interpreting()
    # The interpreter truncates fp32 -> bf16 instead of rounding: it writes fp32 and torch rounds.
    y_dtype = torch.float32 if interp and x.dtype == torch.bfloat16 else x.dtype
    y = torch.empty(M, out_f, dtype=y_dtype, device=x.device)
    if M == 0:
        return y.to(x.dtype).reshape(*x.shape[:-1], out_f)
    values = values.contiguous()
    col_idx = col_idx.to(torch.int32).contiguous()
    row_ptr = row_ptr.to(torch.int32).contiguous()
    # fp32 on the GPU: full-precision products, as F.linear does unless TF32 is switched on.
    ieee = x.dtype == torch.float32 and not (x.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    decile = round(10 * values.shape[0] / max(1, n_rows * (in_f // bw)))
    args = (x2, values, col_idx, row_ptr, bias if bias is not None else y, y, M, n_rows, _bucket(M), decile)
    strides = (*x2.stride(), *values.stride(), *y.stride())
    flags = dict(
        BH=bh, BW=bw, HAS_BIAS=bias is not None, GELU=gelu, DOT_FP32=interp and x.dtype != torch.float32
    )
    if interp or not x.is_cuda:
        block_m, rows = block_m or 32, rows or 2
    if block_m and rows:
        grid = (triton.cdiv(M, block_m) * triton.cdiv(n_rows, rows),)
        _bsmm_kernel[grid](*args, *strides, BLOCK_M=block_m, ROWS=rows, IEEE=ieee, **flags)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n_rows, meta["ROWS"]),)
        _bsmm_kernel_tuned[grid](*args, *strides, IEEE=ieee, **flags)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_f)


def _bucket(m: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, m))))


def kernel_supports(block) -> bool:
    """True for tiles the Triton kernel takes: both sides powers of two, at least 16 (tl.dot)."""
    return all(v >= 16 and v & (v - 1) == 0 for v in block)


# ----------------------------------------------------------------------------------------------
# 4. Registered operator: torch.ops.rpp_triton.bsmm
# ----------------------------------------------------------------------------------------------
# An opaque custom_op rather than triton_op: the CPU body is a Python loop over block-rows that only
# concrete index tensors can drive, so torch.compile must call it, not trace it. The op is then one
# extern call in the graph on every device, and inside it nothing syncs with the GPU on the Triton
# path, so CUDA graphs (mode="reduce-overhead") capture it.
def uses_kernel(backend: str, device, block) -> bool:
    """Whether `backend` ("auto", "triton", "torch") runs the Triton kernel for tensors on `device`
    with `block` tiles. "auto" falls back to PyTorch for tiles the kernel does not take; with
    "triton" the launcher refuses them."""
    if resolve(backend, device) == "torch":
        return False
    return backend == "triton" or kernel_supports(block)


_PLANS: dict[tuple, tuple] = {}


def _cached_plan(values, col_idx, row_ptr, in_features: int):
    """bsmm_cpu_plan, kept while the same three tensors live unmodified: a layer's weights come back
    on every call, and rebuilding the plan costs a host copy of the indices (a sync on the GPU)."""
    tensors = (values, col_idx, row_ptr)
    key = (*map(id, tensors), in_features)
    # Inference tensors have no version counter; they can only change inside inference mode.
    state = tuple(0 if t.is_inference() else t._version for t in tensors)
    hit = _PLANS.get(key)
    if hit is None or hit[1] != state or any(r() is not t for r, t in zip(hit[0], tensors)):
        refs = tuple(weakref.ref(t, lambda _, k=key: _PLANS.pop(k, None)) for t in tensors)
        hit = _PLANS[key] = (refs, state, bsmm_cpu_plan(values, col_idx, row_ptr, in_features))
    return hit[2]


@torch.library.custom_op("rpp_triton::bsmm", mutates_args=())
def bsmm_op(
    x: torch.Tensor,
    values: torch.Tensor,
    col_idx: torch.Tensor,
    row_ptr: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """y = act(x @ W^T + bias) as `torch.ops.rpp_triton.bsmm`: the Triton kernel where `backend`
    resolves to it (see `uses_kernel`), else `bsmm_ref` with a cached plan. For inference: no
    autograd formula is registered."""
    check_bsmm_inputs(x, values, col_idx, row_ptr, bias)
    if uses_kernel(backend, x.device, values.shape[1:]):
        return bsmm(x, values, col_idx, row_ptr, bias, gelu)
    plan = _cached_plan(values, col_idx, row_ptr, x.shape[-1])
    return bsmm_ref(x, values, col_idx, row_ptr, bias, gelu, plan=plan)


@bsmm_op.register_fake
def _bsmm_fake(x, values, col_idx, row_ptr, bias=None, gelu=False, backend="auto"):
    return x.new_empty((*x.shape[:-1], (row_ptr.shape[0] - 1) * values.shape[1]))
