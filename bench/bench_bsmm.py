"""Block-sparse linear vs dense F.linear vs PyTorch's BSR matmul, one group per case.

    python -m pytest bench/bench_bsmm.py -q --benchmark-json=bench/results/bsmm_cpu.json
    python bench/plot_bsmm.py bench/results/bsmm_cpu.json bench/results/bsmm_cpu.png

CPU: fp32 only, `RPP_BENCH_CPU_THREADS` threads (default 1), a short list of cases. CUDA: bf16,
BERT-base shapes at 0-95% tile sparsity, tiles 32 and 64; skipped without a GPU. Each timed call on the GPU
replays `GPU_INNER` products from a CUDA graph and synchronises (device time, launch overhead left
out for every implementation alike; eager if capture fails, see extra_info["cuda_graph"]).
The whole-encoder cases compare a random BERT-base encoder, dense against sparsified (all layers,
or those `choose_layers` measured faster), eager and compiled (CUDA graphs on the GPU).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from _common import BERT_BASE_LINEARS as SHAPES
from _common import BERT_BASE_TOKENS as M
from _common import cpu_threads, device_name, median_seconds, pruned_bert, pruned_linear, record

import rpp_triton as rpp
from rpp_triton.sparse import choose_layers, compile_sparse

HAS_CUDA = torch.cuda.is_available()
GPU_INNER = 10

GPU_CASES = [
    (shape, sp, tile)
    for shape in SHAPES
    for tile in (32, 64)
    for sp in (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
    if shape != "attn" or tile == 32
]
CPU_CASES = [
    ("ffn_in", M, 0.5, 32),
    ("ffn_in", M, 0.9, 32),
    ("ffn_in", M, 0.9, 64),
    ("ffn_out", 2048, 0.9, 32),
    ("attn", 2048, 0.5, 32),
    ("attn", 2048, 0.8, 32),
    ("attn", 2048, 0.9, 32),
]
IMPLS = ["dense", "torch_bsr", "bsmm"]


def make_fn(impl, linear, x, tile):
    if impl == "dense":
        w, b = linear.weight, linear.bias
        return lambda: F.linear(x, w, b)
    if impl == "torch_bsr":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_bsr = linear.weight.to_sparse_bsr((tile, tile))
        b = linear.bias
        try:
            F.linear(x, w_bsr, b)
            return lambda: F.linear(x, w_bsr, b)
        except (RuntimeError, NotImplementedError):
            xt = x.t().contiguous()
            try:
                torch.sparse.mm(w_bsr, xt)
            except (RuntimeError, NotImplementedError) as e:
                pytest.skip(f"PyTorch BSR matmul unavailable here: {str(e).splitlines()[0]}")
            return lambda: torch.sparse.mm(w_bsr, xt).t() + b
    layer = rpp.BlockSparseLinear.from_dense(linear, block_size=tile)
    return lambda: layer(x)


def run(benchmark, fn, device, rounds, graph=False):
    """Time `fn`; on CUDA, GPU_INNER calls per timed call (replayed from a CUDA graph if `graph`, so the
    ratio compares device time rather than Python launch overhead). Returns (seconds per call, None
    under --benchmark-disable; whether a CUDA graph replayed)."""
    if device != "cuda":
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        return median_seconds(benchmark), False

    def eager():
        for _ in range(GPU_INNER):
            fn()

    eager()  # compile + autotune outside the timing
    torch.cuda.synchronize()
    step = eager
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                eager()
            step = g.replay
        except RuntimeError:
            torch.cuda.synchronize()
            graph = False

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2)
    t = median_seconds(benchmark)
    return (t / GPU_INNER if t is not None else None), graph


def linear_case(benchmark, device, dtype, shape, m, sparsity, tile, impl, rounds):
    torch.manual_seed(0)
    out_f, in_f = SHAPES[shape]
    linear = pruned_linear(out_f, in_f, sparsity, tile, dtype, device)
    x = torch.randn(m, in_f, device=device, dtype=dtype)
    fn = make_fn(impl, linear, x, tile)
    with torch.no_grad():
        if impl != "dense":  # same result as dense before timing anything
            ref = F.linear(x.float(), linear.weight.float(), linear.bias.float())
            torch.testing.assert_close(
                fn().float(), ref, atol=0.5 if dtype != torch.float32 else 1e-3, rtol=2e-2
            )
        dt = str(dtype)[6:]
        benchmark.group = (
            f"{device} {shape} x[{m},{in_f}] W[{out_f},{in_f}] {dt} sparsity={sparsity} tile={tile}"
        )
        t, graphed = run(benchmark, fn, device, rounds, graph=True)
    flops = 2 * m * in_f * out_f
    tiles = linear.weight.reshape(out_f // tile, tile, in_f // tile, tile).ne(0).any(3).any(1)
    stored = int(tiles.sum())
    info = dict(
        impl=impl, shape=[m, in_f, out_f], dtype=str(dtype), sparsity=sparsity, tile=[tile, tile],
        device=device_name(device), cuda_graph=graphed, stored_tiles=stored,
        # The roofline's memory floor: x, y and the stored tiles, each moved once.
        floor_bytes=(m * in_f + m * out_f + stored * tile * tile) * x.element_size(),
    )  # fmt: skip
    tflop = {"dense_equiv_tflops": flops / 1e12, "useful_tflops": flops * (1 - sparsity) / 1e12}
    record(benchmark, t, info, tflop)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-m{c[1]}-sp{c[2]}-tile{c[3]}")
def test_cpu_fp32(benchmark, case, impl):
    torch.set_num_threads(cpu_threads())
    shape, m, sparsity, tile = case
    rounds = 3 if m == M else 5
    if impl == "torch_bsr" and sparsity < 0.9:
        rounds = 2  # PyTorch's CPU BSR path takes seconds here
    linear_case(benchmark, "cpu", torch.float32, shape, m, sparsity, tile, impl, rounds)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}-sp{c[1]}-tile{c[2]}")
def test_cuda_bf16(benchmark, case, impl):
    shape, sparsity, tile = case
    linear_case(benchmark, "cuda", torch.bfloat16, shape, M, sparsity, tile, impl, rounds=20)


# ------------------------------------------------------------------------------------------------
# Whole encoder
# ------------------------------------------------------------------------------------------------
ENCODER_CASES = [
    ("cpu", torch.float32, 2, 0.8),
    ("cuda", torch.bfloat16, 64, 0.8),
    ("cuda", torch.bfloat16, 1, 0.9),
]
# sparse_chosen: sparse only where choose_layers measured it faster; *_compiled: compile_sparse, with
# CUDA graphs (mode="reduce-overhead") on the GPU.
ENCODER_FORMS = ["dense", "sparse", "sparse_chosen", "dense_compiled", "sparse_compiled"]


@pytest.mark.parametrize("form", ENCODER_FORMS)
@pytest.mark.parametrize("setup", ENCODER_CASES, ids=lambda c: f"{c[0]}-batch{c[2]}-sp{c[3]}")
def test_bert_base_encoder(benchmark, setup, form):
    pytest.importorskip("transformers")
    device, dtype, batch, sparsity = setup
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if device == "cpu" and form.endswith("compiled"):
        pytest.skip("compiling BERT-base takes minutes on a small CPU; the compiled forms are GPU cases")
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
    torch.manual_seed(0)
    tile, seq = 32, 128
    model = pruned_bert(sparsity, tile, dtype, device)
    ids = torch.randint(0, 30522, (batch, seq), device=device)
    with torch.no_grad():
        if form.startswith("sparse"):
            rpp.sparsify(model, block_size=tile, min_sparsity=0.5)
        if form == "sparse_chosen":
            chosen = choose_layers(model, {"input_ids": ids})
            benchmark.extra_info["sparse_layers"] = sum(r["sparse"] for r in chosen.values())
        if form.endswith("compiled"):
            model = compile_sparse(model, mode="reduce-overhead" if device == "cuda" else None)
        fn = lambda: model(input_ids=ids).last_hidden_state
        benchmark.group = (
            f"{device} bert-base encoder batch={batch} seq={seq} {str(dtype)[6:]} sparsity={sparsity}"
        )
        t, _ = run(benchmark, fn, device, rounds=3 if device == "cpu" else 10)
    info = dict(
        impl=form, shape=[batch, seq, 768], dtype=str(dtype), sparsity=sparsity, tile=[tile, tile],
        device=device_name(device),
    )  # fmt: skip
    record(benchmark, t, info, {"sequences_per_s": batch})
