"""The fused Triton RPP step against the PyTorch reference, in the interpreter on CPU (or on a GPU)."""

import io

import pytest
import torch

import rpp_triton as rpp
from rpp_triton.kernels.adam_prox import (
    MODE_ADAMW,
    MODE_FROZEN,
    MODE_SOFT,
    MODE_TILES,
    adam_prox,
    adam_scalars,
    lamb_trust_ref,
    rpp_step_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel against the reference, both computing in fp32. The interpreter rounds like PyTorch's CPU
# ops; on a GPU the compiler may fuse multiply-adds and round sqrt/div differently (~1 ulp per op).
_ATOL = 1e-6 if DEVICE == "cpu" else 1e-5
TOL = {torch.float32: dict(rtol=1e-5, atol=_ATOL), torch.bfloat16: dict(rtol=1e-5, atol=_ATOL)}
HP = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

# Odd sizes on purpose: smaller than one program's block, not multiples of it, tiles that are not
# powers of two, a single tile.
CASES = [
    (MODE_ADAMW, (1, 1), [(5, 7), (300,), (1,)]),
    (MODE_FROZEN, (1, 1), [(5, 7), (33, 65)]),
    (MODE_SOFT, (1, 1), [(3,), (17, 31), (4100,)]),
    (MODE_TILES, (4, 8), [(8, 16), (12, 40), (4, 8)]),
    (MODE_TILES, (3, 5), [(6, 10), (9, 25)]),
    (MODE_TILES, (1, 4), [(3, 8)]),
]


MODE_NAMES = {MODE_ADAMW: "unpruned", MODE_FROZEN: "frozen", MODE_SOFT: "soft", MODE_TILES: "tiles"}


def case_id(value) -> str:
    if isinstance(value, list):
        return f"{len(value)}tensors"
    return f"block={value}" if isinstance(value, tuple) else MODE_NAMES[value]


def make_tensors(shapes, mode, block, gdtype):
    ps = [torch.randn(s, device=DEVICE) for s in shapes]
    gs = [torch.randn(s, device=DEVICE).to(gdtype) for s in shapes]
    ms = [torch.randn(s, device=DEVICE) * 0.1 for s in shapes]
    vs = [torch.rand(s, device=DEVICE) * 0.1 for s in shapes]
    if mode == MODE_TILES:
        aux = [torch.rand(s[0] // block[0], s[1] // block[1], device=DEVICE) + 0.5 for s in shapes]
    elif mode == MODE_SOFT:
        aux = [torch.rand(s, device=DEVICE) + 0.5 for s in shapes]
    elif mode == MODE_FROZEN:
        aux = [torch.rand(s, device=DEVICE) > 0.5 for s in shapes]
    else:
        aux = [None] * len(shapes)
    return ps, gs, ms, vs, aux


@pytest.mark.parametrize("lamb", [False, True], ids=["adamw", "lamb"])
@pytest.mark.parametrize("reweight", [False, True], ids=["plain", "reweight"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16], ids=["g=fp32", "g=bf16"])
@pytest.mark.parametrize("mode, block, shapes", CASES, ids=lambda c: case_id(c))
def test_kernel_matches_reference(mode, block, shapes, gdtype, reweight, lamb):
    ps, gs, ms, vs, aux = make_tensors(shapes, mode, block, gdtype)
    gs[0].view(-1)[0] = float("nan")  # a non-finite gradient element: skipped and counted
    ref = [[t.clone() if t is not None else None for t in ts] for ts in (ps, ms, vs, aux)]
    counters = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in shapes]
    step_size, inv_sqrt_bias2 = adam_scalars(HP["lr"], HP["beta1"], HP["beta2"], 3)
    sc = dict(step_size=step_size, inv_sqrt_bias2=inv_sqrt_bias2)
    inv_bias1 = 1 / (1 - HP["beta1"] ** 3)
    kernel_aux = [a.view(torch.uint8) if a is not None and a.dtype == torch.bool else a for a in aux]
    plan = adam_prox(
        ps, gs, ms, vs, kernel_aux, counters, **HP, **sc, rpp_lambda=2.0,
        reweight_eps=1e-3, mode=mode, block=block, reweight=reweight, lamb=lamb, inv_bias1=inv_bias1,
    )  # fmt: skip
    moments = {k: v for k, v in HP.items() if k != "lr"}
    for i in range(len(shapes)):
        rp, rm, rv, ra = (ts[i] for ts in ref)
        if lamb:
            trust = lamb_trust_ref(
                rp, gs[i], rm, rv, **moments, inv_bias1=inv_bias1, inv_sqrt_bias2=inv_sqrt_bias2
            )
            torch.testing.assert_close(plan.lamb["trust"][i], trust, rtol=1e-5, atol=0)
        alpha = ra if mode in (MODE_SOFT, MODE_TILES) else None
        mask = ra if mode == MODE_FROZEN else None
        rpp_step_ref(
            rp, gs[i], rm, rv, alpha, mask, **HP, **sc, rpp_lambda=2.0, reweight_eps=1e-3,
            block=block if mode == MODE_TILES else (1, 1), prune=mode != MODE_ADAMW,
            frozen=mode == MODE_FROZEN, reweight=reweight, lamb=lamb, inv_bias1=inv_bias1,
        )  # fmt: skip
        torch.testing.assert_close(ps[i], rp, **TOL[gdtype])
        torch.testing.assert_close(ms[i], rm, **TOL[gdtype])
        torch.testing.assert_close(vs[i], rv, **TOL[gdtype])
        assert torch.equal(ps[i] == 0, rp == 0)  # the sparsity pattern is exact
        if mode in (MODE_SOFT, MODE_TILES):
            torch.testing.assert_close(aux[i], ra, rtol=1e-5, atol=1e-3)
    assert [int(c) for c in counters] == [1] + [0] * (len(shapes) - 1)
    if mode != MODE_ADAMW:
        assert int(plan.nnz.sum()) == sum(int((p != 0).sum()) for p in ps)


@pytest.mark.parametrize("mode, block", [(MODE_SOFT, (1, 1)), (MODE_TILES, (2, 4))], ids=["1x1", "tiles"])
def test_tuning_arguments_change_the_work_split_not_the_result(mode, block):
    ps, gs, ms, vs, aux = make_tensors([(6, 40), (2, 8)], mode, block, torch.float32)
    runs = []
    for elements in (None, 16):
        out = [[t.clone() for t in ts] for ts in (ps, ms, vs, aux)]
        counters = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in ps]
        plan = adam_prox(
            out[0], gs, out[1], out[2], out[3], counters, **HP, step_size=0.1, inv_sqrt_bias2=10.0,
            rpp_lambda=2.0, mode=mode, block=block, reweight=True, elements_per_program=elements, num_warps=4,
        )  # fmt: skip
        runs.append((plan.n_programs, out))
    (n_default, default), (n_small, small) = runs
    assert n_small > n_default
    for a, b in zip(sum(default, []), sum(small, [])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


OPTIMIZERS = [rpp.RPPAdamW, rpp.RPPLamb]


def run_optimizer(backend, steps=7, freeze_at=4, optimizer=rpp.RPPAdamW):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 32, device=DEVICE))  # tiled, pruned
    u = torch.nn.Parameter(torch.randn(7, 9, device=DEVICE))  # 1x1, pruned
    s = torch.nn.Parameter(torch.randn(3, device=DEVICE))  # smaller than one block
    b = torch.nn.Parameter(torch.randn(16, device=DEVICE))  # not pruned
    opt = optimizer(
        [
            {"params": [w], "block_size": (4, 8)},
            {"params": [u, s]},
            {"params": [b], "prune": False},
        ],
        lr=0.05,
        rpp_lambda=1.5,
        reweight_every=2,
        weight_decay=0.01,
        backend=backend,
    )
    history = []
    for i in range(steps):
        if i == freeze_at:
            opt.freeze_masks()
        for p in (w, u, s, b):
            p.grad = torch.randn_like(p)
        opt.step()
        history.append([t.detach().clone() for t in (w, u, s, b)])
    return history, opt


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.__name__)
def test_optimizer_triton_path_matches_torch_path_step_by_step(optimizer):
    torch_hist, torch_opt = run_optimizer("torch", optimizer=optimizer)
    triton_hist, triton_opt = run_optimizer("triton", optimizer=optimizer)
    for step, (a, b) in enumerate(zip(torch_hist, triton_hist)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **TOL[torch.float32])
            assert torch.equal(x == 0, y == 0), f"step {step}"
    assert 0 < triton_opt.sparsity() < 1
    assert triton_opt.sparsity() == torch_opt.sparsity()
    for ma, mb in zip(torch_opt.masks().values(), triton_opt.masks().values()):
        assert torch.equal(ma, mb)


