"""The two training runs behind the CLI: `prune_pipeline` (RPP on masked LM) and
`finetune_pipeline` (a downstream task with frozen masks). Both build on `transformers.Trainer`,
work under `torchrun` (only rank 0 writes) and publish their output directory atomically."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import torch

from rpp_triton import train as T
from rpp_triton.commands import common
from rpp_triton.errors import UsageError


def _fill(args, defaults: dict) -> None:
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _split_steps(args) -> tuple[int, int, int]:
    dense = args.dense_steps if args.dense_steps is not None else max(1, args.max_steps // 10)
    recovery = args.recovery_steps if args.recovery_steps is not None else (args.max_steps * 15) // 100
    if args.target_sparsity == 0:
        recovery = 0
    rpp = args.max_steps - dense - recovery
    if rpp < 1:
        raise UsageError(
            f"--max-steps {args.max_steps} leaves no RPP steps after {dense} dense "
            f"and {recovery} recovery steps"
        )
    return dense, rpp, recovery


def _mlm_metrics(eval_pred) -> dict:
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    keep = labels != -100
    return {"mlm_accuracy": float((preds[keep] == labels[keep]).mean()) if keep.any() else 0.0}


def _argmax_logits(logits, labels):
    return logits.argmax(-1)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


DENSE_PROTOCOL = (
    "same budget: a second run from the same checkpoint, head initialisation, seed, data order, "
    "learning rates and number of steps, with lambda = 0 and no hard prune"
)


def _max_positions(model_name: str, default: int) -> int:
    from transformers import AutoConfig

    config = common.load_pretrained(AutoConfig, model_name)
    return getattr(config, "max_position_embeddings", None) or default


class _MLMRun:
    """One masked-LM Trainer run: the model (seeded, so a fresh head starts the same every time),
    RPPAdamW, the sparsity controller and the Trainer, writing to `out`."""

    def __init__(self, args, model_name, data, out, target, steps, checkpoints=True):
        from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling, set_seed

        from rpp_triton import RPPAdamW

        tokenizer, train_blocks, eval_blocks = data
        dense_steps, rpp_steps, recovery_steps = steps
        set_seed(args.seed)
        model, info = common.load_pretrained(AutoModelForMaskedLM, model_name, output_loading_info=True)
        prefix = model.base_model_prefix + "."
        self.head_new = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        self.tied = out_emb is not None and out_emb.weight is in_emb.weight
        try:
            self.optimizer = RPPAdamW(_mlm_groups(model, args, self.head_new), lr=args.lr)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.controller = T.SparsityController(
            self.optimizer,
            target,
            args.block_size,
            dense_steps,
            rpp_steps,
            recovery_steps,
            init_lambda=args.rpp_lambda,
            gain=args.lambda_gain,
            prune_by=args.prune_by,
        )
        max_steps = sum(steps)
        targs = common.training_arguments(
            out,
            max_steps=max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=min(dense_steps, 20),
            save_steps=args.save_steps or max_steps,
            save_strategy="steps" if args.save_steps and checkpoints else "no",
            save_total_limit=None if args.keep_checkpoints else 2,
            logging_steps=args.logging_steps,
            seed=args.seed,
            eval_strategy="no",
        )
        head = T.mlm_head(model)
        self.trainer = T.make_trainer_class()(
            model=model,
            args=targs,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=args.mlm_probability),
            processing_class=tokenizer,
            optimizers=(self.optimizer, None),
            callbacks=[self.controller],
            compute_metrics=None if head else _mlm_metrics,
            preprocess_logits_for_metrics=None if head else _argmax_logits,
        )
        self.trainer.controller = self.controller
        self.trainer.masked_lm = T.MaskedPositions(head) if head is not None else None


def _mlm_groups(model, args, head_new: list[str]) -> list[dict]:
    """The default pruning split, with a freshly initialised masked-LM head (MiniLM ships without
    one) in its own group at `head_lr_scale` x the learning rate, so it fits within the budget."""
    from rpp_triton import param_groups

    groups = param_groups(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        rpp_lambda=args.rpp_lambda,
        reweight_every=args.reweight_every,
        reweight_eps=args.reweight_eps,
        block_size=args.block_size,
        backend=args.backend,
    )
    new = set(head_new)
    out = []
    for group in groups:
        if group["prune"] or not new or args.head_lr_scale == 1:
            out.append(group)
            continue
        pairs = list(zip(group["param_names"], group["params"]))
        for is_new in (False, True):
            chosen = [(n, p) for n, p in pairs if (n in new) == is_new]
            if chosen:
                names, params = [n for n, _ in chosen], [p for _, p in chosen]
                lr = args.lr * (args.head_lr_scale if is_new else 1.0)
                out.append({**group, "params": params, "param_names": names, "lr": lr})
    return out


def prune_pipeline(args) -> dict:
    """Run `rpp-triton prune`; returns the report written to rpp_report.json."""
    from transformers import AutoTokenizer

    from rpp_triton import data as D
    from rpp_triton.commands.prune import EMBEDDED, GENERAL

    started = time.time()
    embedded = args.model is None and args.dataset is None
    _fill(args, EMBEDDED if embedded else GENERAL)
    dense_steps, rpp_steps, recovery_steps = _split_steps(args)
    partial = T.check_output_dir(args.output_dir, args.overwrite, args.resume_from_checkpoint)
    controller_state = None
    if args.resume_from_checkpoint:
        controller_state = T.check_checkpoint(args.resume_from_checkpoint)
        if controller_state is None:
            raise UsageError(f"checkpoint {args.resume_from_checkpoint!r} has no {T.CONTROLLER_FILE}")

    model_name, _ = common.resolve_model(args.model)
    tokenizer = common.load_pretrained(AutoTokenizer, model_name)
    if tokenizer.mask_token_id is None:
        raise UsageError(f"tokenizer of {model_name!r} has no mask token, so it cannot do masked LM")
    if args.dataset is None:
        train_text, held_text = D.default_text()
        dataset_name = "pydoc_data.topics"
    else:
        train_text, held_text = D.load_text(args.dataset, args.text_column)
        dataset_name = args.dataset

    seq_len = min(args.seq_len, _max_positions(model_name, args.seq_len))
    train_blocks = D.mlm_blocks(tokenizer, train_text, seq_len)
    eval_blocks = D.static_masked_eval(
        tokenizer, D.mlm_blocks(tokenizer, held_text, seq_len)[: args.eval_blocks]
    )
    if not train_blocks or not eval_blocks:
        raise UsageError(f"dataset {dataset_name!r} is too short for blocks of {seq_len} tokens")

    block = args.block_size
    data = (tokenizer, train_blocks, eval_blocks)
    steps = (dense_steps, rpp_steps, recovery_steps)
    run = _MLMRun(args, model_name, data, partial, args.target_sparsity, steps)
    trainer, controller, optimizer = run.trainer, run.controller, run.optimizer
    if controller_state is not None:
        controller.load_state_dict(controller_state)

    T.start_partial(partial, args.resume_from_checkpoint)
    want_reference = args.target_sparsity > 0 and args.dense_reference == "same-budget"
    if want_reference and "dense_reference" not in controller.evals:
        # Same start, head initialisation, data order, learning rates and step count; lambda = 0
        # and no hard prune. The pruned model's accuracy is compared against this.
        ref_dir = os.path.join(partial, "dense-reference")
        ref = _MLMRun(
            args, model_name, data, ref_dir, 0.0, (dense_steps, rpp_steps + recovery_steps, 0), False
        )
        ref.trainer.train()
        controller.evals["dense_reference"] = ref.controller.evals["final"]
        del ref
        if T.is_main_process():
            shutil.rmtree(ref_dir, ignore_errors=True)
    if dense_steps == 0 and args.resume_from_checkpoint is None:
        trainer.evaluate()  # the state before any training
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    head_new, tied = run.head_new, run.tied

    named = T.pruned_named_params(optimizer)
    layers = T.layer_table(named, block)
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

    if args.target_sparsity == 0:
        dense, protocol = mlm("final"), "this run: target sparsity 0 trains densely for the whole budget"
    elif "dense_reference" in evals:
        dense, protocol = mlm("dense_reference"), DENSE_PROTOCOL
    else:
        dense, protocol = None, "none (--dense-reference none)"
    report = {
        "sparsity": zeros / total,
        "target_sparsity": args.target_sparsity,
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
            "total": args.max_steps,
        },
        "final_lambda": controller.lam,
        "prune_by": args.prune_by,
        "model": "all-MiniLM-L6-v2 (embedded)" if args.model is None else args.model,
        "dataset": dataset_name,
        "seq_len": seq_len,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "head_lr_scale": args.head_lr_scale,
        "world_size": world_size(),
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
            + f"; it trains at {args.head_lr_scale:g}x the learning rate"
        )
    if trainer.is_world_process_zero():
        trainer.save_model(partial)
        T.save_masks(os.path.join(partial, T.MASKS_FILE), named, block)
        with open(os.path.join(partial, T.LOG_FILE), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
        with open(os.path.join(partial, T.REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
        T.publish(partial, args.output_dir, args.keep_checkpoints)
        _print_summary(report, args.output_dir)
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


# ---------------------------------------------------------------------------------------------
# Fine-tuning with frozen masks


def source_pruning(model_dir: str) -> tuple[dict | None, dict | None]:
    """(rpp_report.json, masks) of a pruned model directory, or (None, None) for a plain model."""
    report = masks = None
    if os.path.isdir(model_dir):
        path = os.path.join(model_dir, T.REPORT_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    report = json.load(f)
            except ValueError:
                raise UsageError(f"{path!r} is not valid JSON") from None
        path = os.path.join(model_dir, T.MASKS_FILE)
        if os.path.isfile(path):
            try:
                masks = T.load_masks(path)
            except Exception:
                raise UsageError(f"{path!r} is corrupt") from None
    return report, masks


def apply_masks(model, masks: dict) -> None:
    params = dict(model.named_parameters())
    prefix = model.base_model_prefix + "."
    with torch.no_grad():
        for name, mask in masks.items():
            candidates = (name, prefix + name, name.removeprefix(prefix))
            p = next((params[c] for c in candidates if c in params), None)
            if p is None or p.shape != mask.shape:
                raise UsageError(f"mask {name!r} of {T.MASKS_FILE} matches no parameter of the model")
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
    partial = T.check_output_dir(args.output_dir, args.overwrite, args.resume_from_checkpoint)
    if args.resume_from_checkpoint:
        T.check_checkpoint(args.resume_from_checkpoint)
    model_name, _ = common.resolve_model(args.model)
    source_report, masks = source_pruning(model_name)
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
        "layers": layers if layers is not None else T.layer_table(named, block),
        "finetune": {k: report[k] for k in ("task", "metrics", "sparsity_before", "sparsity_after")},
    }
    T.save_masks(os.path.join(partial, T.MASKS_FILE), named, block)
    for name, obj in (
        (T.REPORT_FILE, pruning),
        ("finetune_report.json", report),
        (T.LOG_FILE, trainer.state.log_history),
    ):
        with open(os.path.join(partial, name), "w") as f:
            json.dump(obj, f, indent=1)
    T.publish(partial, args.output_dir, args.keep_checkpoints)


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

    from rpp_triton import data as D

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
    sparsity_before, digest_before = T.sparsity_of(w for _, w in named), T.mask_digest(named)

    T.start_partial(partial, args.resume_from_checkpoint)
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

    sparsity_after, digest_after = T.sparsity_of(w for _, w in named), T.mask_digest(named)
    if digest_after != digest_before:
        raise RuntimeError("the sparsity pattern changed during fine-tuning although the masks were frozen")
    layers = T.layer_table(named, block)
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
        "world_size": world_size(),
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
