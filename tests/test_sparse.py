"""BlockSparseLinear, sparsify / densify and compact save / load against the dense models."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import rpp_triton as rpp
from rpp_triton.sparse import FusedActivation, choose_layers, load_sparse, save_sparse, tile_sparsity

BACKENDS = ["torch", "triton"]
# "triton" runs the kernel on the GPU where there is one, else in the interpreter on CPU tensors.
DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7, 64), (2, 9, 64)], ids=["2d", "3d"])
def test_from_dense_matches_linear(backend, shape, prune_tiles):
    linear = nn.Linear(64, 48).to(DEVICE[backend])
    keep = prune_tiles(linear.weight, (16, 16), 0.5)
    layer = rpp.BlockSparseLinear.from_dense(linear, block_size=16, backend=backend)
    assert layer.nnz_tiles == int(keep.sum())
    assert layer.sparsity == pytest.approx(1 - keep.float().mean().item())
    x = torch.randn(*shape, device=DEVICE[backend])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), atol=1e-5, rtol=1e-4)
    assert torch.equal(layer.dense_weight(), linear.weight.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_weight_returns_bias(backend):
    linear = nn.Linear(32, 32).to(DEVICE[backend])
    nn.init.zeros_(linear.weight)
    layer = rpp.BlockSparseLinear.from_dense(linear, block_size=(16, 32), backend=backend)
    assert layer.nnz_tiles == 0 and layer.sparsity == 1.0
    y = layer(torch.randn(3, 5, 32, device=DEVICE[backend]))
    assert torch.equal(y, linear.bias.detach().expand(3, 5, 32))


def test_bad_input():
    with pytest.raises(ValueError, match="does not divide"):
        rpp.BlockSparseLinear.from_dense(nn.Linear(40, 32), block_size=32)
    int_layer = nn.Module()
    int_layer.register_buffer("weight", torch.ones(32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="floating point"):
        rpp.BlockSparseLinear.from_dense(int_layer, 16)
    layer = rpp.BlockSparseLinear.from_dense(nn.Linear(32, 32), block_size=16)
    with pytest.raises(ValueError, match=r"expected input \[..., 32\]"):
        layer(torch.randn(4, 31))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="cast the input"):
        layer(torch.randn(4, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="is on meta"):
        layer(torch.randn(4, 32, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        rpp.BlockSparseLinear.from_dense(nn.Linear(32, 32), 16, backend="cuda")
    with pytest.raises(ValueError, match="power-of-two"):
        dev = DEVICE["triton"]
        rpp.BlockSparseLinear.from_dense(nn.Linear(24, 24).to(dev), 8, backend="triton")(
            torch.randn(2, 24, device=dev)
        )


def test_sparsify_densify_sequential(prune_tiles):
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    prune_tiles(model[0].weight, (16, 16), 0.75)
    prune_tiles(model[2].weight, (16, 16), 0.25)
    x = torch.randn(6, 64)
    with torch.no_grad():
        ref = model(x)
        weights = [m.weight.clone() for m in model if isinstance(m, nn.Linear)]
        rpp.sparsify(model, block_size=16, min_sparsity=0.5)
        # layer 0: swapped, GELU fused; layer 2: below min_sparsity; layer 4: 10 rows do not divide by 16
        assert isinstance(model[0], rpp.BlockSparseLinear) and model[0].gelu
        assert isinstance(model[1], FusedActivation)
        assert type(model[2]) is nn.Linear and type(model[4]) is nn.Linear
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
        rpp.densify(model)
        assert [type(m) for m in model] == [nn.Linear, nn.GELU, nn.Linear, nn.Tanh, nn.Linear]
        assert all(torch.equal(m.weight, w) for m, w in zip(model[::2], weights))
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=1e-6)


def test_sparsify_skips_tied_and_tanh_gelu():
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.GELU(approximate="tanh"), nn.Linear(32, 32))
    model[2].weight = lin.weight  # tied
    rpp.sparsify(model, block_size=16)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    single = rpp.sparsify(nn.Sequential(nn.Linear(32, 32), nn.GELU(approximate="tanh")), block_size=16)
    assert isinstance(single[0], rpp.BlockSparseLinear) and not single[0].gelu
    assert isinstance(single[1], nn.GELU)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_bert_sparsified_equals_dense(backend, tiny_bert, tiny_bert_inputs):
    model = tiny_bert(tile_sparsity=0.5).to(DEVICE[backend])
    inputs = tiny_bert_inputs(DEVICE[backend])
    with torch.no_grad():
        ref = model(**inputs).last_hidden_state
        rpp.sparsify(model, block_size=16, min_sparsity=0.3, backend=backend)
        sparse_layers = [m for m in model.modules() if isinstance(m, rpp.BlockSparseLinear)]
        assert len(sparse_layers) == 12  # q, k, v, attention output, intermediate, output x 2 layers
        assert sum(m.gelu for m in sparse_layers) == 2
        assert all(isinstance(layer.intermediate.intermediate_act_fn, FusedActivation)
                   for layer in model.encoder.layer)  # fmt: skip
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref, atol=1e-5, rtol=1e-4)
        rpp.densify(model)
        assert not any(isinstance(m, (rpp.BlockSparseLinear, FusedActivation)) for m in model.modules())
        torch.testing.assert_close(model(**inputs).last_hidden_state, ref)


def test_state_dict_is_dense_and_reloads(tmp_path, tiny_bert):
    transformers = pytest.importorskip("transformers")
    model = tiny_bert("BertForMaskedLM", tile_sparsity=0.5)  # tied decoder / word embeddings
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    rpp.sparsify(model, block_size=16, min_sparsity=0.3)
    state = model.state_dict()
    assert state.keys() == dense_state.keys()
    assert all(torch.equal(state[k], v) for k, v in dense_state.items())

    # What save_pretrained writes, plain transformers loads with the same outputs.
    model.save_pretrained(tmp_path / "hf")
    plain, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(isinstance(m, rpp.BlockSparseLinear) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)

    # A dense state dict loads into a sparsified model: tiles re-packed, counts and all.
    other = tiny_bert("BertForMaskedLM", tile_sparsity=0.5)
    nn.init.normal_(other.bert.encoder.layer[0].attention.self.query.weight)  # no zero tile left
    with torch.no_grad():
        other_ref = other(input_ids=ids).logits
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.nnz_tiles == 2
    model.load_state_dict(other.state_dict())
    assert query.nnz_tiles == 4
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, other_ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        query.load_state_dict({"weight": torch.zeros(32, 16), "bias": torch.zeros(32)})
    with pytest.raises(RuntimeError, match="Missing key"):
        query.load_state_dict({"bias": torch.zeros(32)})


def test_save_pretrained_base_model(tmp_path, tiny_bert):
    transformers = pytest.importorskip("transformers")
    model = tiny_bert(tile_sparsity=0.5)
    ids = torch.randint(0, 60, (2, 7))
    rpp.sparsify(model, block_size=16, min_sparsity=0.3)
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got, ref = plain(input_ids=ids), model(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-4)


class OpCost(TorchDispatchMode):
    """A deterministic clock: a dense product costs its multiply-adds, the block-sparse op twice those
    of its stored tiles (so a layer is faster sparse exactly when more than half its tiles are zero)."""

    def __init__(self):
        super().__init__()
        self.cost = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.rpp_triton.bsmm.default:
            x, values = args[0], args[1]
            self.cost += 2 * (x.numel() // x.shape[-1]) * values.numel()
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            a, b = args[-2:]
            self.cost += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def fake_timer(fn):
    with OpCost() as clock:
        fn()
    return clock.cost


def test_choose_layers_keeps_sparse_only_where_faster(tiny_bert, tiny_bert_inputs, prune_tiles):
    model = tiny_bert(tile_sparsity=0.5)
    for i, layer in enumerate(model.encoder.layer):  # layer 0: 75% zero tiles, layer 1: 25%
        for lin in (m for m in layer.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight)
            prune_tiles(lin.weight, (16, 16), 0.75 if i == 0 else 0.25)
    example = tiny_bert_inputs()
    with torch.no_grad():
        ref = model(**example).last_hidden_state
        rpp.sparsify(model, block_size=16)
        report = choose_layers(model, example, timer=fake_timer)
        assert len(report) == 13  # the encoder's 12 and the (unpruned) pooler
        for name, row in report.items():
            assert row["sparse"] == name.startswith("encoder.layer.0."), (name, row)
            assert row["sparse"] == (row["sparse_s"] < row["dense_s"])
        sparse = {n for n, m in model.named_modules() if isinstance(m, rpp.BlockSparseLinear)}
        assert sparse == {n for n, row in report.items() if row["sparse"]}
        fused = [type(layer.intermediate.intermediate_act_fn) for layer in model.encoder.layer]
        assert fused[0] is FusedActivation and fused[1] is not FusedActivation  # GELU back where dense
        torch.testing.assert_close(model(**example).last_hidden_state, ref, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(tmp_path, tiny_bert):
    import transformers

    model = tiny_bert("BertForMaskedLM", tile_sparsity=0.5)  # tied decoder / word embeddings
    ids = torch.randint(0, 60, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    sparse_w = {n: p.clone() for n, p in model.state_dict().items()}
    rpp.sparsify(model, block_size=16, min_sparsity=0.3)
    path = save_sparse(model, tmp_path / "sparse")

    dense_dir = tmp_path / "dense"
    model_dense = rpp.densify(tiny_bert("BertForMaskedLM", tile_sparsity=0.5))
    model_dense.load_state_dict(sparse_w)
    model_dense.save_pretrained(dense_dir)
    assert path.endswith(".safetensors")
    # Only the stored tiles are written: the encoder's linear weights take about half the bytes.
    lin_bytes = sum(t.numel() * 4 for n, t in sparse_w.items() if "encoder" in n and n.endswith("weight"))
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    assert (tmp_path / "sparse" / "sparse_model.safetensors").stat().st_size < dense_bytes - 0.4 * lin_bytes

    with torch.no_grad():
        sparse = load_sparse(tmp_path / "sparse")
        assert isinstance(sparse, transformers.BertForMaskedLM)
        assert sum(isinstance(m, rpp.BlockSparseLinear) for m in sparse.modules()) == 12
        assert sparse.cls.predictions.decoder.weight is sparse.bert.embeddings.word_embeddings.weight
        torch.testing.assert_close(sparse(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)

        dense = load_sparse(tmp_path / "sparse", dense=True)
        assert not any(isinstance(m, rpp.BlockSparseLinear) for m in dense.modules())
        for n, p in dense.state_dict().items():
            assert torch.equal(p, sparse_w[n]), n
        dense.save_pretrained(tmp_path / "plain")
        plain = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "plain").eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)

        into = load_sparse(tmp_path / "sparse", model=tiny_bert("BertForMaskedLM", tile_sparsity=0.5))
        torch.testing.assert_close(into(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-4)


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError):
        load_sparse(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "sparse_model.safetensors"))
    with pytest.raises(ValueError, match="not written by save_sparse"):
        load_sparse(tmp_path, model=nn.Linear(2, 2))


def test_tile_sparsity():
    w = torch.zeros(32, 64)
    w[0, 0] = 1.0
    assert tile_sparsity(w, 16) == 1 - 1 / 8
    assert tile_sparsity(w, (32, 64)) == 0.0
