"""torch.compile of a sparsified BERT: one graph through torch.ops.rpp_triton.bsmm, eager's outputs.

Compiling takes tens of seconds on a CPU, so this file holds few tests."""

import pytest
import torch

import rpp_triton as rpp
from rpp_triton.sparse import compile_sparse


@pytest.fixture
def sparse_bert(tiny_bert, tiny_bert_inputs):
    """`sparse_bert(device)`: a sparsified tiny BERT on `device`, example inputs and its dense output."""

    def build(device):
        model = tiny_bert(tile_sparsity=0.5).to(device)
        inputs = tiny_bert_inputs(device)
        with torch.no_grad():
            ref = model(**inputs).last_hidden_state
        rpp.sparsify(model, block_size=16, min_sparsity=0.3)
        return model, inputs, ref

    return build


def test_fullgraph_on_cpu_matches_eager(sparse_bert):
    pytest.importorskip("transformers")
    model, inputs, ref = sparse_bert("cpu")
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=recording)(**inputs)
    ops = [n for g in graphs for n in g.graph.nodes if "rpp_triton.bsmm" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 12

    compiled = compile_sparse(model)
    torch.testing.assert_close(compiled(**inputs).last_hidden_state, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_reduce_overhead_captures_cuda_graphs(sparse_bert):
    from torch._dynamo.utils import counters

    pytest.importorskip("transformers")
    model, inputs, ref = sparse_bert("cuda")
    compiled = compile_sparse(model, mode="reduce-overhead")
    counters.clear()
    for _ in range(3):  # warm-up (autotuning), capture, replay
        got = compiled(**inputs).last_hidden_state.clone()
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)
