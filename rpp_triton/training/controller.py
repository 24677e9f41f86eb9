"""The sparsity controller: RPP steered to a target sparsity, then the hard prune to exactly that
target and frozen masks.

One prune run is a single Trainer run of `dense_steps + rpp_steps + recovery_steps` steps:
- dense steps (lambda = 0) fit the task head (MiniLM ships without an MLM head) before pruning
  starts (the dense reference the pipeline reports is a separate run of the same length);
- RPP steps, where `SparsityController` multiplies lambda by exp(gain * gap) each step, the gap
  being the scheduled sparsity (cubic ramp from 0 to the target) minus the current one;
- at the end of the RPP steps a hard prune keeps exactly the (1 - target) share of tiles with the
  largest score over all pruned weights, and the optimizer's masks are frozen;
- recovery steps train with those frozen masks.
Everything needed to resume (moments, alpha, masks, frozen flag, lambda in the param groups) lives
in the optimizer state Trainer checkpoints; the controller adds `rpp_controller.json`.
"""

from __future__ import annotations

import json
import math
import os

from rpp_triton.artifacts import CONTROLLER_FILE
from rpp_triton.errors import UsageError
from rpp_triton.tiles import as_block, hard_prune, layer_table, mask_digest
from rpp_triton.training.trainer import count_sparsity, freeze_with_masks, pruned_named_params, ranks_agree


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class SparsityController(_trainer_callback_base()):
    """Steers `rpp_lambda` so the sparsity follows a cubic ramp to `target`, then hard-prunes to the
    exact target and freezes the masks. Evaluations it asks for are filed under the phase they
    close: "dense", "hard_pruned" (before recovery), "final"."""

    def __init__(
        self,
        optimizer,
        target: float,
        block_size,
        dense_steps: int,
        rpp_steps: int,
        recovery_steps: int,
        init_lambda: float = 1.0,
        gain: float = 5.0,
        max_change: float = 0.3,
        ramp: float = 0.7,
        prune_by: str = "rms",
    ):
        self.optimizer = optimizer
        self.target = float(target)
        self.block = as_block(block_size)
        self.dense_steps, self.rpp_steps, self.recovery_steps = dense_steps, rpp_steps, recovery_steps
        self.gain, self.max_change, self.ramp, self.prune_by = gain, max_change, ramp, prune_by
        self.lam = float(init_lambda) if target > 0 else 0.0
        self.hard_pruned = False
        self.evals: dict[str, dict] = {}
        self.pre_prune_sparsity: float | None = None
        self.ranks_agree: bool | None = None
        self.mask_digest: str | None = None
        self.last_sparsity = 0.0
        self._set_lambda(0.0 if dense_steps > 0 else self.lam)

    # the schedule ----------------------------------------------------------------------------
    @property
    def prune_at(self) -> int:
        return self.dense_steps + self.rpp_steps

    def scheduled(self, step: int) -> float:
        if step <= self.dense_steps or self.rpp_steps == 0:
            return 0.0
        u = min(1.0, (step - self.dense_steps) / max(1.0, self.ramp * self.rpp_steps))
        return self.target * (1 - (1 - u) ** 3)

    def phase(self, step: int) -> str:
        if step <= self.dense_steps and not self.hard_pruned:
            return "dense"
        return "rpp" if step <= self.prune_at and not self.hard_pruned else "recovery"

    def _set_lambda(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            if group.get("prune", True):
                group["rpp_lambda"] = value

    # Trainer hooks ---------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        named = pruned_named_params(self.optimizer)
        if step >= self.dense_steps:  # nothing is pruned before then
            self.last_sparsity = count_sparsity(self.optimizer)
        if step == self.dense_steps and self.dense_steps > 0:
            control.should_evaluate = True
        if step < self.dense_steps:
            self._set_lambda(0.0)
        elif step < self.prune_at and self.target > 0:
            gap = self.scheduled(step + 1) - self.last_sparsity
            change = self.gain * gap / self.target
            self.lam *= math.exp(max(-self.max_change, min(self.max_change, change)))
            self.lam = min(max(self.lam, 1e-6), 1e6)
            self._set_lambda(self.lam)
        elif step == self.prune_at and not self.hard_pruned:
            self.pre_prune_sparsity = self.last_sparsity
            masks = hard_prune(named, self.target, self.block, self.prune_by)
            freeze_with_masks(self.optimizer, named, masks)
            self._set_lambda(0.0)
            self.hard_pruned = True
            self.last_sparsity = count_sparsity(self.optimizer)
            self.mask_digest = mask_digest(named)
            self.ranks_agree = ranks_agree(self.mask_digest)
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
        fields = {"rpp_lambda": self.lam if not self.hard_pruned else 0.0, "sparsity": self.last_sparsity}
        for row in layer_table(pruned_named_params(self.optimizer), (1, 1)):
            fields[f"sparsity/{row['name']}"] = row["sparsity"]
        return fields

    # checkpoint ------------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "target": self.target,
            "block_size": list(self.block),
            "dense_steps": self.dense_steps,
            "rpp_steps": self.rpp_steps,
            "recovery_steps": self.recovery_steps,
        }

    def state_dict(self) -> dict:
        return {
            "config": self.config(),
            "lam": self.lam,
            "hard_pruned": self.hard_pruned,
            "evals": self.evals,
            "pre_prune_sparsity": self.pre_prune_sparsity,
            "mask_digest": self.mask_digest,
            "ranks_agree": self.ranks_agree,
            "last_sparsity": self.last_sparsity,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config():
            diff = [k for k in self.config() if state["config"].get(k) != self.config()[k]]
            raise UsageError(
                f"checkpoint was made with different settings ({', '.join(diff)}); "
                "resume with the same --target-sparsity, --block-size and step counts"
            )
        for key in ("lam", "hard_pruned", "evals", "pre_prune_sparsity", "mask_digest", "ranks_agree"):
            setattr(self, key, state[key])
        self.last_sparsity = state.get("last_sparsity", 0.0)
