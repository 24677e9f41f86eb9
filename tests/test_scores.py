"""Pruning scores: activation-aware tile scores, the scope of the selection, the calibration that
measures input scales, and RPP's proximal step pruning in the order the hard prune ranks."""

import pytest
import torch

import rpp_triton as rpp
from rpp_triton import tiles
from rpp_triton.training import controller as C
from rpp_triton.training.calibration import input_rms


def test_activation_score_is_weight_times_input_rms():
    w, s = torch.randn(4, 8), torch.rand(8) + 0.1
    torch.testing.assert_close(tiles.tile_scores(w, (1, 1), "activation", s), w.abs() * s[None, :])
    # tiles: the tile's RMS times the RMS of its input columns
    got = tiles.tile_scores(w, (2, 4), "activation", s)
    want = torch.empty(2, 2)
    for r in range(2):
        for c in range(2):
            tile, cols = w[2 * r : 2 * r + 2, 4 * c : 4 * c + 4], s[4 * c : 4 * c + 4]
            want[r, c] = tile.square().mean().sqrt() * cols.square().mean().sqrt()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="column_scale"):
        tiles.tile_scores(w, (1, 1), "activation")


def _pruned_share(mask, block, dim):
    """Share of pruned tiles along rows (dim=1) or of the whole mask (dim=None)."""
    kept = tiles.tile_rows(mask, block).all(-1)
    return (~kept).float().mean() if dim is None else (~kept).float().mean(dim)


