"""`prune`: RPP on the masked-LM objective through `transformers.Trainer`, steered to a target
sparsity, the hard prune to exactly that target, frozen-mask recovery steps, and a same-budget dense
reference run to compare against. Works under `torchrun` (only rank 0 writes) and publishes its
output directory atomically (docs/design.md, "Pruning")."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from rpp_triton import artifacts as A
from rpp_triton.errors import UsageError
from rpp_triton.models import mlm_head
from rpp_triton.tiles import layer_table
from rpp_triton.training.config import PruneConfig
from rpp_triton.training.controller import SparsityController
from rpp_triton.training.hub import load_pretrained, max_positions, resolve_model, training_arguments
from rpp_triton.training.trainer import MaskedPositions, make_trainer_class, pruned_named_params


def _mlm_metrics(eval_pred) -> dict:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    keep = labels != -100
    return {"mlm_accuracy": float((preds[keep] == labels[keep]).mean()) if keep.any() else 0.0}


def _argmax_logits(logits, labels):
    return logits.argmax(-1)


DENSE_PROTOCOL = (
    "same budget: a second run from the same checkpoint, head initialisation, seed, data order, "
    "learning rates and number of steps, with lambda = 0 and no hard prune"
)


class _MLMRun:
    """One masked-LM Trainer run: the model (seeded, so a fresh head starts the same every time),
    RPPAdamW, the sparsity controller and the Trainer, writing to `out`."""

    def __init__(self, cfg: PruneConfig, model_name, data, out, target, steps, checkpoints=True):
        from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, set_seed

        from rpp_triton import RPPAdamW

        tokenizer, train_blocks, eval_blocks = data
        dense_steps, rpp_steps, recovery_steps = steps
        set_seed(cfg.seed)
        model, info = load_pretrained(AutoModelForMaskedLM, model_name, output_loading_info=True)
        prefix = model.base_model_prefix + "."
        self.head_new = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        self.tied = out_emb is not None and out_emb.weight is in_emb.weight
        try:
            self.optimizer = RPPAdamW(_mlm_groups(model, cfg, self.head_new), lr=cfg.lr)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.controller = SparsityController(
            self.optimizer,
            target,
            cfg.block_size,
            dense_steps,
            rpp_steps,
            recovery_steps,
            init_lambda=cfg.rpp_lambda,
            gain=cfg.lambda_gain,
            prune_by=cfg.prune_by,
        )
        max_steps = sum(steps)
        targs = training_arguments(
            out,
            max_steps=max_steps,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(dense_steps, 20),
            save_steps=cfg.save_steps or max_steps,
            save_strategy="steps" if cfg.save_steps and checkpoints else "no",
            save_total_limit=None if cfg.keep_checkpoints else 2,
            logging_steps=cfg.logging_steps,
            seed=cfg.seed,
            eval_strategy="no",
        )
        head = mlm_head(model)
        self.trainer = make_trainer_class()(
            model=model,
            args=targs,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability),
            processing_class=tokenizer,
            optimizers=(self.optimizer, None),
            callbacks=[self.controller],
            compute_metrics=None if head else _mlm_metrics,
            preprocess_logits_for_metrics=None if head else _argmax_logits,
        )
        self.trainer.controller = self.controller
        self.trainer.masked_lm = MaskedPositions(head) if head is not None else None


def _mlm_groups(model, cfg: PruneConfig, head_new: list[str]) -> list[dict]:
    """The default pruning split, with a freshly initialised masked-LM head (MiniLM ships without
    one) in its own group at `head_lr_scale` x the learning rate, so it fits within the budget."""
    from rpp_triton import param_groups

    groups = param_groups(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        rpp_lambda=cfg.rpp_lambda,
        reweight_every=cfg.reweight_every,
        reweight_eps=cfg.reweight_eps,
        block_size=cfg.block_size,
        backend=cfg.backend,
    )
    new = set(head_new)
    out = []
    for group in groups:
        if group["prune"] or not new or cfg.head_lr_scale == 1:
            out.append(group)
            continue
        pairs = list(zip(group["param_names"], group["params"]))
        for is_new in (False, True):
            chosen = [(n, p) for n, p in pairs if (n in new) == is_new]
            if chosen:
                names, params = [n for n, _ in chosen], [p for _, p in chosen]
                lr = cfg.lr * (cfg.head_lr_scale if is_new else 1.0)
                out.append({**group, "params": params, "param_names": names, "lr": lr})
    return out


def prune(config: PruneConfig) -> dict:
    """Run `rpp-triton prune`; returns the report written to rpp_report.json."""
    from transformers import AutoTokenizer

    from rpp_triton.data import text as D

    started = time.time()
    cfg = config.resolved()
    dense_steps, rpp_steps, recovery_steps = cfg.steps()
    partial = A.check_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume_from_checkpoint)
    controller_state = None
    if cfg.resume_from_checkpoint:
        controller_state = A.check_checkpoint(cfg.resume_from_checkpoint)
        if controller_state is None:
            raise UsageError(f"checkpoint {cfg.resume_from_checkpoint!r} has no {A.CONTROLLER_FILE}")

    model_name, _ = resolve_model(cfg.model)
    tokenizer = load_pretrained(AutoTokenizer, model_name)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"tokenizer of {model_name!r} has no mask token, so it cannot do masked LM")
    if cfg.dataset is None:
        train_text, held_text = D.default_text()
        dataset_name = "pydoc_data.topics"
    else:
        train_text, held_text = D.load_text(cfg.dataset, cfg.text_column)
        dataset_name = cfg.dataset

    seq_len = min(cfg.seq_len, max_positions(model_name, cfg.seq_len))
    train_blocks = D.mlm_blocks(tokenizer, train_text, seq_len)
    eval_blocks = D.static_masked_eval(
        tokenizer, D.mlm_blocks(tokenizer, held_text, seq_len)[: cfg.eval_blocks]
    )
    if not train_blocks or not eval_blocks:
        raise UsageError(f"dataset {dataset_name!r} is too short for blocks of {seq_len} tokens")

    block = cfg.block_size
    data = (tokenizer, train_blocks, eval_blocks)
    steps = (dense_steps, rpp_steps, recovery_steps)
    run = _MLMRun(cfg, model_name, data, partial, cfg.target_sparsity, steps)
    trainer, controller, optimizer = run.trainer, run.controller, run.optimizer
    if controller_state is not None:
        controller.load_state_dict(controller_state)

    A.start_partial(partial, cfg.resume_from_checkpoint)
    want_reference = cfg.target_sparsity > 0 and cfg.dense_reference == "same-budget"
    if want_reference and "dense_reference" not in controller.evals:
        # Same start, head initialisation, data order, learning rates and step count; lambda = 0
        # and no hard prune. The pruned model's accuracy is compared against this.
        ref_dir = os.path.join(partial, "dense-reference")
        ref = _MLMRun(
            cfg, model_name, data, ref_dir, 0.0, (dense_steps, rpp_steps + recovery_steps, 0), False
        )
        ref.trainer.train()
        controller.evals["dense_reference"] = ref.controller.evals["final"]
        del ref
        if A.is_main_process():
            shutil.rmtree(ref_dir, ignore_errors=True)
    if dense_steps == 0 and cfg.resume_from_checkpoint is None:
        trainer.evaluate()  # the state before any training
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    head_new, tied = run.head_new, run.tied

    named = pruned_named_params(optimizer)
    layers = layer_table(named, block)
    zeros = sum(round(r["sparsity"] * np.prod(r["shape"])) for r in layers)
    total = sum(int(np.prod(r["shape"])) for r in layers)
    evals = controller.evals

    def mlm(key):
        m = evals.get(key)
        return (
            None
            if m is None
            else {"mlm_accuracy": m.get("eval_mlm_accuracy"), "mlm_loss": m.get("eval_loss")}
        )

    if cfg.target_sparsity == 0:
        dense, protocol = mlm("final"), "this run: target sparsity 0 trains densely for the whole budget"
    elif "dense_reference" in evals:
        dense, protocol = mlm("dense_reference"), DENSE_PROTOCOL
    else:
        dense, protocol = None, "none (--dense-reference none)"
    report = {
        "sparsity": zeros / total,
        "target_sparsity": cfg.target_sparsity,
        "block_size": list(block),
        "layers": layers,
        "dense": dense,
        "pruned": mlm("final"),
        "dense_reference": protocol,
        "dense_before_pruning": mlm("dense"),
        "pruned_before_recovery": mlm("hard_pruned"),
        "sparsity_before_hard_prune": controller.pre_prune_sparsity,
        "steps": {
            "dense": dense_steps,
            "rpp": rpp_steps,
            "recovery": recovery_steps,
            "total": cfg.max_steps,
        },
        "final_lambda": controller.lam,
        "prune_by": cfg.prune_by,
        "model": "all-MiniLM-L6-v2 (embedded)" if cfg.model is None else cfg.model,
        "dataset": dataset_name,
        "seq_len": seq_len,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "head_lr_scale": cfg.head_lr_scale,
        "world_size": A.world_size(),
        "masks_identical_on_all_ranks": controller.ranks_agree,
        "mask_digest": controller.mask_digest,
        "newly_initialised": head_new,
        "output_embeddings_tied": tied,
        "seconds": round(time.time() - started, 1),
    }
    if head_new:
        report["note"] = (
            "the checkpoint has no masked-LM head: it was initialised fresh"
            + (" with its decoder tied to the word embeddings" if tied else "")
            + f"; it trains at {cfg.head_lr_scale:g}x the learning rate"
        )
    if trainer.is_world_process_zero():
        trainer.save_model(partial)
        A.save_masks(os.path.join(partial, A.MASKS_FILE), named, block)
        A.write_json(partial, A.LOG_FILE, trainer.state.log_history)
        A.write_json(partial, A.REPORT_FILE, report)
        A.publish(partial, cfg.output_dir, cfg.keep_checkpoints)
        _print_summary(report, cfg.output_dir)
    return report


def _print_summary(report: dict, out: str) -> None:
    def fmt(m):
        if not m:
            return "n/a"
        return f"accuracy {m['mlm_accuracy']:.4f}, loss {m['mlm_loss']:.4f}"

    bh, bw = report["block_size"]
    print("masked LM on held-out text")
    print(f"  dense, same budget:  {fmt(report['dense'])}")
    print(f"  pruned ({report['sparsity']:.1%} sparse, {bh}x{bw} tiles): {fmt(report['pruned'])}")
    print(f"wrote {out} ({report['seconds']} s)")
