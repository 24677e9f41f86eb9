"""RPPAdamW against hand-checked values of docs/design.md's formula, torch.optim.AdamW, and itself."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rpp_triton as rpp
from rpp_triton.kernels.adam_prox import prox_ref
from rpp_triton.tiles import tile_rms as tile_rms_ref

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6)}


def param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def step_with(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.as_tensor(g, dtype=torch.float32).reshape(p.shape)
    opt.step()


# ---- hand-checked values -----------------------------------------------------------------------


def test_first_step_soft_threshold_by_hand():
    # Step 1: m_hat = g, v_hat = g^2, so the Adam update is lr * g / (|g| + eps) ~= lr * sign(g).
    p = param([1.0, -0.14, 0.02])
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=0.5, eps=1e-8)  # tau = lr * lambda * alpha = 0.05
    step_with(opt, [p], [[0.5, -2.0, 0.0]])
    # z = [0.9, -0.04, 0.02]; soft threshold at 0.05 -> [0.85, 0, 0]
    torch.testing.assert_close(p.detach(), torch.tensor([0.85, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert p[1].item() == 0.0 and p[2].item() == 0.0


def test_zero_gradient_is_pure_prox_by_hand():
    p = param([0.3, -0.05, -0.4, 0.0])
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=1.0)  # tau = 0.1, Adam moves nothing (g = 0)
    step_with(opt, [p], [[0.0] * 4])
    torch.testing.assert_close(p.detach(), torch.tensor([0.2, 0.0, -0.3, 0.0]), rtol=0, atol=1e-7)


def test_tiled_prox_by_hand():
    # One 2x2 tile [[3, 4], [0, 0]]: rms = sqrt(25 / 4) = 2.5, tau = 0.1 * 5 = 0.5 -> scale 0.8.
    # The other tile [[0.1, 0.1], [0.1, 0.1]] has rms 0.1 < tau -> exactly zero.
    p = param([[3.0, 4.0, 0.1, 0.1], [0.0, 0.0, 0.1, 0.1]])
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=5.0, block_size=2, reweight_every=1, reweight_eps=0.5)
    step_with(opt, [p], [torch.zeros(2, 4)])
    expected = torch.tensor([[2.4, 3.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
    assert torch.equal(p.detach()[:, 2:], torch.zeros(2, 2))
    # Reweighted from the pruned weights: rms = 0.8 * 2.5 = 2 -> 1 / (2 + 0.5); zero tile -> 1 / 0.5.
    torch.testing.assert_close(opt.state[p]["alpha"], torch.tensor([[0.4, 2.0]]))


def test_rectangular_tiles_and_zero_tile_stay_finite():
    p = param([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 2.0]])  # tiles of 2x2: one all-zero, one not
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=1.0, block_size=(2, 2), reweight_every=1)
    step_with(opt, [p], [torch.zeros(2, 4)])
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["alpha"]).all()
    assert torch.equal(p.detach()[:, :2], torch.zeros(2, 2))
    # Tile [[0, 2], [0, 2]]: rms = sqrt(8 / 4) = sqrt(2); scale = 1 - 0.1 / sqrt(2).
    torch.testing.assert_close(p.detach()[:, 3], torch.full((2,), 2 * (1 - 0.1 / math.sqrt(2))))


def test_reweighting_only_on_multiples_of_reweight_every():
    p = param([0.5, 1.0, 2.0])
    opt = rpp.RPPAdamW([p], lr=0.01, rpp_lambda=0.1, reweight_every=3, reweight_eps=0.25)
    for step in range(1, 7):
        before = p.detach().clone()
        step_with(opt, [p], [[0.1, -0.1, 0.1]])
        alpha = opt.state[p]["alpha"]
        if step % 3:
            assert step < 3 or not torch.equal(alpha, torch.ones(3))
            if step < 3:
                assert torch.equal(alpha, torch.ones(3))
        else:
            torch.testing.assert_close(alpha, 1.0 / (p.detach().abs() + 0.25))
        assert not torch.equal(before, p.detach())
    # Between reweight steps alpha holds the value computed at the last multiple.
    alpha3 = None
    p2 = param([0.5, 1.0, 2.0])
    opt2 = rpp.RPPAdamW([p2], lr=0.01, rpp_lambda=0.1, reweight_every=3, reweight_eps=0.25)
    for step in range(1, 6):
        step_with(opt2, [p2], [[0.1, -0.1, 0.1]])
        if step == 3:
            alpha3 = opt2.state[p2]["alpha"].clone()
        if step in (4, 5):
            assert torch.equal(opt2.state[p2]["alpha"], alpha3)


def test_reweight_every_zero_never_reweights():
    p = param([0.5, 1.0, 2.0])
    opt = rpp.RPPAdamW([p], lr=0.01, rpp_lambda=0.1, reweight_every=0)
    for _ in range(4):
        step_with(opt, [p], [[0.1, -0.1, 0.1]])
    assert torch.equal(opt.state[p]["alpha"], torch.ones(3))


# ---- against torch.optim.AdamW and across modes ------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_unpruned_group_matches_torch_adamw(weight_decay):
    shapes = [(7, 13), (5,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = rpp.RPPAdamW([{"params": ours, "prune": False}], lr=1e-2, weight_decay=weight_decay)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=weight_decay)
    for _ in range(10):
        grads = [torch.randn(s) for s in shapes]
        step_with(opt, ours, grads)
        step_with(ref_opt, ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_lambda_zero_pruned_group_matches_adamw():
    ours = torch.nn.Parameter(torch.randn(8, 8))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt = rpp.RPPAdamW([ours], lr=1e-2, rpp_lambda=0.0, block_size=4, reweight_every=2)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for _ in range(6):
        g = torch.randn(8, 8)
        step_with(opt, [ours], [g])
        step_with(ref_opt, [ref], [g])
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])


@pytest.mark.parametrize("block", [1, 4, (2, 8)], ids=lambda b: f"block={b}")
def test_frozen_masks_keep_pruned_weights_exactly_zero(block):
    p = torch.nn.Parameter(torch.randn(16, 16))
    opt = rpp.RPPAdamW([p], lr=0.05, rpp_lambda=2.0, block_size=block, reweight_every=1)
    for _ in range(5):
        step_with(opt, [p], [torch.randn(16, 16)])
    assert 0.0 < opt.sparsity() < 1.0
    opt.freeze_masks()
    mask = opt.masks()[p].clone()
    for _ in range(20):
        step_with(opt, [p], [torch.randn(16, 16)])
    assert torch.equal(p.detach()[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(opt.masks()[p], mask)
    assert (p.detach()[mask] != 0).all()  # kept weights still train


def test_freeze_with_explicit_masks_regrows_kept_zero_tiles():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=0.0, block_size=2)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:2, :2] = True  # a tile that is zero now but was chosen to stay
    opt.freeze_masks({p: keep})
    p.grad = torch.ones(4, 4)
    opt.step()
    assert (p.detach()[:2, :2] != 0).all() and torch.equal(p.detach()[2:], torch.zeros(2, 4))
    assert torch.equal(opt.masks()[p], keep)
    with pytest.raises(ValueError, match="shape"):
        opt.freeze_masks({p: torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not pruned"):
        opt.freeze_masks({torch.nn.Parameter(torch.ones(1)): torch.ones(1, dtype=torch.bool)})


def test_masks_are_tile_level_and_sparsity_counts_elements():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    q = torch.nn.Parameter(torch.zeros(3))
    with torch.no_grad():
        p[0, 0] = 1.0  # one element keeps the whole top-left 2x2 tile
    opt = rpp.RPPAdamW([{"params": [p], "block_size": 2}, {"params": [q], "prune": False}])
    mask = opt.masks()[p]
    assert mask.dtype == torch.bool and mask.shape == p.shape
    assert mask[:2, :2].all() and not mask[2:].any() and not mask[:, 2:].any()
    assert q not in opt.masks()
    assert opt.sparsity() == 15 / 16


def test_params_without_grad_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = rpp.RPPAdamW([a, b], lr=0.1)
    before = b.detach().clone()
    a.grad = torch.randn(4)
    opt.step()
    assert torch.equal(b.detach(), before) and b not in opt.state
    assert opt.state[a]["step"] == 1


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    groups = [
        {"params": [model[0].weight], "block_size": 2, "reweight_every": 2},
        {"params": [model[1].weight], "block_size": 1, "reweight_every": 3},
        {"params": [model[0].bias, model[1].bias], "prune": False},
    ]
    opt = rpp.RPPAdamW(groups, lr=0.05, rpp_lambda=0.5)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(12)]

    def run(model, opt, steps):
        for gs in steps:
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()

    run(model, opt, grads[:5])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    run(model, opt, grads[5:8])
    opt.freeze_masks()
    run(model, opt, grads[8:])

    model2 = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model2.load_state_dict(saved_model)
    groups2 = [
        {"params": [model2[0].weight], "block_size": 2, "reweight_every": 2},
        {"params": [model2[1].weight], "block_size": 1, "reweight_every": 3},
        {"params": [model2[0].bias, model2[1].bias], "prune": False},
    ]
    opt2 = rpp.RPPAdamW(groups2, lr=0.05, rpp_lambda=0.5)
    opt2.load_state_dict(saved_opt)
    run(model2, opt2, grads[5:8])
    opt2.freeze_masks()
    run(model2, opt2, grads[8:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for k in ("alpha", "exp_avg", "exp_avg_sq", "mask"):
        assert torch.equal(opt.state[model[0].weight][k], opt2.state[model2[0].weight][k])

    # The frozen flag and masks themselves round-trip too.
    opt3 = rpp.RPPAdamW(groups2, lr=0.05)
    opt3.load_state_dict(opt.state_dict())
    assert all(g["frozen"] for g in opt3.param_groups if g["prune"])
    assert torch.equal(opt3.masks()[model2[0].weight], opt.masks()[model[0].weight])


def trained(shape=(8, 8), **options):
    """An RPPAdamW over one weight named 'enc.weight', after two steps, and that weight."""
    w = torch.nn.Parameter(torch.randn(shape))
    opt = rpp.RPPAdamW([{"params": [("enc.weight", w)], **options}], lr=0.05, rpp_lambda=0.5)
    for _ in range(2):
        step_with(opt, [w], [torch.randn(shape)])
    return opt, w


def saved_with(group=None, state=None, drop=None, **options):
    """The state dict of `trained(**options)` with its group and the weight's state edited."""
    state_dict = copy.deepcopy(trained(**options)[0].state_dict())
    state_dict["param_groups"][0].update(group or {})
    state_dict["state"][0].update(state or {})
    if drop:
        del state_dict["state"][0][drop]
    return state_dict


