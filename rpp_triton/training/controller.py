"""Pruning schedules as Trainer callbacks: RPP and the two baselines it is compared with, on the
same sparsity schedule, ending the same way (docs/design.md, "Pruning schedule").

One prune run is a single Trainer run of `dense_steps + prune_steps + recovery_steps` steps:
- dense steps train without pruning;
- prune steps follow a cubic ramp from 0 to the target sparsity (reached at `ramp` of the way);
- at the end of the prune steps a hard prune keeps exactly the (1 - target) share of tiles with
  the largest score over all pruned weights, and the optimizer's masks are frozen; the kept
  weights stay as trained, return to their starting values (rewind), or are refit by least squares
  to reproduce each starting layer's output on calibration text (refit);
- recovery steps train with those frozen masks.

The methods differ only in how the prune steps reach the schedule:
- `rpp`: the reweighted proximal step of the optimizer does the pruning. Lambda is set before
  each step so that the threshold falls at the scheduled share: a tile B is zeroed when
  rms(z_B) <= lr * lambda * alpha_B, so lr * lambda is the k-th smallest rms(w_B) / alpha_B
  (k tiles scheduled to be zero). Sparsity follows the ramp without the bursts a feedback loop
  on lambda gave;
- `gmp`: gradual magnitude pruning, every `mask_every` steps the lowest-scoring tiles up to the
  scheduled share are zeroed and masked;
- `oneshot`: no ramp; one prune to the target before the first step, then frozen-mask training.

The controller's state (lambda, phase, evaluations, mask digest) goes into each checkpoint as
`rpp_controller.json`; everything else lives in the optimizer's state.
"""

from __future__ import annotations

import functools
import json
import os

import torch

from rpp_triton.artifacts import CONTROLLER_FILE
from rpp_triton.errors import UsageError
from rpp_triton.refit import refit_kept
from rpp_triton.tiles import (
    as_block,
    column_tiles,
    hard_prune,
    layer_table,
    mask_digest,
    scope_normalizers,
    tile_rms,
    tile_scores,
)
from rpp_triton.training.trainer import (
    broadcast_from_first,
    count_sparsity,
    freeze_with_masks,
    pruned_named_params,
    ranks_agree,
)

METHODS = ("rpp", "gmp", "oneshot")


