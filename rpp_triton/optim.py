"""RPPAdamW and RPPLamb: AdamW or LAMB followed by a reweighted-l1 (group-l2 over tiles) proximal step.

The maths is in `rpp_triton.kernels.adam_prox` (`rpp_step_ref`); this module keeps the state,
validates input and dispatches each group to the Triton kernel or the PyTorch path.
"""

import contextlib
import functools
import math
import os
import warnings

import torch
from torch import nn

from rpp_triton.backend import check_backend, resolve
from rpp_triton.kernels.adam_prox import (
    adam_scalars,
    adamw_step_ref,
    rpp_step_ref,
    tile_prox_step_ref,
)
from rpp_triton.models import pruned_weight_ids
from rpp_triton.tiles import as_block, tile_mask

__all__ = ["RPPAdamW", "RPPLamb", "param_groups"]


def _compile_enabled() -> bool:
    return os.environ.get("RPP_TRITON_COMPILE", "1") not in ("0", "", "false", "no")


_compiled: dict = {}


@contextlib.contextmanager
def _recompile_limit(at_least: int):
    """Dynamo's recompile limit raised to `at_least` inside the block, the user's value after it
    (a plain save and restore, ~8 us; `config.patch` took ~90 us, once per tensor and step)."""
    config = torch._dynamo.config
    saved = config.recompile_limit
    config.recompile_limit = max(saved, at_least)
    try:
        yield
    finally:
        config.recompile_limit = saved


def _fast(fn, **constants):
    """`fn` compiled with torch.compile (one loop nest per tensor instead of one pass per op), with
    `constants` (the tile shape, flags) fixed at compile time and sizes and hyperparameters
    dynamic, so a changing lr or a new layer shape does not recompile. Eager where compilation is
    off (RPP_TRITON_COMPILE=0) or fails: it computes the same thing, only slower."""
    key = (fn, tuple(sorted(constants.items())))
    compiled = _compiled.get(key)
    if compiled is None:
        bound = functools.partial(fn, **constants)
        compiled = torch.compile(bound, dynamic=True, fullgraph=True) if _compile_enabled() else bound
        _compiled[key] = compiled

    def run(*args, **kwargs):
        if isinstance(compiled, functools.partial):
            return compiled(*args, **kwargs)
        # Every variant (mode flags, tile shape, gradient dtype, size-1 specialisations) is a
        # recompile of the same code object: allow more than dynamo's default of 8, for these calls
        # only (the user's own setting is back in place afterwards).
        try:
            with _recompile_limit(64):
                return compiled(*args, **kwargs)
        except Exception as exc:
            warnings.warn(f"torch.compile of {fn.__name__} failed ({exc}); using eager PyTorch", stacklevel=2)
            _compiled[key] = functools.partial(fn, **constants)
            return _compiled[key](*args, **kwargs)

    return run


def _inv_bias1(beta1: float, step: int) -> float:
    """1 / (1 - beta1**t): LAMB's bias correction of m alone (AdamW folds it into the step size)."""
    return 1.0 / (1.0 - beta1**step)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# Every state tensor's dtype: load_state_dict keeps these (torch's loader casts to the weight's dtype).
_STATE_DTYPES = {
    "exp_avg": torch.float32,
    "exp_avg_sq": torch.float32,
    "alpha": torch.float32,
    "mask": torch.bool,
    "nonfinite": torch.int64,
}


def _label(group: dict, i: int) -> str:
    names = group.get("param_names")
    return repr(names[i]) if names else f"params[{i}]"