@pytest.mark.parametrize("block", [(1, 1), (2, 4)], ids=lambda b: f"block={b[0]}x{b[1]}")
def test_row_and_layer_scopes_prune_the_target_share_of_each_group(block):
    torch.manual_seed(0)
    named = [("a", torch.randn(8, 32) * 10), ("b", torch.randn(16, 16))]  # a's weights are larger
    n_tiles = sum(w.numel() for _, w in named) // (block[0] * block[1])
    for scope in ("global", "layer", "row"):
        ws = [(n, w.clone()) for n, w in named]
        scores = [tiles.tile_scores(w, block) for _, w in ws]
        norms = dict(zip(("a", "b"), tiles.scope_normalizers(scores, 0.5, scope)))
        masks = tiles.hard_prune(ws, 0.5, block, normalizers=norms)
        pruned = sum(int((~tiles.tile_rows(m, block).all(-1)).sum()) for m in masks.values())
        assert pruned == n_tiles // 2  # always exactly the target overall
        if scope == "global":
            assert _pruned_share(masks["a"], block, None) < 0.3  # most of the large weights survive
        if scope == "layer":
            for m in masks.values():
                assert _pruned_share(m, block, None) == pytest.approx(0.5)
        if scope == "row":
            for m in masks.values():
                torch.testing.assert_close(
                    _pruned_share(m, block, 1), torch.full((m.shape[0] // block[0],), 0.5)
                )


def test_normalizers_come_from_the_weights_they_were_taken_on():
    scores = [torch.arange(1.0, 9.0).reshape(2, 4), torch.zeros(1, 4)]
    row = tiles.scope_normalizers(scores, 0.5, "row")
    assert row[0].flatten().tolist() == [2.0, 6.0]  # each row's own median
    assert float(row[1]) > 0  # an all-zero row divides by something finite
    assert float(tiles.scope_normalizers(scores, 0.5, "layer")[0]) == 4.0
    assert float(tiles.scope_normalizers(scores, 0.5, "global")[0]) == 1.0
    with pytest.raises(ValueError, match="scope"):
        tiles.scope_normalizers(scores, 0.5, "column")


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        return self.out(torch.relu(self.fc(self.emb(input_ids))))


def test_input_rms_is_the_rms_of_each_input_feature_over_real_tokens():
    torch.manual_seed(0)
    model = _Toy()
    blocks = [
        {"input_ids": [1, 2, 3, 0], "attention_mask": [1, 1, 1, 0]},
        {"input_ids": [4, 5, 0, 0], "attention_mask": [1, 1, 0, 0]},
    ]
    names = {id(model.fc.weight): "fc.weight", id(model.out.weight): "out.weight"}
    got = input_rms(model, names, blocks, batch_size=1)
    x = model.emb(torch.tensor([1, 2, 3, 4, 5])).detach()  # padding excluded
    torch.testing.assert_close(got["fc.weight"], x.square().mean(0).sqrt())
    h = torch.relu(model.fc(x)).detach()
    torch.testing.assert_close(got["out.weight"], h.square().mean(0).sqrt())
    assert model.training  # restored
    with pytest.raises(ValueError, match="no input reached"):
        input_rms(model, {**names, id(model.emb.weight): "emb.weight"}, blocks)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("reweight_every", [1, 0])
def test_rpp_prunes_the_lowest_scaled_scores(scope, reweight_every):
    """With no gradient the Adam update is zero, so one proximal step zeroes exactly the tiles
    lowest in RPP's ranking: rms(w) * m (m = input scale / scope normaliser) without reweighting,
    the hard prune's own order; rms(w)^2 * m with it (alpha = 1 / ((rms(w) + eps) * m))."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(16, 32)), torch.nn.Parameter(torch.randn(32, 16) * 3)]
    names = ["w0", "w1"]
    scales = {"w0": torch.rand(32) * 4 + 0.1, "w1": torch.rand(16) + 0.1}
    opt = rpp.RPPAdamW(
        [{"params": weights, "param_names": names}],
        lr=0.01,
        reweight_every=0,
        reweight_eps=1e-8,
        backend="torch",
    )
    ctl = C.RPPController(
        opt, 0.6, 1, 0, 2, 0, ramp=1.0, prune_by="activation", scope=scope, column_scales=scales,
        reweight_every=reweight_every, reweight_eps=1e-8,
    )  # fmt: skip
    # most of the target in one step, but not all of it: at the target itself each row's quantile
    # scores exactly 1 after normalisation, a tie the hard prune breaks by position
    share = ctl.scheduled(1)
    assert share == pytest.approx(0.525)
    power = 2 if reweight_every else 1
    ranks = [
        w.detach().abs() ** power * scales[n][None, :] / ctl.normalizers[n] for n, w in zip(names, weights)
    ]
    cut = torch.cat([r.flatten() for r in ranks]).sort().values[round(share * 1024) - 1]
    if not reweight_every:  # exactly the hard prune
        expected = [(n, w.detach().clone()) for n, w in zip(names, weights)]
        tiles.hard_prune(expected, share, 1, "activation", scales, ctl.normalizers)
        assert all(torch.equal(want == 0, r <= cut) for (_, want), r in zip(expected, ranks))
    ctl.prepare(0)
    for w in weights:
        w.grad = torch.zeros_like(w)
    opt.step()
    for name, r, w in zip(names, ranks, weights):
        # (at the threshold itself the soft threshold leaves rounding residue of ~1e-7)
        assert torch.equal(w.detach().abs() < 1e-5, r <= cut), name


def test_activation_score_needs_scales():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1)
    with pytest.raises(ValueError, match="column_scales"):
        C.RPPController(opt, 0.5, 1, 0, 10, 0, prune_by="activation")


def test_set_alpha_checks_what_it_is_given():
    w, b = torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.zeros(4))
    opt = rpp.RPPAdamW([{"params": [w]}, {"params": [b], "prune": False}], lr=0.01, block_size=(2, 4))
    opt.set_alpha({w: torch.full((2, 2), 3.0)})
    assert torch.equal(opt.state[w]["alpha"], torch.full((2, 2), 3.0))
    with pytest.raises(ValueError, match="not pruned"):
        opt.set_alpha({b: torch.ones(4)})
    with pytest.raises(ValueError, match="expected"):
        opt.set_alpha({w: torch.ones(3)})
