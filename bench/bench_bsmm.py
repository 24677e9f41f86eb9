"""Block-sparse linear vs dense F.linear vs PyTorch's BSR matmul, one group per case.

    python -m pytest bench/bench_bsmm.py -q --benchmark-json=bench/results/bsmm_cpu.json
    python bench/plot_bsmm.py bench/results/bsmm_cpu.json bench/results/bsmm_cpu.png

CPU: fp32 only, 2 threads (the machine's cores), a short list of cases. CUDA: bf16, BERT-base
shapes at 0-95% tile sparsity, tiles 32 and 64; skipped without a GPU. Each timed call on the GPU
replays `GPU_INNER` products from a CUDA graph and synchronises (device time, launch overhead left
out for every implementation alike; eager if capture fails, see extra_info["cuda_graph"]).
The whole-encoder cases compare a random BERT-base encoder, dense vs sparsified at 80%.
"""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rpp_triton as rpp

HAS_CUDA = torch.cuda.is_available()
# One thread by default: two OpenMP threads on a shared 2-core machine stall each other (see
# bench_adam_prox.py); BSMM_CPU_THREADS=2 on an idle machine.
CPU_THREADS = int(os.environ.get("BSMM_CPU_THREADS", "1"))
GPU_INNER = 10
M = 8192  # BERT-base tokens per batch: 64 sequences of 128

# (name, out_features, in_features) of BERT-base's linear layers.
SHAPES = {"ffn_in": (3072, 768), "ffn_out": (768, 3072), "attn": (768, 768)}

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


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"


def pruned_linear(out_f, in_f, sparsity, tile, dtype, device) -> nn.Linear:
    """A linear layer with exactly round(sparsity * tiles) random all-zero tiles."""
    linear = nn.Linear(in_f, out_f).to(device=device, dtype=dtype).requires_grad_(False)
    rows, cols = out_f // tile, in_f // tile
    keep = torch.ones(rows * cols, dtype=torch.bool)
    keep[torch.randperm(rows * cols)[: round(sparsity * rows * cols)]] = False
    mask = keep.view(rows, cols).repeat_interleave(tile, 0).repeat_interleave(tile, 1)
    linear.weight.mul_(mask.to(device=device, dtype=dtype))
    return linear


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
    ratio compares device time rather than Python launch overhead)."""
    if device != "cuda":
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        return False

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
    return graph


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
        graphed = run(benchmark, fn, device, rounds, graph=True)
    t = benchmark.stats.stats.median / (GPU_INNER if device == "cuda" else 1)
    flops = 2 * m * in_f * out_f
    benchmark.extra_info.update(
        impl=impl, shape=[m, in_f, out_f], dtype=str(dtype), sparsity=sparsity, tile=[tile, tile],
        device=device_name(device), cuda_graph=graphed, dense_equiv_tflops=flops / t / 1e12,
        useful_tflops=flops * (1 - sparsity) / t / 1e12,
    )  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"{c[0]}-m{c[1]}-sp{c[2]}-tile{c[3]}")
def test_cpu_fp32(benchmark, case, impl):
    torch.set_num_threads(CPU_THREADS)
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
ENCODER_CASES = [("cpu", torch.float32, 2), ("cuda", torch.bfloat16, 64)]


@pytest.mark.parametrize("form", ["dense", "sparse"])
@pytest.mark.parametrize("setup", ENCODER_CASES, ids=lambda c: f"{c[0]}-batch{c[2]}")
def test_bert_base_encoder(benchmark, setup, form):
    transformers = pytest.importorskip("transformers")
    device, dtype, batch = setup
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    torch.manual_seed(0)
    sparsity, tile, seq = 0.8, 32, 128
    model = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    for module in model.encoder.modules():
        if isinstance(module, nn.Linear):
            pruned = pruned_linear(*module.weight.shape, sparsity, tile, dtype, device)
            module.weight.copy_(pruned.weight)
    if form == "sparse":
        rpp.sparsify(model, block_size=tile, min_sparsity=0.5)
    ids = torch.randint(0, 30522, (batch, seq), device=device)
    with torch.no_grad():
        fn = lambda: model(input_ids=ids).last_hidden_state
        benchmark.group = (
            f"{device} bert-base encoder batch={batch} seq={seq} {str(dtype)[6:]} sparsity={sparsity}"
        )
        run(benchmark, fn, device, rounds=3 if device == "cpu" else 10)
    t = benchmark.stats.stats.median / (GPU_INNER if device == "cuda" else 1)
    benchmark.extra_info.update(
        impl=form, shape=[batch, seq, 768], dtype=str(dtype), sparsity=sparsity, tile=[tile, tile],
        device=device_name(device), sequences_per_s=batch / t,
    )  # fmt: skip
