"""RPPLamb against hand-computed values of the LAMB formula in docs/design.md and a textbook LAMB.

The kernel against the PyTorch path, the state round trip and strided weights are in
test_adam_prox.py, run for both optimizers.
"""

import math

import pytest
import torch

import rpp_triton as rpp

EPS = 1e-8


def param(values):
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


def first_step(values, grads, **options):
    """The weights after one RPPLamb step from `values` with gradient `grads`."""
    p = param(values)
    opt = rpp.RPPLamb([p], **{"rpp_lambda": 0.0, "eps": EPS, **options})
    p.grad = torch.tensor(grads, dtype=torch.float32)
    opt.step()
    return p.detach(), opt


# ---- hand-computed first steps (m_hat = g, v_hat = g^2, so r = g / (|g| + eps) + wd * p) ---------


def test_trust_ratio_scales_the_adam_direction_by_hand():
    # ||p|| = 5, r ~= [1, -1], ||r|| = sqrt(2): trust = 5 / sqrt(2), z = p - lr * trust * r.
    p, _ = first_step([3.0, 4.0], [0.5, -2.0], lr=0.1)
    step = 0.1 * 5 / math.sqrt(2)
    torch.testing.assert_close(p, torch.tensor([3.0 - step, 4.0 + step]), rtol=0, atol=1e-6)


def test_trust_ratio_is_one_when_the_weight_norm_is_zero():
    p, _ = first_step([0.0, 0.0], [2.0, -0.5], lr=0.1)
    torch.testing.assert_close(p, torch.tensor([-0.1, 0.1]), rtol=0, atol=1e-6)


def test_trust_ratio_is_one_when_the_update_norm_is_zero():
    # g = 0 and no weight decay: r = 0, so ||p|| / ||r|| would be inf and inf * 0 NaN.
    p, _ = first_step([3.0, -4.0], [0.0, 0.0], lr=0.1)
    assert torch.equal(p, torch.tensor([3.0, -4.0]))


def test_weight_decay_is_inside_the_ratio():
    # g = 0, so r = wd * p and trust = ||p|| / (wd ||p||) = 1 / wd: z = p - lr * p whatever wd is.
    # (Decay outside the ratio, as in AdamW, would give p - lr * wd * p.)
    for wd in (0.5, 0.25):
        p, _ = first_step([3.0, -4.0], [0.0, 0.0], lr=0.1, weight_decay=wd)
        torch.testing.assert_close(p, torch.tensor([2.7, -3.6]), rtol=1e-6, atol=0)


def test_proximal_step_uses_lr_not_the_trust_ratio_by_hand():
    # ||p|| = 5, r ~= [1, -1, 1], trust = 5 / sqrt(3): z = p - 0.01 * trust * r; then the soft
    # threshold at tau = lr * lambda = 0.02 (not multiplied by trust).
    p, opt = first_step([3.0, 4.0, 0.0], [1.0, -1.0, 1.0], lr=0.01, rpp_lambda=2.0, reweight_every=1)
    step = 0.01 * 5 / math.sqrt(3)
    z = torch.tensor([3.0 - step, 4.0 + step, -step])
    expected = z.sign() * (z.abs() - 0.02).clamp_min(0)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["alpha"], 1 / (p.abs() + 1e-3))


def test_tiles_prune_after_the_trust_ratio_update():
    # One 2x2 tile per half; g = 0, wd = 0.5: z = (1 - lr) * p = 0.9 p. Tile [[3, 4], [0, 0]] has
    # rms(z) = 0.9 * 2.5 = 2.25 and tau = 0.1 * 5 = 0.5: scale 1 - 0.5 / 2.25. The small tile goes.
    values = [[3.0, 4.0, 0.1, 0.1], [0.0, 0.0, 0.1, 0.1]]
    p, opt = first_step(values, [[0.0] * 4] * 2, lr=0.1, weight_decay=0.5, rpp_lambda=5.0, block_size=2)
    expected = 0.9 * torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * (1 - 0.5 / 2.25)
    torch.testing.assert_close(p[:, :2], expected, rtol=1e-6, atol=0)
    assert torch.equal(p[:, 2:], torch.zeros(2, 2))
    assert opt.sparsity() == 6 / 8  # the pruned tile and the kept tile's two zeros