def controller_reweights(prune_by: str, scope: str) -> bool:
    """True when RPP's reweighting carries per-tile scales (an activation score or a per-layer or
    per-row scope), so the controller sets alpha and the optimizer must not (reweight_every=0)."""
    return prune_by == "activation" or scope != "global"


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class PruningController(_trainer_callback_base()):
    """The schedule, the final hard prune and the bookkeeping every method shares. Evaluations it
    asks for are filed under the phase they close: "dense", "hard_pruned" (before recovery),
    "final"."""

    method = ""

    def __init__(
        self,
        optimizer,
        target: float,
        block_size,
        dense_steps: int,
        prune_steps: int,
        recovery_steps: int,
        ramp: float = 0.7,
        prune_by: str = "rms",
        settings: dict | None = None,
        rewind: dict | None = None,
        scope: str = "global",
        column_scales: dict | None = None,
        grams: dict | None = None,
    ):
        self.optimizer = optimizer
        self.rewind = rewind  # {name: weight before pruning}: kept weights return there at the hard prune
        # {name: E[x x^T] of the layer's input}: kept weights are refit to the rewound layer's output
        self.grams = grams
        if grams and rewind is None:
            raise ValueError("the refit at the hard prune needs the rewind weights it reproduces")
        self.settings = dict(settings or {})  # run settings a resume must repeat (seed, lr, ...)
        self.target = float(target)
        self.block = as_block(block_size)
        self.dense_steps, self.prune_steps, self.recovery_steps = dense_steps, prune_steps, recovery_steps
        self.ramp, self.prune_by, self.scope = ramp, prune_by, scope
        self.column_scales = column_scales or {}
        if prune_by == "activation" and not column_scales and self.target > 0:
            raise ValueError("prune_by='activation' needs the column_scales of every pruned weight")
        # Scores are normalised per scope on the weights as they are now (dense, a resumed run
        # included: the Trainer loads a checkpoint's weights later), and kept for the whole run.
        # The global scope (and a run that prunes nothing) divides by nothing.
        self.normalizers = {}
        if scope != "global" and self.target > 0:
            named = pruned_named_params(optimizer)
            scores = [self.scores(name, w) for name, w in named]
            self.normalizers = dict(zip((n for n, _ in named), scope_normalizers(scores, self.target, scope)))
        self.lam = 0.0
        self.hard_pruned = False
        self.evals: dict[str, dict] = {}
        self.pre_prune_sparsity: float | None = None
        self.ranks_agree: bool | None = None
        self.mask_digest: str | None = None
        self.last_sparsity = 0.0
        self._set_lambda(0.0)

    # the schedule ----------------------------------------------------------------------------
    @property
    def prune_at(self) -> int:
        return self.dense_steps + self.prune_steps

    def scheduled(self, step: int) -> float:
        """Sparsity the schedule asks for after `step` optimizer steps."""
        if step <= self.dense_steps or self.prune_steps == 0:
            return 0.0
        u = min(1.0, (step - self.dense_steps) / max(1.0, self.ramp * self.prune_steps))
        return self.target * (1 - (1 - u) ** 3)

    def phase(self, step: int) -> str:
        if step <= self.dense_steps and not self.hard_pruned:
            return "dense"
        return "prune" if step <= self.prune_at and not self.hard_pruned else "recovery"

    def _set_lambda(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if group.get("prune", True):
                group["rpp_lambda"] = value

    def prepare(self, step: int) -> None:
        """Method-specific work after `step` steps, for the step that follows (a prune step)."""

    def scores(self, name: str, w) -> torch.Tensor:
        """Tile scores of the weight `name` by `prune_by` (before the scope's normalisation)."""
        return tile_scores(w, self.block, self.prune_by, self.column_scales.get(name))

    def hard_prune(self, share: float) -> dict:
        """Zero the lowest-scoring `share` of the tiles (normalised per scope); {name: mask}."""
        named = pruned_named_params(self.optimizer)
        return hard_prune(named, share, self.block, self.prune_by, self.column_scales, self.normalizers)

    def _final_prune(self) -> None:
        named = pruned_named_params(self.optimizer)
        self.pre_prune_sparsity = count_sparsity(self.optimizer)
        masks = self.hard_prune(self.target)
        if self.rewind is not None:
            with torch.no_grad():
                for name, p in named:
                    start = self.rewind[name].to(p.device)
                    if self.grams:
                        p.copy_(refit_kept(start, masks[name], self.grams[name]))
                    else:
                        p.copy_(start * masks[name].to(p.dtype))
            if self.grams:  # replicas must start the recovery from identical weights
                broadcast_from_first([p for _, p in named])
        # only the hard prune reads them: a copy of every pruned weight and, for the refit, an
        # [in, in] matrix per layer input (0.9 GB together for BERT-base) need not last the recovery
        self.rewind = self.grams = None
        freeze_with_masks(self.optimizer, named, masks)
        self.lam = 0.0
        self._set_lambda(0.0)
        self.hard_pruned = True
        self.last_sparsity = count_sparsity(self.optimizer)
        self.mask_digest = mask_digest(named)
        self.ranks_agree = ranks_agree(self.mask_digest)

    # Trainer hooks ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.prune_at == 0 and self.target > 0 and not self.hard_pruned:
            self._final_prune()  # one-shot: prune before the first step
        elif state.global_step < self.prune_at and not self.hard_pruned:
            self.prepare(state.global_step)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step >= self.dense_steps:  # nothing is pruned before then
            self.last_sparsity = count_sparsity(self.optimizer)
        if step == self.dense_steps and self.dense_steps > 0:
            control.should_evaluate = True
        if step < self.prune_at and not self.hard_pruned:
            self.prepare(step)
        elif step == self.prune_at and not self.hard_pruned and self.target > 0:
            self._final_prune()
            if self.recovery_steps > 0:
                control.should_evaluate = True
        if step >= state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        step = state.global_step
        if step == 0 or (step == self.dense_steps and not self.hard_pruned):
            key = "dense"
        elif step >= state.max_steps:
            key = "final"
        elif step == self.prune_at:
            key = "hard_pruned"
        else:
            key = f"step{step}"
        self.evals[key] = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(ckpt):
                with open(os.path.join(ckpt, CONTROLLER_FILE), "w") as f:
                    json.dump(self.state_dict(), f, indent=1)

    def log_fields(self) -> dict:
        fields = {"rpp_lambda": self.lam, "sparsity": self.last_sparsity}
        for row in layer_table(pruned_named_params(self.optimizer), (1, 1)):
            fields[f"sparsity/{row['name']}"] = row["sparsity"]
        return fields

    # checkpoint ------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "method": self.method,
            "target": self.target,
            "block_size": list(self.block),
            "dense_steps": self.dense_steps,
            "prune_steps": self.prune_steps,
            "recovery_steps": self.recovery_steps,
            **self.settings,
        }

    _STATE = {
        "lam": (int, float),
        "hard_pruned": bool,
        "evals": dict,
        "pre_prune_sparsity": (int, float, type(None)),
        "mask_digest": (str, type(None)),
        "ranks_agree": (bool, type(None)),
        "last_sparsity": (int, float),
    }

    def state_dict(self) -> dict:
        return {"config": self.config(), **{key: getattr(self, key) for key in self._STATE}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's controller; a UsageError for other settings or a corrupt file."""
        bad = [k for k, kinds in self._STATE.items() if not isinstance(state.get(k, ...), kinds)]
        if not isinstance(state.get("config"), dict) or bad:
            wrong = ", ".join(bad) or "config"
            raise UsageError(f"{CONTROLLER_FILE} of the checkpoint is corrupt (missing or wrong: {wrong})")
        if state["config"] != self.config():
            diff = [k for k in self.config() if state["config"].get(k) != self.config()[k]]
            raise UsageError(
                f"checkpoint was made with different settings ({', '.join(diff)}); resume with the same "
                "--method, --target-sparsity, --block-size, step counts, seed, learning rate, "
                "--prune-by and --prune-scope"
            )
        for key in self._STATE:
            setattr(self, key, state[key])


class RPPController(PruningController):
    """RPP: lambda placed so the reweighted proximal step prunes the scheduled share."""

    method = "rpp"
    SAMPLE = 500_000

    def __init__(self, *args, reweight_every: int = 1, reweight_eps: float = 0.01, **kwargs):
        super().__init__(*args, **kwargs)
        self.reweight_every, self.reweight_eps = reweight_every, reweight_eps
        # Scores other than the plain tile RMS enter RPP through alpha. The proximal step zeroes tile
        # B when rms(z_B) <= lr * lambda * alpha_B. With m_B = c_B / q_B (c_B the tile's input scale,
        # q_B its scope normaliser) and alpha_B = 1 / ((rms(w_B) + eps) * m_B), that is about
        # rms(w_B)^2 * m_B <= lr * lambda: RPP ranks by rms(w_B) * sqrt(m_B), a softer weighting
        # of the input scale than the hard prune's rms(w_B) * m_B. At 400 steps (70%, 1x1, seed 0)
        # it kept more than m_B^2 in place of m_B, the hard prune's own order: embedding fidelity
        # 0.864 against 0.848 (topic 0.737 against 0.715). Without reweighting alpha_B = 1 / m_B.
        self.penalty = None
        if controller_reweights(self.prune_by, self.scope):
            self.penalty = {}
            for name, w in pruned_named_params(self.optimizer):
                m = torch.ones((), device=w.device)
                if name in self.column_scales:
                    m = column_tiles(self.column_scales[name].to(w.device), self.block[1])[None, :]
                if name in self.normalizers:
                    m = m / self.normalizers[name].to(w.device)
                self.penalty[name] = m

    @torch.no_grad()
    def reweight(self) -> None:
        """alpha of every pruned tile from the weights as they are now (see __init__)."""
        alphas = {}
        for name, p in pruned_named_params(self.optimizer):
            m = self.penalty[name]
            if self.reweight_every:
                rms = tile_rms(p.detach().float(), self.block)
                alphas[p] = 1.0 / ((rms + self.reweight_eps) * m)
            else:
                alphas[p] = (1.0 / m).expand(p.shape[0] // self.block[0], p.shape[1] // self.block[1])
        self.optimizer.set_alpha(alphas)

    def prepare(self, step: int) -> None:
        share = self.scheduled(step + 1)
        every = self.reweight_every
        # without reweighting alpha is set once, before the first prune step (a checkpoint keeps it)
        due = (step - self.dense_steps) % every == 0 if every else step == self.dense_steps
        if self.penalty is not None and share > 0 and due:
            self.reweight()
        self.lam = 0.0 if share <= 0 else self._lambda_for(share)
        self._set_lambda(self.lam)

    @torch.no_grad()
    def _lambda_for(self, share: float) -> float:
        """lambda at which the next proximal step zeroes `share` of the tiles: the k-th smallest
        rms(z_B) / alpha_B over the pruned tiles, divided by lr. z, the weight after the Adam update,
        is estimated from the current moments; a tile zeroed before stays zero unless its gradient
        pushes it past the threshold, so the pattern can still change. The quantile is taken over
        every `stride`-th tile-row (at least `SAMPLE` tiles): on MiniLM's 10.6M weights the full
        selection cost more than the training step."""
        groups = [g for g in self.optimizer.param_groups if g.get("prune", True)]
        tiles = sum(p.numel() for g in groups for p in g["params"]) // (self.block[0] * self.block[1])
        stride = max(1, tiles // self.SAMPLE)
        scores, lr = [], 0.0
        for group in groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.numel() == 0:
                    continue
                state = self.optimizer.state.get(p, {})
                rows = functools.partial(_every_tile_row, bh=self.block[0], stride=stride)
                z = rows(p.detach().float())
                if state.get("step", 0):
                    (beta1, beta2), t = group["betas"], int(state["step"])
                    m, v = rows(state["exp_avg"]), rows(state["exp_avg_sq"])
                    update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
                    z = z - lr * (update + group["weight_decay"] * z)
                score = tile_rms(z, self.block)
                if "alpha" in state:
                    score = score / _every_tile_row(state["alpha"], 1, stride)
                scores.append(score.flatten())
        flat = torch.cat(scores).cpu() if scores else torch.zeros(0)
        k = round(share * flat.numel())
        if k == 0 or not lr:
            return 0.0
        return float(torch.kthvalue(flat, k).values) / lr


def _every_tile_row(t: torch.Tensor, bh: int, stride: int) -> torch.Tensor:
    """Every `stride`-th row of `bh`-row tiles of `t` as a 2-D tensor (1-D tensors: one column)."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)
    return t2.reshape(-1, bh, t2.shape[1])[::stride].reshape(-1, t2.shape[1])


class GMPController(PruningController):
    """Gradual magnitude pruning: masks updated every `mask_every` steps along the schedule."""

    method = "gmp"

    def __init__(self, *args, mask_every: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_every = max(1, mask_every)

    def prepare(self, step: int) -> None:
        offset = step - self.dense_steps
        if offset < 0 or offset % self.mask_every:
            return
        share = self.scheduled(step + 1)
        if share > 0:
            freeze_with_masks(self.optimizer, pruned_named_params(self.optimizer), self.hard_prune(share))


class OneShotController(PruningController):
    """One prune to the target before training; every step trains with frozen masks."""

    method = "oneshot"


CONTROLLERS = {c.method: c for c in (RPPController, GMPController, OneShotController)}
