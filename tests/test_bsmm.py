"""The registered op torch.ops.rpp_triton.bsmm, the Triton kernel (run by the interpreter on CPU) and
the PyTorch fallback against dense F.linear on the masked weight."""

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from rpp_triton.backend import interpreting
from rpp_triton.kernels._compat import HAS_TRITON
from rpp_triton.kernels.bsmm import (
    bsmm,
    bsmm_cpu_plan,
    bsmm_ref,
    bsr_from_dense,
    bsr_to_dense,
    uses_kernel,
)

# The kernel on CPU tensors needs the interpreter; on a GPU machine the CUDA cases below cover it.
on_cpu_kernel = pytest.mark.skipif(
    not interpreting(), reason="CPU tensors reach the kernel only under TRITON_INTERPRET=1"
)

# fp32: absolute/relative tolerance. fp16/bf16: the kernel may be at most twice as far from an fp32
# reference as PyTorch's own low-precision F.linear is (plus a little slack for ties).
TOL = {torch.float32: (1e-5, 1e-4)}
LOWP_SLACK = {torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class Case:
    lead: tuple  # leading dims of x
    n_rows: int  # block-rows of W
    n_cols: int  # block-columns of W
    block: tuple
    pattern: str  # random | empty_rows | dense | empty
    bias: bool = True
    gelu: bool = False
    dtype: torch.dtype = torch.float32


def make_weight(case: Case, dtype=torch.float32):
    bh, bw = case.block
    keep = {
        "random": torch.rand(case.n_rows, case.n_cols) < 0.5,
        "dense": torch.ones(case.n_rows, case.n_cols, dtype=torch.bool),
        "empty": torch.zeros(case.n_rows, case.n_cols, dtype=torch.bool),
    }.get(case.pattern)
    if case.pattern == "empty_rows":
        keep = torch.rand(case.n_rows, case.n_cols) < 0.7
        keep[0] = False
        keep[-1] = False
        keep[1, 0] = True
    w = torch.randn(case.n_rows * bh, case.n_cols * bw)
    w = w * keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)
    return w.to(dtype), keep


def check_close(case, got, x, w, b):
    """Compare `got` with F.linear (+GELU) on the masked weight per the dtype's tolerance rule."""
    act = F.gelu if case.gelu else (lambda t: t)
    ref32 = act(F.linear(x.float(), w.float(), None if b is None else b.float()))
    assert got.dtype == x.dtype and got.shape == ref32.shape
    if x.dtype == torch.float32:
        atol, rtol = TOL[torch.float32]
        torch.testing.assert_close(got, ref32, atol=atol, rtol=rtol)
    else:
        torch_lowp = act(F.linear(x, w, b))
        torch_err = (torch_lowp.float() - ref32).abs().max().item()
        err = (got.float() - ref32).abs().max().item()
        assert err <= 2 * torch_err + LOWP_SLACK[x.dtype], (err, torch_err)


CASES = [
    Case((37,), 3, 4, (32, 32), "random"),
    Case((2, 5), 3, 2, (32, 32), "random", bias=False),  # 3-D input
    Case((7,), 4, 3, (16, 16), "empty_rows"),
    Case((33,), 2, 2, (64, 64), "random", gelu=True),
    Case((5,), 3, 4, (16, 32), "random", gelu=True),  # rectangular tiles
    Case((9,), 2, 3, (32, 16), "empty_rows", bias=False, gelu=True),
    Case((3,), 2, 2, (32, 32), "dense"),
    Case((4,), 2, 3, (16, 16), "empty"),
    Case((1,), 3, 3, (16, 16), "random"),
    Case((17,), 3, 3, (32, 32), "random", gelu=True, dtype=torch.float16),
    Case((3, 7), 3, 2, (16, 32), "empty_rows", dtype=torch.float16),
    Case((17,), 3, 3, (32, 32), "random", gelu=True, dtype=torch.bfloat16),
    Case((2, 6), 2, 4, (16, 16), "empty_rows", bias=False, dtype=torch.bfloat16),
    Case((31,), 2, 2, (64, 32), "dense", dtype=torch.bfloat16),
]


def case_id(c: Case) -> str:
    bias = "bias" if c.bias else "nobias"
    gelu = "-gelu" if c.gelu else ""
    dt = str(c.dtype).split(".")[-1]
    return f"x{list(c.lead)}-W{c.n_rows}x{c.n_cols}-{c.block[0]}x{c.block[1]}-{c.pattern}-{bias}{gelu}-{dt}"


def case_tensors(case: Case):
    """(w, kept tiles, x, bias) of a case, on the CPU."""
    w, keep = make_weight(case, case.dtype)
    bh, bw = case.block
    x = torch.randn(*case.lead, case.n_cols * bw).to(case.dtype)
    b = torch.randn(case.n_rows * bh).to(case.dtype) if case.bias else None
    return w, keep, x, b


OP_CASES = [
    Case((7,), 3, 2, (16, 16), "empty_rows"),
    Case((2, 5), 2, 3, (16, 32), "random", bias=False, gelu=True),
    Case((3,), 2, 2, (32, 16), "random", gelu=True, dtype=torch.bfloat16),
]


def opcheck_case(case: Case, backend: str, device: str):
    w, _, x, b = case_tensors(case)
    args = [t.to(device) if t is not None else None for t in (x, *bsr_from_dense(w, case.block), b)]
    torch.library.opcheck(torch.ops.rpp_triton.bsmm.default, (*args, case.gelu, backend))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=on_cpu_kernel)])