def test_nonfinite_gradient_elements_count_as_zero_update():
    # The NaN element keeps its value and r = 0 there: ||r|| = sqrt(2), ||p|| = sqrt(9 + 16 + 144).
    p, opt = first_step([3.0, 4.0, 12.0], [1.0, -1.0, float("nan")], lr=0.1)
    step = 0.1 * 13 / math.sqrt(2)
    torch.testing.assert_close(p, torch.tensor([3.0 - step, 4.0 + step, 12.0]), rtol=0, atol=1e-6)
    assert opt.nonfinite_skipped() == 1


# ---- against a textbook LAMB, many steps ---------------------------------------------------------


def textbook_lamb(params, grads_per_step, lr, betas, eps, weight_decay):
    """LAMB written out from the formula: m, v, bias corrections, r, trust ratio per tensor."""
    beta1, beta2 = betas
    ps = [p.clone() for p in params]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    for t, grads in enumerate(grads_per_step, start=1):
        for p, g, m, v in zip(ps, grads, ms, vs):
            m.mul_(beta1).add_((1 - beta1) * g)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            r = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps) + weight_decay * p
            p_norm, r_norm = p.norm(), r.norm()
            trust = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
            p.sub_(lr * trust * r)
    return ps


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_unpruned_group_matches_textbook_lamb(weight_decay, backend):
    shapes = [(7, 13), (5,), (3, 4, 5)]
    start = [torch.randn(s) for s in shapes]
    steps = [[torch.randn(s) for s in shapes] for _ in range(8)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    opt = rpp.RPPLamb(
        [{"params": ours, "prune": False}],
        lr=1e-2,
        weight_decay=weight_decay,
        betas=(0.8, 0.99),
        backend=backend,
    )
    for grads in steps:
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
    expected = textbook_lamb(start, steps, lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=weight_decay)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


def test_lamb_steps_scale_with_the_weight_norm():
    torch.manual_seed(4)
    w = torch.randn(8, 8) * 5
    steps = [torch.randn(8, 8) for _ in range(3)]
    result = {}
    for optimizer in (rpp.RPPAdamW, rpp.RPPLamb):
        p = torch.nn.Parameter(w.clone())
        opt = optimizer([p], lr=0.01, rpp_lambda=0.0)
        for g in steps:
            p.grad = g.clone()
            opt.step()
        result[optimizer] = p.detach()
    # ||p|| ~ 40 against ||r|| ~ 8: LAMB takes ~5x AdamW's steps here.
    moved = {k: (v - w).norm() for k, v in result.items()}
    assert moved[rpp.RPPLamb] > 3 * moved[rpp.RPPAdamW]


# ---- options, checks, masks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(lr=float("nan")), "lr"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(block_size=(0, 0)), "block_size"),
        (dict(reweight_every=1.5), "reweight_every"),
        (dict(backend="gpu"), "backend"),
    ],
    ids=lambda x: str(x),
)
def test_bad_hyperparameters_raise_naming_them(kwargs, word):
    with pytest.raises(ValueError, match=rf"RPPLamb: invalid {word}"):
        rpp.RPPLamb([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_load_state_dict_is_checked_as_for_rppadamw():
    w = torch.nn.Parameter(torch.randn(8, 8))
    opt = rpp.RPPLamb([{"params": [("enc.weight", w)], "block_size": 4}], lr=0.05)
    w.grad = torch.randn(8, 8)
    opt.step()
    state_dict = opt.state_dict()
    other = rpp.RPPLamb([{"params": [("enc.weight", torch.nn.Parameter(torch.randn(8, 8)))]}], lr=0.05)
    with pytest.raises(ValueError, match=r"RPPLamb: param group 0 of the state has block_size=\(4, 4\)"):
        other.load_state_dict(state_dict)


def test_freeze_masks_sparsity_and_param_groups_work_as_for_rppadamw():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    model = BertModel(config)
    groups = rpp.param_groups(model, lr=0.05, rpp_lambda=0.2, block_size=8)
    with torch.no_grad():
        for w in groups[0]["params"]:  # tile-rows of rms ~0.002 to ~0.06: some go, some stay
            w.mul_(torch.linspace(0.1, 3.0, w.shape[0])[:, None])
    opt = rpp.RPPLamb(groups)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert 0 < opt.sparsity() < 1
    opt.freeze_masks()
    masks = {p: m.clone() for p, m in opt.masks().items()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for p, mask in masks.items():
        assert torch.equal(p.detach()[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(opt.masks()[p], mask)
