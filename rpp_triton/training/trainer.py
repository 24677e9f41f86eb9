"""The `transformers.Trainer` every run uses, and what it needs to know about the optimizer: which
parameters are pruned, how sparse they are, and whether every rank holds the same masks."""

from __future__ import annotations

import torch

from rpp_triton.tiles import sparsity_of


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


def _process_group():
    """`torch.distributed` when this process is one of several in an initialised group, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def ranks_agree(digest: str) -> bool:
    """True when every rank holds the same digest (trivially true on one process)."""
    dist = _process_group()
    if dist is None:
        return True
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, digest)
    return len(set(gathered)) == 1


def broadcast_from_first(tensors) -> None:
    """Copy rank 0's values of `tensors` to every rank (nothing on one process): for results that
    each rank computes itself but that floating-point solves may round differently per device."""
    dist = _process_group()
    for t in tensors if dist is not None else ():
        dist.broadcast(t.data, src=0)


def make_trainer_class():
    """`Trainer` whose logs carry lambda and per-layer sparsity, so TensorBoard and the training
    log get them. With `objective` set (an `objectives.Objective`) it computes the loss and the
    held-out evaluation."""
    from transformers import Trainer
    from transformers.trainer_callback import ProgressCallback

    class ConsoleProgress(ProgressCallback):
        """The progress bar's log lines without the per-layer sparsity (TensorBoard and
        training_log.json keep it): 36+ numbers per line buried the loss and lambda."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if not k.startswith("sparsity/")}
            return super().on_log(args, state, control, logs=logs, **kwargs)

    class RPPTrainer(Trainer):
        controller = None  # a SparsityController, whose log fields join the logs
        objective = None
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
            if self.objective is None or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self.objective.loss(model, self.objective.mask(inputs, self._mask_seed()))

        def _mask_seed(self) -> int:
            """A seed per (run seed, step, rank, micro-batch), the same after a resume."""
            step = self.state.global_step
            self._micro = self._micro + 1 if getattr(self, "_micro_step", None) == step else 0
            self._micro_step = step
            return hash((self.args.seed, step, self.args.process_index, self._micro)) & (2**63 - 1)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if self.objective is None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            # Every rank scores the whole (small) held-out set with identical weights, so no gather.
            data = eval_dataset if eval_dataset is not None else self.eval_dataset
            scores = self.objective.evaluate(self.model, data, self.args.eval_batch_size)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return RPPTrainer