@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_opcheck(case, backend):
    opcheck_case(case, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_opcheck_cuda(case, backend):
    opcheck_case(case, backend, "cuda")


def test_dispatch():
    assert not uses_kernel("auto", "cpu", (32, 32))
    assert not uses_kernel("torch", "cuda", (32, 32))
    assert uses_kernel("auto", "cuda", (32, 32)) == HAS_TRITON
    assert not uses_kernel("auto", "cuda", (16, 8))  # tiles the kernel does not take: PyTorch
    assert uses_kernel("triton", "cuda", (16, 8)) == HAS_TRITON  # ... unless asked: the launcher refuses


def run_case(case: Case, fn):
    w, keep, x, b = case_tensors(case)
    bh, _ = case.block
    values, col_idx, row_ptr = bsr_from_dense(w, case.block)
    assert values.shape[0] == int(keep.sum())
    y = fn(x, values, col_idx, row_ptr, b, gelu=case.gelu)
    check_close(case, y, x, w, b)
    # Block-rows without stored tiles write exactly the bias (or zero).
    if not case.gelu:
        for r in (~keep.any(dim=1)).nonzero().flatten().tolist():
            expect = b[r * bh : (r + 1) * bh] if b is not None else torch.zeros(bh, dtype=case.dtype)
            assert torch.equal(y[..., r * bh : (r + 1) * bh], expect.expand_as(y[..., r * bh : (r + 1) * bh]))


@on_cpu_kernel
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_dense(case):
    run_case(case, bsmm)


@on_cpu_kernel
@pytest.mark.parametrize("block_m, rows", [(16, 1), (64, 3)], ids=["m16-rows1", "m64-rows3"])
def test_kernel_tuning_arguments(block_m, rows):
    case = Case((37,), 4, 3, (16, 16), "empty_rows")
    run_case(case, functools.partial(bsmm, block_m=block_m, rows=rows))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fallback_matches_dense(case):
    run_case(case, bsmm_ref)


@pytest.mark.parametrize("dense_above", [1.0, 0.0], ids=["gather-path", "dense-path"])
def test_fallback_chunks_and_both_paths(dense_above):
    # Tiny chunks force several row chunks through the gather path.
    keep = torch.rand(4, 4) < 0.5
    keep[0, 0] = True
    w = torch.randn(64, 64) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    x, b = torch.randn(2, 11, 64), torch.randn(64)
    bsr = bsr_from_dense(w, (16, 16))
    plan = bsmm_cpu_plan(*bsr, 64, dense_above=dense_above)
    assert isinstance(plan, torch.Tensor) == (dense_above == 0.0)
    y = bsmm_ref(x, *bsr, b, plan=plan, chunk_bytes=3 * 64 * 4)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
@pytest.mark.parametrize("block", [(16, 16), (32, 16), (16, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_layout_matches_torch_and_round_trips(block):
    keep = torch.rand(4, 3) < 0.5
    w = torch.randn(4 * block[0], 3 * block[1]) * keep.repeat_interleave(block[0], 0).repeat_interleave(
        block[1], 1
    )
    values, col_idx, row_ptr = bsr_from_dense(w, block)
    ref = w.to_sparse_bsr(block)
    assert torch.equal(values, ref.values())
    assert torch.equal(col_idx.long(), ref.col_indices().long())
    assert torch.equal(row_ptr.long(), ref.crow_indices().long())
    assert torch.equal(bsr_to_dense(values, col_idx, row_ptr, w.shape[1]), w)


@on_cpu_kernel
def test_empty_batch():
    w = torch.randn(32, 32)
    y = bsmm(torch.randn(0, 32), *bsr_from_dense(w, (16, 16)))
    assert y.shape == (0, 32)
    assert bsmm_ref(torch.randn(0, 32), *bsr_from_dense(w, (16, 16))).shape == (0, 32)


def test_bad_inputs():
    w = torch.randn(32, 32)
    bsr = bsr_from_dense(w, (16, 16))
    with pytest.raises(ValueError, match="divide"):
        bsmm(torch.randn(3, 40), *bsr)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        bsmm(torch.ones(3, 32, dtype=torch.int32), *bsr)
    with pytest.raises(ValueError, match="weight tiles are torch.float32"):
        bsmm(torch.randn(3, 32, dtype=torch.float16), *bsr)
    with pytest.raises(ValueError, match="device"):
        bsmm(torch.randn(3, 32, device="meta"), *bsr)
    with pytest.raises(ValueError, match="bias"):
        bsmm(torch.randn(3, 32), *bsr, torch.randn(31))
    with pytest.raises(ValueError, match="at least 16"):
        bsmm(torch.randn(3, 32), *bsr_from_dense(w, (8, 8)))


GPU_CASES = [
    Case((1000,), 12, 8, (32, 32), "random", gelu=gelu, bias=bias, dtype=dt)
    for dt in (torch.float32, torch.float16, torch.bfloat16)
    for gelu, bias in ((False, True), (True, True), (False, False))
] + [
    Case((3, 333), 6, 5, block, pattern, dtype=torch.bfloat16)
    for block in ((16, 16), (64, 64), (16, 64), (64, 32))
    for pattern in ("empty_rows", "dense", "empty")
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_kernel_matches_dense_cuda(case):
    def on_cuda(x, values, col_idx, row_ptr, b, gelu):
        args = [t.cuda() if t is not None else None for t in (x, values, col_idx, row_ptr, b)]
        return bsmm(*args, gelu=gelu).cpu()

    run_case(case, on_cuda)