# case: (options of the optimizer that loads, what it loads, what the error says)
LOAD_ERRORS = {
    "other shape": (
        dict(shape=(4, 16)),
        dict(),
        r"'enc.weight'.*exp_avg of shape \(8, 8\), expected \(4, 16\)",
    ),
    "tiles into 1x1": ({}, dict(block_size=4), r"block_size=\(4, 4\).*\(1, 1\)"),
    "1x1 into tiles": (dict(block_size=4), dict(), r"block_size=\(1, 1\).*\(4, 4\)"),
    "lr=nan": ({}, dict(group={"lr": float("nan")}), "lr=nan"),
    "block_size=(0, 0)": ({}, dict(group={"block_size": (0, 0)}), r"block_size=\(0, 0\)"),
    "frozen=1": ({}, dict(group={"frozen": 1}), "frozen=1"),
    "no nonfinite": ({}, dict(drop="nonfinite"), r"'enc.weight'.*lacks \['nonfinite'\]"),
    "step=-1": ({}, dict(state={"step": -1}), "step=-1"),
    "alpha of other tiles": ({}, dict(state={"alpha": torch.ones(4, 4)}), r"alpha of shape \(4, 4\)"),
}


@pytest.mark.parametrize("case", LOAD_ERRORS, ids=str)
def test_load_state_dict_checks_first_and_leaves_the_optimizer_as_it_was(case):
    options, edits, message = LOAD_ERRORS[case]
    state_dict = saved_with(**edits)
    opt, w = trained(**options)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in before["state"][0].items():
        assert torch.equal(torch.as_tensor(after["state"][0][key]), torch.as_tensor(value))
    step_with(opt, [w], [torch.randn(w.shape)])  # and it still steps


