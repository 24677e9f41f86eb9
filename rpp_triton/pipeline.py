"""Fine-tuning with frozen masks: `finetune_pipeline` (a downstream task). It builds on
`transformers.Trainer`, works under `torchrun` (only rank 0 writes) and publishes its output
directory atomically."""

from __future__ import annotations

import json
import os
import time

import torch

from rpp_triton import artifacts as A
from rpp_triton.errors import UsageError
from rpp_triton.tiles import layer_table, mask_digest, sparsity_of
from rpp_triton.training import hub as common
from rpp_triton.training import trainer as T

# ---------------------------------------------------------------------------------------------
# Fine-tuning with frozen masks


def apply_masks(model, masks: dict) -> None:
    params = dict(model.named_parameters())
    prefix = model.base_model_prefix + "."
    with torch.no_grad():
        for name, mask in masks.items():
            candidates = (name, prefix + name, name.removeprefix(prefix))
            p = next((params[c] for c in candidates if c in params), None)
            if p is None or p.shape != mask.shape:
                raise UsageError(f"mask {name!r} of {A.MASKS_FILE} matches no parameter of the model")
            p.mul_(mask.to(p.dtype))


def _task_metrics(spec):
    from rpp_triton import metrics as M

    def compute(eval_pred):
        preds, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(preds, tuple):
            preds = preds[0]
        preds = preds.reshape(-1) if spec.kind == "regression" else preds.argmax(-1)
        return M.compute(spec.metrics, preds, labels)

    return compute


def start_finetune(args) -> tuple[str, str, dict | None, dict | None]:
    """Checks shared by every fine-tuning (output dir, checkpoint, model): returns the partial
    output dir, the resolved model name, and the pruned model's report and masks (None if dense)."""
    partial = A.check_output_dir(args.output_dir, args.overwrite, args.resume_from_checkpoint)
    if args.resume_from_checkpoint:
        A.check_checkpoint(args.resume_from_checkpoint)
    model_name, _ = common.resolve_model(args.model)
    source_report, masks = A.source_pruning(model_name)
    return partial, model_name, source_report, masks


def frozen_mask_optimizer(model, masks: dict | None, source_report: dict | None, args):
    """RPPAdamW over `model` with the pruned model's masks applied and frozen, for fine-tuning.
    Returns the optimizer, its pruned (name, parameter) pairs and the tile shape."""
    from rpp_triton import RPPAdamW, param_groups

    block = tuple(source_report["block_size"]) if source_report else (1, 1)
    if masks:
        apply_masks(model, masks)
    try:
        optimizer = RPPAdamW(
            param_groups(
                model, lr=args.lr, weight_decay=args.weight_decay, block_size=block, backend=args.backend
            ),
            lr=args.lr,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    optimizer.freeze_masks()
    return optimizer, T.pruned_named_params(optimizer), block


def publish_finetuned(trainer, partial, args, report, named, block, source_report, layers=None) -> None:
    """Rank 0: write a fine-tuned model, its masks, rpp_report.json (sparsity after fine-tuning),
    finetune_report.json and the training log into `partial`, then move it into place."""
    trainer.save_model(partial)
    pruning = {
        "sparsity": report["sparsity_after"],
        "target_sparsity": (source_report or {}).get("target_sparsity", 0.0),
        "block_size": list(block),
        "layers": layers if layers is not None else layer_table(named, block),
        "finetune": {k: report[k] for k in ("task", "metrics", "sparsity_before", "sparsity_after")},
    }
    A.save_masks(os.path.join(partial, A.MASKS_FILE), named, block)
    for name, obj in (
        (A.REPORT_FILE, pruning),
        ("finetune_report.json", report),
        (A.LOG_FILE, trainer.state.log_history),
    ):
        with open(os.path.join(partial, name), "w") as f:
            json.dump(obj, f, indent=1)
    A.publish(partial, args.output_dir, args.keep_checkpoints)


def finetune_training_arguments(partial: str, args, **extra):
    """TrainingArguments shared by every frozen-mask fine-tuning (classification, QA)."""
    return common.training_arguments(
        partial,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        save_steps=args.save_steps or 1,
        save_strategy="steps" if args.save_steps else "no",
        save_total_limit=None if args.keep_checkpoints else 2,
        logging_steps=args.logging_steps,
        seed=args.seed,
        eval_strategy="no",
        **extra,
    )


def finetune_pipeline(args) -> dict:
    """Run `rpp-triton finetune`; returns the report written to finetune_report.json."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        set_seed,
    )

    from rpp_triton.data import tasks as D

    started = time.time()
    partial, model_name, source_report, masks = start_finetune(args)
    task = D.load_task(
        args.task,
        args.train_file,
        args.validation_file,
        args.text_column,
        args.text_pair_column,
        args.label_column,
        args.regression,
    )
    tokenizer = common.load_pretrained(AutoTokenizer, model_name)

    def encode(rows):
        enc = tokenizer(
            [r["text"] for r in rows],
            [r["text_pair"] for r in rows] if rows and rows[0]["text_pair"] is not None else None,
            truncation=True,
            max_length=args.max_length,
        )
        return [{**{k: v[i] for k, v in enc.items()}, "labels": r["label"]} for i, r in enumerate(rows)]

    train_rows, eval_rows = encode(task.train), encode(task.eval)

    set_seed(args.seed)
    kwargs = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
    if task.spec.kind == "regression":
        kwargs["problem_type"] = "regression"
    else:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    model = common.load_pretrained(AutoModelForSequenceClassification, model_name, **kwargs)
    optimizer, named, block = frozen_mask_optimizer(model, masks, source_report, args)
    sparsity_before, digest_before = sparsity_of(w for _, w in named), mask_digest(named)

    A.start_partial(partial, args.resume_from_checkpoint)
    targs = finetune_training_arguments(partial, args, per_device_eval_batch_size=args.batch_size)
    trainer = T.make_trainer_class()(
        model=model,
        args=targs,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        compute_metrics=_task_metrics(task.spec),
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()

    sparsity_after, digest_after = sparsity_of(w for _, w in named), mask_digest(named)
    if digest_after != digest_before:
        raise RuntimeError("the sparsity pattern changed during fine-tuning although the masks were frozen")
    layers = layer_table(named, block)
    report = {
        "task": task.spec.name,
        "metrics": {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if k != "epoch"},
        "metric_names": list(task.spec.metrics),
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "masks_unchanged": True,
        "masks_identical_on_all_ranks": T.ranks_agree(digest_after),
        "model": "all-MiniLM-L6-v2 (embedded)" if args.model is None else args.model,
        "labels": task.label_names,
        "train_examples": len(train_rows),
        "eval_examples": len(eval_rows),
        "steps": trainer.state.global_step,
        "world_size": A.world_size(),
        "seconds": round(time.time() - started, 1),
    }
    if trainer.is_world_process_zero():
        publish_finetuned(trainer, partial, args, report, named, block, source_report, layers)
        shown = ", ".join(
            f"{k} {report['metrics'][k]:.4f}" for k in task.spec.metrics if k in report["metrics"]
        )
        print(f"{task.spec.name}: {shown}")
        print(f"sparsity before {sparsity_before:.4f}, after {sparsity_after:.4f} (masks frozen)")
        print(f"wrote {args.output_dir} ({report['seconds']} s)")
    return report
