"""The least-squares refit of the kept weights at the hard prune: the solve itself against a direct
least-squares fit, the input second-moment matrices it is given, and the controller applying it."""

import pytest
import torch

import rpp_triton as rpp
from rpp_triton.refit import refit_kept
from rpp_triton.training import controller as C
from rpp_triton.training.calibration import input_gram, input_rms
from rpp_triton.training.config import PruneConfig


def _inputs(tokens=200, features=12, seed=0):
    """Correlated inputs (a random mixing of independent features), so the kept weights can stand in
    for the pruned ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features, generator=g) @ torch.randn(features, features, generator=g)


def test_refit_is_the_least_squares_fit_of_each_row_on_its_kept_inputs():
    x = _inputs().double()
    w0 = torch.randn(6, 12, dtype=torch.float64)
    mask = torch.rand(6, 12) < 0.5
    mask[0] = False  # a row that keeps nothing
    mask[1] = True  # a row that keeps everything
    mask[2, :] = False
    mask[2, 3] = True  # and one that keeps a single input
    got = refit_kept(w0, mask, x.T @ x / x.shape[0], damp=0.0)
    assert got.dtype == w0.dtype and torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    for r in range(6):
        kept = mask[r].nonzero().flatten()
        if len(kept) == 0:
            continue
        want = torch.linalg.lstsq(x[:, kept], x @ w0[r]).solution
        torch.testing.assert_close(got[r, kept], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], w0[1], rtol=1e-4, atol=1e-4)  # nothing pruned: nothing to absorb


@pytest.mark.parametrize("rows_per_solve", [1, 4, 64])
def test_refit_reproduces_the_layer_output_better_than_masking(rows_per_solve):
    x = _inputs(tokens=400, features=32, seed=1)
    w0 = torch.randn(20, 32)
    scores = w0.abs() * x.square().mean(0).sqrt()
    mask = scores > scores.quantile(0.7, dim=1, keepdim=True)
    got = refit_kept(w0, mask, x.T @ x / x.shape[0], rows_per_solve=rows_per_solve)

    def error(w):
        return float((x @ (w - w0).T).square().mean())

    assert error(got) < 0.8 * error(w0 * mask)
    # the batching by kept count does not change the answer
    torch.testing.assert_close(got, refit_kept(w0, mask, x.T @ x / x.shape[0], rows_per_solve=7))


def test_refit_checks_its_shapes():
    with pytest.raises(ValueError, match="gram"):
        refit_kept(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool), torch.eye(3))
    with pytest.raises(ValueError, match="mask"):
        refit_kept(torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool), torch.eye(4))


class _Shared(torch.nn.Module):
    """Two layers reading the same input (as a query and a key do), a third reading another."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.q, self.k = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 2)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        return self.out(torch.relu(self.q(x) + self.k(x)))


def test_input_gram_is_the_second_moment_of_real_tokens_shared_by_layers_with_one_input():
    torch.manual_seed(0)
    model = _Shared()
    blocks = [
        {"input_ids": [1, 2, 3, 0], "attention_mask": [1, 1, 1, 0]},
        {"input_ids": [4, 5, 0, 0], "attention_mask": [1, 1, 0, 0]},
    ]
    names = {id(m.weight): f"{n}.weight" for n, m in (("q", model.q), ("k", model.k), ("out", model.out))}
    grams = input_gram(model, names, blocks, batch_size=1)
    x = model.emb(torch.tensor([1, 2, 3, 4, 5])).detach()  # padding excluded
    torch.testing.assert_close(grams["q.weight"], x.T @ x / 5)
    assert grams["k.weight"] is grams["q.weight"]
    h = torch.relu(model.q(x) + model.k(x)).detach()
    torch.testing.assert_close(grams["out.weight"], h.T @ h / 5)
    rms = input_rms(model, names, blocks, batch_size=1)
    for name, g in grams.items():
        torch.testing.assert_close(g.diagonal().sqrt(), rms[name])


def _hard_prune_after_training(**kwargs):
    """Two weights, an RPP controller given `kwargs` (rewind, grams), weights moved and shrunk as
    training would, then the hard prune to 50%: ({name: weight before}, [weights], controller)."""
    weights = [torch.nn.Parameter(torch.randn(16, 24)), torch.nn.Parameter(torch.randn(8, 16))]
    start = {f"w{i}": w.detach().clone() for i, w in enumerate(weights)}
    opt = rpp.RPPAdamW([{"params": weights, "param_names": list(start)}], lr=0.01, backend="torch")
    controller = C.RPPController(opt, 0.5, 1, 0, 10, 5, rewind=start, **kwargs)
    with torch.no_grad():
        for w in weights:
            w.mul_(0.3).add_(0.01)
    controller._final_prune()
    assert controller.last_sparsity == pytest.approx(0.5, abs=0.01)
    return start, weights, controller


def test_rewind_returns_kept_weights_to_their_values_before_pruning():
    start, weights, _ = _hard_prune_after_training()
    for (name, before), w in zip(start.items(), weights):
        kept = w != 0
        assert torch.equal(w[kept], before[kept]), name


def test_the_hard_prune_refits_the_kept_weights_to_the_starting_layer():
    xs = {"w0": _inputs(300, 24), "w1": _inputs(300, 16, seed=2)}
    grams = {name: x.T @ x / x.shape[0] for name, x in xs.items()}
    start, weights, controller = _hard_prune_after_training(grams=grams)
    for (name, before), w in zip(start.items(), weights):
        mask = w != 0
        torch.testing.assert_close(w.detach(), refit_kept(before, mask, grams[name]))
        x = xs[name]
        refit_error = (x @ (w.detach() - before).T).square().mean()
        assert refit_error < (x @ (before * mask - before).T).square().mean()  # better than rewinding
    with pytest.raises(ValueError, match="rewind"):
        C.RPPController(controller.optimizer, 0.5, 1, 0, 10, 5, grams=grams)


def test_defaults_refit_for_rpp_only_and_decay_the_learning_rate():
    for method, debias in (("rpp", "refit"), ("gmp", "none"), ("oneshot", "none")):
        cfg = PruneConfig(output_dir="x", method=method).resolved()
        assert cfg.debias == debias and cfg.lr_scheduler_type == "linear"
    assert PruneConfig(output_dir="x", optimizer="lamb").resolved().lr_scheduler_type == "polynomial"
    assert PruneConfig(output_dir="x", debias="rewind").resolved().debias == "rewind"