def test_load_state_dict_group_count_must_match():
    opt, _ = trained()
    state_dict = opt.state_dict()
    two = rpp.RPPAdamW([torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(3))])
    two.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))]})
    with pytest.raises(ValueError, match="2 param groups|1 param groups"):
        two.load_state_dict(state_dict)


def test_sparsity_rises_with_lambda():
    torch.manual_seed(3)
    x = torch.randn(256, 32)
    w_true = torch.randn(16, 32) * (torch.rand(16, 32) < 0.5)
    y = x @ w_true.T
    sparsities = []
    for lam in [0.0, 0.05, 0.2, 1.0, 5.0]:
        w = torch.nn.Parameter(torch.zeros(16, 32) + 0.1)
        opt = rpp.RPPAdamW([w], lr=0.05, rpp_lambda=lam, reweight_every=5)
        for _ in range(60):
            opt.zero_grad()
            loss = ((x @ w.T - y) ** 2).mean()
            loss.backward()
            opt.step()
        sparsities.append(opt.sparsity())
    assert sparsities == sorted(sparsities), sparsities
    assert sparsities[0] == 0.0 and sparsities[-1] > 0.9


def test_compiled_and_eager_paths_agree(monkeypatch):
    from rpp_triton import optim

    def run():
        torch.manual_seed(5)
        w = torch.nn.Parameter(torch.randn(8, 16))
        v = torch.nn.Parameter(torch.randn(40))
        b = torch.nn.Parameter(torch.randn(8))
        opt = rpp.RPPAdamW(
            [
                {"params": [w], "block_size": (4, 8)},
                {"params": [v], "block_size": 1},
                {"params": [b], "prune": False},
            ],
            lr=0.05,
            rpp_lambda=1.0,
            reweight_every=2,
            weight_decay=0.01,
        )
        for i in range(8):
            if i == 5:
                opt.freeze_masks()
            step_with(opt, [w, v, b], [torch.randn(8, 16), torch.randn(40), torch.randn(8)])
        return [t.detach().clone() for t in (w, v, b)]

    compiled = run()
    monkeypatch.setenv("RPP_TRITON_COMPILE", "0")
    monkeypatch.setattr(optim, "_compiled", {})
    eager = run()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        assert torch.equal(a == 0, b == 0)