def test_sparsity_uses_kernel_counts_until_weights_change():
    _, opt = run_optimizer("triton", steps=3, freeze_at=99)
    assert opt._nnz, "the Triton step should leave its non-zero counts"
    counted = opt.sparsity()
    w = opt.param_groups[0]["params"][0]
    with torch.no_grad():
        w.zero_()  # bumps the version counter: the stale counts must not be used
    assert opt.sparsity() > counted


def run_steps(params, opt, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_optimizer_continues_bit_for_bit_after_a_checkpoint_round_trip(backend, optimizer):
    # torch's loader casts state to the weight's dtype: a float mask, read by the kernel as bytes.
    grads = [[torch.randn(8, 16, device=DEVICE), torch.randn(40, device=DEVICE)] for _ in range(9)]
    grads[7][0][0, 0] = float("nan")  # the non-finite counter is used after the resume

    def build():
        torch.manual_seed(1)
        w = torch.nn.Parameter(torch.randn(8, 16, device=DEVICE))
        u = torch.nn.Parameter(torch.randn(40, device=DEVICE))
        groups = [{"params": [w], "block_size": (4, 8)}, {"params": [u]}]
        return (w, u), optimizer(groups, lr=0.05, rpp_lambda=1.0, reweight_every=2, backend=backend)

    params, opt = build()
    run_steps(params, opt, grads[:3])
    opt.freeze_masks()
    run_steps(params, opt, grads[3:5])
    checkpoint = io.BytesIO()
    torch.save(opt.state_dict(), checkpoint)
    saved = [p.detach().clone() for p in params]
    run_steps(params, opt, grads[5:])

    resumed, opt2 = build()
    with torch.no_grad():
        for p, value in zip(resumed, saved):
            p.copy_(value)
    checkpoint.seek(0)
    opt2.load_state_dict(torch.load(checkpoint))
    run_steps(resumed, opt2, grads[5:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            other = opt2.state[b][key]
            if isinstance(value, torch.Tensor):
                assert other.dtype == value.dtype and torch.equal(other, value), key
    assert opt2.nonfinite_skipped() == opt.nonfinite_skipped() == 1


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_size_and_transposed_weights_step(backend, optimizer):
    shapes = [(8, 16), (6, 12), (0, 16), (0,)]  # tiled, 1x1, and an empty one in each group
    values = [torch.randn(s, device=DEVICE) for s in shapes]
    grads = [[torch.randn(s, device=DEVICE) for s in shapes] for _ in range(6)]

    def transposed(x):
        return x.t().contiguous().t() if x.dim() == 2 else x  # same values, column-major

    def run(layout):
        params = [torch.nn.Parameter(layout(v.clone())) for v in values]
        groups = [{"params": params[0::2], "block_size": (4, 8)}, {"params": params[1::2]}]
        opt = optimizer(groups, lr=0.05, rpp_lambda=1.0, reweight_every=2, backend=backend)
        run_steps(params, opt, [[layout(g) for g in gs] for gs in grads[:4]])
        opt.freeze_masks()
        run_steps(params, opt, [[layout(g) for g in gs] for gs in grads[4:]])
        return params, opt

    dense, dense_opt = run(lambda x: x)
    strided, strided_opt = run(transposed)
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    for a, b in zip(dense, strided):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
        assert torch.equal(a == 0, b == 0)
    assert 0 < strided_opt.sparsity() == dense_opt.sparsity() < 1
    assert strided_opt.state[strided[2]]["step"] == 6 and strided[2].shape == (0, 16)


@pytest.mark.skipif(
    not hasattr(torch.nn.Parameter(torch.ones(1)), "grad_dtype"),
    reason="this PyTorch cannot hold bf16 gradients on fp32 parameters (grad_dtype arrived later)",
)
def test_bf16_gradients_through_the_optimizer():
    p = torch.nn.Parameter(torch.randn(8, 16, device=DEVICE))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(8, 16, device=DEVICE).bfloat16()
    for param, backend in ((p, "triton"), (q, "torch")):
        opt = rpp.RPPAdamW([param], lr=0.05, rpp_lambda=1.0, block_size=4, backend=backend)
        param.grad_dtype = None  # allow a gradient dtype other than the weight's
        param.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p, q, **TOL[torch.bfloat16])
    assert torch.equal(p == 0, q == 0)


def test_plan_is_reused_while_tensors_stay_put():
    p = torch.nn.Parameter(torch.randn(8, 8, device=DEVICE))
    opt = rpp.RPPAdamW([p], lr=0.01, backend="triton")
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    (plans,) = opt._plans.values()
    first = plans[torch.float32]
    p.grad = torch.randn_like(p)  # a new gradient buffer: only its address is refreshed
    opt.step()
    assert plans[torch.float32] is first
    assert first.grad_key == (p.grad.data_ptr(),)
    opt.load_state_dict(opt.state_dict())  # new state tensors: a new plan
    p.grad = torch.randn_like(p)
    opt.step()
    (plans,) = opt._plans.values()
    assert plans[torch.float32] is not first


def test_launcher_rejects_bad_input():
    p = torch.randn(4, device=DEVICE)
    ok = dict(**HP, step_size=0.1, inv_sqrt_bias2=10.0)
    with pytest.raises(ValueError, match="at least one"):
        adam_prox([], [], [], [], [], [], **ok)
    with pytest.raises(ValueError, match="float32"):
        adam_prox(
            [p.double()], [p], [p.clone()], [p.clone()], [None], [torch.zeros((), dtype=torch.int64)], **ok
        )
    with pytest.raises(ValueError, match="gradient dtype"):
        adam_prox(
            [p], [p.int()], [p.clone()], [p.clone()], [None], [torch.zeros((), dtype=torch.int64)], **ok
        )
    with pytest.raises(ValueError, match="shape"):
        adam_prox([p], [p[:3]], [p.clone()], [p.clone()], [None], [torch.zeros((), dtype=torch.int64)], **ok)
