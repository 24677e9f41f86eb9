"""Training pipeline on top of `transformers.Trainer`: RPP pruning on masked LM steered to a target
sparsity, the hard prune to exactly that target, and fine-tuning with frozen masks.

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

import torch

from rpp_triton.artifacts import (  # noqa: F401 - re-exported while the pipeline moves
    CONTROLLER_FILE,
    LOG_FILE,
    MASKS_FILE,
    REPORT_FILE,
    check_checkpoint,
    check_output_dir,
    is_main_process,
    load_masks,
    publish,
    save_masks,
    start_partial,
)
from rpp_triton.errors import UsageError
from rpp_triton.models import mlm_head  # noqa: F401
from rpp_triton.tiles import (  # noqa: F401
    as_block,
    count_nonzero,
    hard_prune,
    layer_table,
    mask_digest,
    sparsity_of,
)


def freeze_with_masks(optimizer, named: list[tuple[str, torch.Tensor]], masks: dict) -> None:
    """Freeze the optimizer's masks at exactly `masks` ({name: bool mask}). A kept tile that RPP
    had already zeroed (the sparsity overshot the target) stays kept, so the recovery steps grow
    it back and the pruned share stays the target."""
    optimizer.freeze_masks({p: masks[name] for name, p in named})


def count_sparsity(optimizer) -> float:
    """Share of zeros over the pruned weights: the kernel's own counts on the GPU."""
    named = pruned_named_params(optimizer)
    if any(p.is_cuda for _, p in named):
        return optimizer.sparsity()
    return sparsity_of(p for _, p in named)


def pruned_named_params(optimizer) -> list[tuple[str, torch.Tensor]]:
    out = []
    for group in optimizer.param_groups:
        if group.get("prune", True):
            names = group.get("param_names") or [f"param{i}" for i in range(len(group["params"]))]
            out.extend(zip(names, group["params"]))
    return out


def ranks_agree(digest: str) -> bool:
    """True when every rank holds the same digest (trivially true on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return len(set(gathered)) == 1


# ---------------------------------------------------------------------------------------------
# Lambda controller


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


class MaskedPositions:
    """Forward pre-hook on the masked-LM head: while `select` is set, only the positions it marks
    (the ~15% that carry a label) reach the head. MiniLM's head projects 384 features onto 30522
    words, more arithmetic than the whole encoder when it runs on every position."""

    def __init__(self, head):
        self.select = None
        head.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.select is None:
            return None
        return (args[0][self.select], *args[1:])

    def loss(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the labelled positions, their predictions, their labels)."""
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        self.select = labels != -100
        try:
            logits = model(**inputs).logits
        finally:
            select, self.select = self.select, None
        target = labels[select]
        if target.numel() == 0:
            return logits.sum() * 0.0, target, target
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        return loss, logits.argmax(-1), target


def make_trainer_class():
    """`Trainer` whose logs carry lambda and per-layer sparsity, so TensorBoard and the training
    log get them. With `masked_lm` set (a `MaskedPositions`) the loss and the evaluation run the
    masked-LM head on labelled positions only."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class ConsoleProgress(ProgressCallback):
        """The progress bar's log lines without the per-layer sparsity (TensorBoard and
        training_log.json keep it): 36+ numbers per line buried the loss and lambda."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if not k.startswith("sparsity/")}
            return super().on_log(args, state, control, logs=logs, **kwargs)

    class RPPTrainer(Trainer):
        controller: SparsityController | None = None
        masked_lm: MaskedPositions | None = None
        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.pop_callback(ProgressCallback) is not None:
                self.add_callback(ConsoleProgress)

        def log(self, logs, *args, **kwargs):
            if self.controller is not None and "loss" in logs:
                logs = {**logs, **self.controller.log_fields()}
            return super().log(logs, *args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.masked_lm is None or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self.masked_lm.loss(model, inputs)[0]

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if self.masked_lm is None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            # Every rank scores the whole (small) held-out set with identical weights, so no gather.
            data = eval_dataset if eval_dataset is not None else self.eval_dataset
            metrics = {
                f"{metric_key_prefix}_{k}": v
                for k, v in evaluate_mlm(self.model, data, self.masked_lm, self.args.eval_batch_size).items()
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return RPPTrainer


@torch.no_grad()
def evaluate_mlm(model, blocks: list[dict], masked_lm: MaskedPositions, batch_size: int) -> dict:
    """Masked-LM loss (mean over labelled tokens) and accuracy on pre-masked `blocks`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            rows = blocks[start : start + batch_size]
            batch = {k: torch.tensor([r[k] for r in rows], device=device) for k in rows[0]}
            loss, preds, labels = masked_lm.loss(model, batch)
            loss_sum += float(loss) * labels.numel()
            correct += int((preds == labels).sum())
            count += labels.numel()
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(count, 1), "mlm_accuracy": correct / max(count, 1)}


def default_report_to() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]