def test_compiling_leaves_the_users_dynamo_settings_alone(monkeypatch):
    from rpp_triton import optim

    monkeypatch.setenv("RPP_TRITON_COMPILE", "1")
    monkeypatch.setattr(optim, "_compiled", {})
    with torch._dynamo.config.patch(recompile_limit=3):
        for block in (1, 2):  # two compiled variants
            p = torch.nn.Parameter(torch.randn(4, 4))
            opt = rpp.RPPAdamW([p], lr=0.1, block_size=block)
            step_with(opt, [p], [torch.randn(4, 4)])
        assert torch._dynamo.config.recompile_limit == 3


# ---- non-finite gradients ----------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 2], ids=lambda b: f"block={b}")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_gradient_elements_are_skipped_and_counted(block, bad):
    # lambda = 0, so the proximal step is the identity and the Adam update is all that moves p.
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = rpp.RPPAdamW([p], lr=0.1, rpp_lambda=0.0, block_size=block)
    g = torch.full((4, 4), 0.5)
    g[1, 2] = bad
    step_with(opt, [p], [g])
    assert torch.isfinite(p).all()
    assert p[1, 2].item() == 1.0 and opt.state[p]["exp_avg"][1, 2].item() == 0.0
    assert opt.state[p]["exp_avg_sq"][1, 2].item() == 0.0
    others = torch.ones(4, 4, dtype=torch.bool)
    others[1, 2] = False
    torch.testing.assert_close(p.detach()[others], torch.full((15,), 0.9), rtol=0, atol=1e-6)
    assert opt.nonfinite_skipped() == 1
    step_with(opt, [p], [torch.full((4, 4), 0.5)])  # a clean step afterwards updates everything
    assert p[1, 2].item() < 1.0 and opt.nonfinite_skipped() == 1