def _state_shapes(p: torch.Tensor, group: dict) -> dict:
    """Shape of each state tensor of `p` in `group` (alpha has one entry per tile)."""
    shapes = {"exp_avg": p.shape, "exp_avg_sq": p.shape, "nonfinite": torch.Size()}
    if group["prune"]:
        bh, bw = group["block_size"]
        tiles = p.shape if (bh, bw) == (1, 1) else torch.Size((p.shape[0] // bh, p.shape[1] // bw))
        shapes.update(alpha=tiles, mask=p.shape)
    return shapes


class _RPPOptimizer(torch.optim.Optimizer):
    """What RPPAdamW and RPPLamb share: options, checks, state, both backends, masks and sparsity.
    `trust_ratio` is the one difference."""

    # Scale each tensor's update by LAMB's trust ratio ||p|| / ||r|| (RPPLamb) or not (RPPAdamW).
    trust_ratio = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rpp_lambda: float = 1e-3,
        reweight_eps: float = 1e-3,
        reweight_every: int = 0,
        block_size=1,
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            rpp_lambda=rpp_lambda,
            reweight_eps=reweight_eps,
            reweight_every=reweight_every,
            block_size=block_size,
            backend=backend,
            prune=True,
            frozen=False,
        )
        self._plans: dict = {}  # Triton pointer tables per group, reused while tensors stay put
        self._nnz: dict = {}  # non-zeros the kernel wrote at the last step, per group
        super().__init__(params, defaults)

    # ---- validation -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group, len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict, index: int) -> None:
        opt = type(self).__name__

        def bad(name, value, why):
            raise ValueError(f"{opt}: invalid {name}={value!r} in param group {index}: {why}")

        for name in ("lr", "eps", "weight_decay", "rpp_lambda"):
            if not _is_number(group[name]) or group[name] < 0:
                bad(name, group[name], "must be a finite number >= 0")
        if not _is_number(group["reweight_eps"]) or group["reweight_eps"] <= 0:
            bad("reweight_eps", group["reweight_eps"], "must be a finite number > 0")
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            bad("betas", betas, "must be a pair (beta1, beta2)")
        for i, beta in enumerate(betas):
            if not _is_number(beta) or not 0.0 <= beta < 1.0:
                bad(f"betas[{i}]", beta, "must be in [0, 1)")
        group["betas"] = tuple(float(b) for b in betas)
        every = group["reweight_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            bad("reweight_every", every, "must be an int >= 0 (0 turns reweighting off)")
        try:
            group["block_size"] = as_block(group["block_size"])
        except ValueError as exc:
            bad("block_size", group["block_size"], str(exc))
        try:
            check_backend(group["backend"])
        except ValueError as exc:
            bad("backend", group["backend"], str(exc))
        for flag in ("prune", "frozen"):
            if not isinstance(group[flag], bool):
                bad(flag, group[flag], "must be True or False")
        for i, p in enumerate(group["params"]):
            label = _label(group, i)
            if not p.is_floating_point():
                raise ValueError(f"{opt}: parameter {label} in group {index} has dtype {p.dtype}")
            if group["prune"] and group["block_size"] != (1, 1):
                bh, bw = group["block_size"]
                if p.dim() != 2 or p.shape[0] % bh or p.shape[1] % bw:
                    raise ValueError(
                        f"{opt}: parameter {label} in group {index} has shape {tuple(p.shape)}, "
                        f"which block_size={group['block_size']} does not tile: a pruned group with "
                        f"tiles needs 2-D weights whose [out, in] divide by ({bh}, {bw})"
                    )

    # ---- state --------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """p's state, created on first use; every tensor in it is contiguous, whatever p's strides."""
        state = self.state[p]
        if not state:
            shapes = _state_shapes(p, group)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(shapes["exp_avg"], dtype=torch.float32, device=p.device)
            state["exp_avg_sq"] = torch.zeros(shapes["exp_avg_sq"], dtype=torch.float32, device=p.device)
            state["nonfinite"] = torch.zeros((), dtype=torch.int64, device=p.device)
            if group["prune"]:
                state["alpha"] = torch.ones(shapes["alpha"], dtype=torch.float32, device=p.device)
        if group["prune"] and group["frozen"] and "mask" not in state:
            state["mask"] = tile_mask(p.detach(), group["block_size"]).contiguous()
        return state

    def _check_state(self, state: dict, p: torch.Tensor, group: dict, index: int, i: int) -> None:
        """ValueError unless `state` (loaded for p, parameter i of group `index`) fits p and group."""
        if not state:
            return
        where = f"{type(self).__name__}: the state of parameter {_label(group, i)} in group {index}"
        shapes = _state_shapes(p, group)
        missing = sorted({"step", *shapes} - {"mask"} - state.keys())
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where} has step={step!r}, not an int >= 0")
        for key, shape in shapes.items():
            value = state.get(key)
            if key in state and (not isinstance(value, torch.Tensor) or value.shape != shape):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{where} has {key} of shape {found}, expected {tuple(shape)}")

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            backend = resolve(group["backend"], params[0].device)
            states = [self._init_state(p, group) for p in params]
            for state in states:
                state["step"] += 1
            if backend == "triton":
                self._step_triton(group, params, states)
            else:
                self._step_torch(group, params, states)
        return loss

    def _flags(self, group: dict, state: dict) -> dict:
        every = group["reweight_every"]
        prune, frozen = group["prune"], group["prune"] and group["frozen"]
        return dict(
            prune=prune,
            frozen=frozen,
            reweight=prune and not frozen and every > 0 and state["step"] % every == 0,
        )

    def _step_torch(self, group: dict, params: list, states: list) -> None:
        beta1, beta2 = group["betas"]
        block = group["block_size"]
        adam = dict(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"]
        )
        tau = group["lr"] * group["rpp_lambda"]
        for p, state in zip(params, states):
            if p.numel() == 0:
                continue
            flags = self._flags(group, state)
            step_size, inv_sqrt_bias2 = adam_scalars(group["lr"], beta1, beta2, state["step"])
            # detach(): the compiled graph must not see p.grad through p (a bf16 .grad on an fp32 weight
            # trips its fake tensors); writes still land in p and bump its version counter. A strided
            # weight (e.g. a transposed view) steps in a contiguous copy, written back at the end.
            w = p.detach()
            dense = w.contiguous()
            g = p.grad.detach().reshape(-1)
            flat = [dense.view(-1), g, state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)]
            adam["inv_bias1"] = _inv_bias1(beta1, state["step"])
            if flags["prune"] and not flags["frozen"] and block != (1, 1):
                # Tiles: Adam in one compiled pass, then PyTorch's own reduction for the tile norms
                # and one in-place broadcast multiply (compiled, the tile view made inductor emit
                # several strided loops: ~90x slower than these two eager ops on [3072, 768]).
                skipped = _fast(adamw_step_ref, lamb=self.trust_ratio)(
                    *flat, step_size=step_size, inv_sqrt_bias2=inv_sqrt_bias2, **adam
                )
                tile_prox_step_ref(
                    dense,
                    state["alpha"],
                    tau=tau,
                    block=block,
                    reweight_eps=group["reweight_eps"],
                    reweight=flags["reweight"],
                )
            else:
                # Elementwise (unpruned, 1x1 or frozen): the whole step is one fused pass.
                alpha, mask = state.get("alpha"), state.get("mask") if flags["frozen"] else None
                skipped = _fast(rpp_step_ref, block=(1, 1), lamb=self.trust_ratio, **flags)(
                    *flat,
                    alpha.view(-1) if alpha is not None else None,
                    mask.view(-1) if mask is not None else None,
                    step_size=step_size,
                    inv_sqrt_bias2=inv_sqrt_bias2,
                    rpp_lambda=group["rpp_lambda"],
                    reweight_eps=group["reweight_eps"],
                    **adam,
                )
            state["nonfinite"] += skipped
            if dense is not w:
                w.copy_(dense)

    def _step_triton(self, group: dict, params: list, states: list) -> None:
        """Fused kernel: one launch per (step count, gradient dtype) subset of the group, normally one."""
        from rpp_triton.kernels import adam_prox as k

        beta1, beta2 = group["betas"]
        block = group["block_size"]
        if not group["prune"]:
            mode = k.MODE_ADAMW
        elif group["frozen"]:
            mode = k.MODE_FROZEN
        else:
            mode = k.MODE_SOFT if block == (1, 1) else k.MODE_TILES
        subsets: dict = {}
        fallback = []
        for p, state in zip(params, states):
            if p.dtype != torch.float32 or not p.is_contiguous():
                fallback.append((p, state))  # the kernel takes contiguous fp32 weights
            elif p.numel():
                subsets.setdefault((state["step"], p.grad.dtype), []).append((p, state))
        if fallback:
            self._step_torch(group, [p for p, _ in fallback], [s for _, s in fallback])
        plans = self._plans.setdefault(id(group), {})
        counted = []
        for (step, gdtype), members in subsets.items():
            ps = [p for p, _ in members]
            sts = [s for _, s in members]
            if mode == k.MODE_FROZEN:
                auxes = [s["mask"].view(torch.uint8) for s in sts]
            elif mode in (k.MODE_SOFT, k.MODE_TILES):
                auxes = [s["alpha"] for s in sts]
            else:
                auxes = [None] * len(ps)
            step_size, inv_sqrt_bias2 = adam_scalars(group["lr"], beta1, beta2, step)
            plan = k.adam_prox(
                [p.detach() for p in ps],
                [p.grad.contiguous() for p in ps],
                [s["exp_avg"] for s in sts],
                [s["exp_avg_sq"] for s in sts],
                auxes,
                [s["nonfinite"] for s in sts],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step_size=step_size,
                inv_sqrt_bias2=inv_sqrt_bias2,
                rpp_lambda=group["rpp_lambda"],
                reweight_eps=group["reweight_eps"],
                mode=mode,
                block=block,
                reweight=self._flags(group, sts[0])["reweight"],
                lamb=self.trust_ratio,
                inv_bias1=_inv_bias1(beta1, step),
                plan=plans.get(gdtype),
            )
            plans[gdtype] = plan
            counted.append((plan.nnz, ps))
        if group["prune"] and not fallback and len(params) == len(group["params"]):
            # The kernel counted the non-zeros it wrote: sparsity() needs no pass while the weights
            # are unchanged since (checked by their version counters).
            self._nnz[id(group)] = (counted, [(p, p._version) for p in params])
        else:
            self._nnz.pop(id(group), None)

    # ---- masks and sparsity -------------------------------------------------------------------
    def _pruned(self):
        for group in self.param_groups:
            if group["prune"]:
                for p in group["params"]:
                    yield group, p

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` returned, checked first like the constructor's input: a
        ValueError names the group or parameter, and the optimizer stays as it was. Hyperparameters
        come from the saved groups; `prune` and `block_size` must be this optimizer's; every state
        tensor must have its shape, and keeps its dtype (moments and alpha fp32, masks bool)."""
        groups, states = self._checked_load(state_dict)
        super().load_state_dict({**state_dict, "param_groups": groups})
        for p, saved in states:
            for key, dtype in _STATE_DTYPES.items():
                if key in saved:
                    self.state[p][key] = saved[key].to(p.device, dtype, memory_format=torch.contiguous_format)
        self._plans.clear()
        self._nnz.clear()

    def _checked_load(self, state_dict: dict) -> tuple[list, list]:
        """The saved groups, validated and normalised, and (param, saved state) pairs."""
        name = type(self).__name__
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"{name}: the state has {len(saved_groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        groups, states = [], []
        for index, (ours, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"{name}: param group {index} of the state has {len(saved['params'])} parameters, "
                    f"this optimizer's {len(ours['params'])}"
                )
            group = {**self.defaults, **saved, "params": ours["params"]}
            self._check_group(group, index)
            for key in ("prune", "block_size"):
                if group[key] != ours[key]:
                    raise ValueError(
                        f"{name}: param group {index} of the state has {key}={group[key]!r}, "
                        f"this optimizer's has {ours[key]!r}"
                    )
            for i, (saved_id, p) in enumerate(zip(saved["params"], ours["params"])):
                state = saved_state.get(saved_id, {})
                self._check_state(state, p, group, index, i)
                if state:
                    states.append((p, state))
            groups.append({**group, "params": saved["params"]})
        return groups, states

    def masks(self) -> dict:
        """Bool mask of p's shape for each pruned parameter (tile-level: a tile is kept if any
        element is non-zero; the frozen mask once `freeze_masks` has been called)."""
        out = {}
        for group, p in self._pruned():
            state = self.state.get(p, {})
            out[p] = state["mask"] if "mask" in state else tile_mask(p.detach(), group["block_size"])
        return out

    def sparsity(self) -> float:
        """Fraction of zero elements over all pruned parameters.

        After a Triton step it adds up the kernel's own non-zero counts, unless a weight changed
        since (in-place writes bump a tensor's version; writes through `.data` do not, so use
        `torch.no_grad()` and in-place ops to edit pruned weights)."""
        zeros = total = 0
        for group in self.param_groups:
            if not group["prune"]:
                continue
            numel = sum(p.numel() for p in group["params"])
            cached = self._nnz.get(id(group))
            if cached and all(p._version == version for p, version in cached[1]):
                kept = sum(int(nnz.sum()) for nnz, _ in cached[0])
                zeros += numel - kept
            else:
                zeros += sum(int((p.detach() == 0).sum()) for p in group["params"])
            total += numel
        return zeros / total if total else 0.0

    def freeze_masks(self, masks: dict | None = None) -> None:
        """Fix each pruned parameter's mask; later steps keep it (p = z * mask).

        By default the mask is the parameter's current non-zero tiles. `masks` ({param: bool
        tensor of its shape}) sets some explicitly, e.g. to keep tiles a hard prune chose even
        where the weights are zero now, so training can grow them back.
        """
        masks = masks or {}
        pruned = {id(p) for _, p in self._pruned()}
        for p in masks:
            if id(p) not in pruned:
                raise ValueError("freeze_masks: a mask was given for a parameter that is not pruned")
        self._plans.clear()
        for group in self.param_groups:
            if group["prune"]:
                group["frozen"] = True
                for p in group["params"]:
                    state = self._init_state(p, group)
                    if p in masks:
                        mask = masks[p]
                        if mask.shape != p.shape:
                            raise ValueError(
                                f"freeze_masks: mask of shape {tuple(mask.shape)} for a parameter of "
                                f"shape {tuple(p.shape)}"
                            )
                        state["mask"] = mask.to(p.device, torch.bool).clone(
                            memory_format=torch.contiguous_format
                        )

    def set_alpha(self, alphas: dict) -> None:
        """Set the reweighting factors of pruned parameters ({param: tensor of its tiles' shape,
        `[out/bh, in/bw]`}), for a caller that reweights itself (groups with `reweight_every=0`
        keep them until the next call). The proximal step zeroes tile B where
        rms(z_B) <= lr * lambda * alpha_B."""
        pruned = {id(p): group for group, p in self._pruned()}
        for p, alpha in alphas.items():
            group = pruned.get(id(p))
            if group is None:
                raise ValueError("set_alpha: alpha was given for a parameter that is not pruned")
            state = self._init_state(p, group)
            if alpha.numel() != state["alpha"].numel():
                raise ValueError(
                    f"set_alpha: alpha of shape {tuple(alpha.shape)}, expected {tuple(state['alpha'].shape)}"
                )
            state["alpha"].copy_(alpha.reshape(state["alpha"].shape))

    def nonfinite_skipped(self) -> int:
        """How many elements were skipped for a NaN or Inf gradient."""
        return sum(int(s["nonfinite"]) for s in self.state.values() if "nonfinite" in s)


class RPPAdamW(_RPPOptimizer):
    """AdamW with the reweighted proximal pruning step of arXiv 1909.12486 (see docs/design.md).

    Per parameter: z = p - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p), then p = z (group
    not pruned), p = z * mask (masks frozen) or the proximal step of z per tile, with reweighting
    every `reweight_every` steps. Group keys: every constructor option plus `prune` (default True)
    and `frozen` (set by `freeze_masks`). Gradients holding NaN or Inf do not poison the weights:
    the elements they touch skip the Adam update for that step (weight and moments keep their
    values; the tile's proximal step still applies) and are counted in `nonfinite_skipped()`.
    """


class RPPLamb(_RPPOptimizer):
    """LAMB (You et al. 2019, for large-batch pre-training) with the same pruning step as RPPAdamW.

    Per parameter tensor: r = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, trust = ||p|| / ||r||
    where both norms are > 0 (else 1), z = p - lr * trust * r; then the same cases as RPPAdamW (not
    pruned, frozen, proximal step + reweighting), with the same options, group keys, methods,
    non-finite handling (skipped elements count as r = 0) and state. The Triton path reads the
    weights twice: once for the norms, once for the update.
    """

    trust_ratio = True


def param_groups(model: nn.Module, **options) -> list[dict]:
    """The default split for a BERT-family model: the encoder's attention and feed-forward
    `nn.Linear` weights are pruned; embeddings, LayerNorm, biases, pooler and heads are not.

    `options` (any RPPAdamW / RPPLamb option) apply to both groups. Each group carries `param_names` beside
    `params`, so errors and reports name the parameter.
    """
    pruned_ids = pruned_weight_ids(model)
    pruned, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (pruned if id(p) in pruned_ids else rest).append((name, p))
    if not pruned:
        raise ValueError(
            f"param_groups: found no encoder attention/feed-forward nn.Linear in {type(model).__name__}"
        )
    groups = [
        {"params": [p for _, p in pruned], "param_names": [n for n, _ in pruned], "prune": True, **options}
    ]
    if rest:
        groups.append(
            {"params": [p for _, p in rest], "param_names": [n for n, _ in rest], "prune": False, **options}
        )
    return groups