# ---- property tests on the reference maths -----------------------------------------------------

tiles = st.sampled_from([(1, 1), (2, 2), (1, 4), (4, 2)])


@settings(max_examples=40, deadline=None)
@given(block=tiles, tau=st.floats(0, 3), seed=st.integers(0, 2**16))
def test_prox_never_increases_tile_norm(block, tau, seed):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 8, generator=gen) * torch.rand(1, generator=gen) * 4
    rows, cols = 8 // block[0], 8 // block[1]
    tau_t = torch.full((8, 8) if block == (1, 1) else (rows, cols), tau)
    out = prox_ref(z, tau_t, block)
    assert (tile_rms_ref(out, block) <= tile_rms_ref(z, block) + 1e-6).all()
    # Shrinks every tile by exactly tau in rms, or to zero.
    expected = (tile_rms_ref(z, block) - tau).clamp_min(0)
    torch.testing.assert_close(tile_rms_ref(out, block), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(block=tiles, seed=st.integers(0, 2**16))
def test_prox_with_zero_tau_is_identity(block, seed):
    z = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
    rows, cols = 8 // block[0], 8 // block[1]
    tau = torch.zeros((8, 8) if block == (1, 1) else (rows, cols))
    assert torch.equal(prox_ref(z, tau, block), z)


# ---- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(lr=-1.0), "lr"),
        (dict(rpp_lambda=-0.1), "rpp_lambda"),
        (dict(betas=(1.0, 0.999)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(reweight_eps=0.0), "reweight_eps"),
        (dict(reweight_every=-1), "reweight_every"),
        (dict(block_size=0), "block_size"),
        (dict(backend="cuda"), "backend"),
        (dict(eps=float("nan")), "eps"),
    ],
    ids=lambda x: str(x),
)
def test_bad_hyperparameters_raise_naming_them(kwargs, word):
    with pytest.raises(ValueError, match=word.replace("[", r"\[").replace("]", r"\]")):
        rpp.RPPAdamW([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_tile_that_does_not_divide_names_the_parameter():
    model = torch.nn.Linear(10, 6)
    with pytest.raises(ValueError, match=r"'weight'.*\(6, 10\)"):
        rpp.RPPAdamW([{"params": [("weight", model.weight)], "block_size": 4}])


def test_one_dimensional_parameter_in_tiled_group_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        rpp.RPPAdamW([torch.nn.Parameter(torch.randn(8))], block_size=2)
    # ... but fine when the group is not pruned, or uses 1x1 tiles.
    rpp.RPPAdamW([{"params": [torch.nn.Parameter(torch.randn(8))], "prune": False}], block_size=2)
    rpp.RPPAdamW([torch.nn.Parameter(torch.randn(8))], block_size=1)


def test_triton_backend_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.nn.Parameter(torch.randn(4))
    opt = rpp.RPPAdamW([p], backend="triton")
    p.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()


# ---- param_groups ------------------------------------------------------------------------------


def _names(groups, prune):
    return {n for g in groups if g["prune"] == prune for n in g["param_names"]}


def test_param_groups_for_bert():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    model = BertForSequenceClassification(config)
    groups = rpp.param_groups(model, lr=1e-3, block_size=8)
    pruned = _names(groups, True)
    expected = {
        f"bert.encoder.layer.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert pruned == expected
    rest = _names(groups, False)
    assert "bert.pooler.dense.weight" in rest and "classifier.weight" in rest
    assert "bert.embeddings.word_embeddings.weight" in rest
    assert not any("LayerNorm" in n or n.endswith("bias") for n in pruned)
    opt = rpp.RPPAdamW(groups)
    assert opt.param_groups[0]["block_size"] == (8, 8) and opt.param_groups[0]["lr"] == 1e-3


def test_param_groups_for_distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    pruned = _names(rpp.param_groups(DistilBertModel(config)), True)
    assert pruned == {
        f"transformer.layer.0.{m}.weight"
        for m in (
            "attention.q_lin",
            "attention.k_lin",
            "attention.v_lin",
            "attention.out_lin",
            "ffn.lin1",
            "ffn.lin2",
        )
    }
