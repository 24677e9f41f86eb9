"""Fine-tuning with frozen masks (`finetune`) and scoring a saved question-answering model
(`evaluate`).

One runner serves every task kind. The checks that need no weights come first (output directory,
checkpoint and the settings it was trained with, the source model's report and masks, the input
length against the model's positions, TrainingArguments); then the data, the model with the pruned
model's masks applied and frozen in RPPAdamW, `transformers.Trainer`, the scores before and after,
and the output directory, published atomically. What differs between task kinds (model class,
features, metrics, report fields) is a small adapter: `_Classification` or `_QuestionAnswering`.
Works under `torchrun` (only rank 0 writes).
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import pickle
import time
import zipfile

import torch

from rpp_triton import artifacts as A
from rpp_triton.data.tasks import load_task
from rpp_triton.errors import UsageError
from rpp_triton.metrics import score_logits
from rpp_triton.models import find_parameter
from rpp_triton.qa.data import describe_skips, load_qa_task
from rpp_triton.qa.evaluate import evaluate_qa
from rpp_triton.qa.features import prepare_train_features
from rpp_triton.tiles import layer_table, mask_digest, sparsity_of
from rpp_triton.training.config import EvaluateConfig, FinetuneConfig, TaskOptions
from rpp_triton.training.hub import (
    load_pretrained,
    load_tokenizer,
    max_positions,
    resolve_model,
    training_arguments,
)
from rpp_triton.training.trainer import make_trainer_class, pruned_named_params, ranks_agree

EMBEDDED_NAME = "all-MiniLM-L6-v2 (embedded)"
log = logging.getLogger("rpp_triton.finetune")

# ---------------------------------------------------------------------------------------------
# Checks that need no weights


class _Stub:
    """Stands in for every class a pickle names: keeps the state it is given, runs no code."""

    def __init__(self, *args):
        self.value = args[0] if args else None

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


class _StateOnly(pickle.Unpickler):
    def find_class(self, module, name):
        return _Stub

    def persistent_load(self, pid):
        return None


def saved_training_args(checkpoint: str) -> dict | None:
    """The `TrainingArguments` fields a Trainer checkpoint was written with (its
    training_args.bin), read without running any of the pickle's code; enums as their values.
    None where the file is missing or unreadable."""
    try:
        with zipfile.ZipFile(os.path.join(checkpoint, "training_args.bin")) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            args = _StateOnly(io.BytesIO(z.read(name))).load()
    except Exception:
        return None
    return {k: getattr(v, "value", v) for k, v in vars(args).items()} if isinstance(args, _Stub) else None


# TrainingArguments that must match the checkpoint's for a resumed run to continue the same run.
RESUMED_SETTINGS = {
    "seed": "--seed",
    "learning_rate": "--lr",
    "weight_decay": "--weight-decay",
    "per_device_train_batch_size": "--batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "lr_scheduler_type": "--lr-scheduler-type",
    "warmup_steps": "--warmup-ratio",
    "bf16": "--bf16",
    "fp16": "--fp16",
}


def check_resume_settings(checkpoint: str, targs) -> None:
    """Refuse, in one line, to resume a checkpoint with other training settings than its own."""
    saved = saved_training_args(checkpoint)
    if saved is None:
        log.warning("%s has no readable training_args.bin; its settings are not checked", checkpoint)
        return
    differ = []
    for key, name in RESUMED_SETTINGS.items():
        now = getattr(getattr(targs, key), "value", getattr(targs, key))
        if key in saved and saved[key] != now:
            differ.append(f"{name} {saved[key]} (now {now})")
    if differ:
        raise UsageError(
            f"checkpoint {checkpoint!r} was trained with different settings: {', '.join(differ)}; "
            "resume with the same ones"
        )


def _training_arguments(partial: str, cfg: FinetuneConfig):
    """TrainingArguments of a frozen-mask fine-tuning; bad pass-through values are UsageErrors."""
    from transformers.integrations import get_reporting_integration_callbacks

    extra = cfg.trainer_kwargs()
    try:
        get_reporting_integration_callbacks(extra.get("report_to", []))
        return training_arguments(
            partial,
            num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps or -1,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            save_steps=cfg.save_steps or 1,
            save_strategy="steps" if cfg.save_steps else "no",
            save_total_limit=None if cfg.keep_checkpoints else 2,
            logging_steps=cfg.logging_steps,
            seed=cfg.seed,
            eval_strategy="no",
            **extra,
        )
    except ValueError as exc:
        raise UsageError((str(exc).strip().splitlines() or ["bad TrainingArguments"])[0]) from None


def _prepare(config: FinetuneConfig):
    """Every check that needs no weights, cheapest first. Returns the resolved config, the
    working directory, the model name, the source model's report and masks, and TrainingArguments."""
    partial = A.check_output_dir(config.output_dir, config.overwrite, config.resume_from_checkpoint)
    if config.resume_from_checkpoint:
        A.check_checkpoint(config.resume_from_checkpoint)
    model_name, _ = resolve_model(config.model)
    source_report, masks = A.source_pruning(model_name)
    cfg = config.resolved(max_positions(model_name, None))
    targs = _training_arguments(partial, cfg)
    if cfg.resume_from_checkpoint:
        check_resume_settings(cfg.resume_from_checkpoint, targs)
    return cfg, partial, model_name, source_report, masks, targs


# ---------------------------------------------------------------------------------------------
# Frozen masks


def apply_masks(model, masks: dict) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            p = find_parameter(model, name)
            if p is None or p.shape != mask.shape:
                raise UsageError(f"mask {name!r} of {A.MASKS_FILE} matches no parameter of the model")
            p.mul_(mask.to(p.dtype))


def frozen_mask_optimizer(model, masks: dict | None, source_report: dict | None, cfg: FinetuneConfig):
    """RPPAdamW over `model` with the pruned model's masks applied and frozen. Returns the
    optimizer, its pruned (name, parameter) pairs and the tile shape."""
    from rpp_triton import RPPAdamW, param_groups

    block = tuple(source_report["block_size"]) if source_report else (1, 1)
    if masks:
        apply_masks(model, masks)
    try:
        groups = param_groups(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, block_size=block, backend=cfg.backend
        )
        optimizer = RPPAdamW(groups, lr=cfg.lr)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    optimizer.freeze_masks()
    return optimizer, pruned_named_params(optimizer), block


# ---------------------------------------------------------------------------------------------
# Task kinds


class _Classification:
    """Sequence classification and regression: GLUE, local files, datasets, pydoc-topics."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.data = load_task(cfg)
        self.name = self.data.spec.name
        self.metric_names = self.shown = list(self.data.spec.metrics)
        self.regression = self.data.spec.kind == "regression"

    def model(self, name: str):
        from transformers import AutoModelForSequenceClassification

        kwargs = {"num_labels": self.data.num_labels, "ignore_mismatched_sizes": True}
        if self.regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["id2label"] = dict(enumerate(self.data.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(self.data.label_names)}
        return load_pretrained(AutoModelForSequenceClassification, name, quiet=True, **kwargs)

    def _encode(self, tokenizer, rows: list[dict]) -> list[dict]:
        pairs = [r["text_pair"] for r in rows] if rows[0]["text_pair"] is not None else None
        enc = tokenizer([r["text"] for r in rows], pairs, truncation=True, max_length=self.cfg.max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": r["label"]} for i, r in enumerate(rows)]

    def features(self, tokenizer) -> tuple[list[dict], dict]:
        """(training features, the Trainer keywords that evaluate them)."""
        evaluation = {
            "eval_dataset": self._encode(tokenizer, self.data.eval),
            "compute_metrics": self._metrics,
        }
        return self._encode(tokenizer, self.data.train), evaluation

    def _metrics(self, eval_pred) -> dict:
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return score_logits(self.metric_names, logits, eval_pred.label_ids, self.regression)

    def evaluate(self, trainer) -> dict:
        # predict, not evaluate: it logs nothing, so scoring before training opens no TensorBoard
        # writer outside the run directory
        metrics = trainer.predict(trainer.eval_dataset, metric_key_prefix="eval").metrics
        return {k.removeprefix("eval_"): float(v) for k, v in metrics.items()}

    def report(self) -> dict:
        return {
            "labels": self.data.label_names,
            "train_examples": len(self.data.train),
            "eval_examples": len(self.data.eval),
        }


class _QuestionAnswering:
    """Extractive question answering (SQuAD v1.1/v2.0, pydoc-qa): context windows for training,
    the official scores of the task's version for evaluation."""

    shown = ("exact", "f1", "HasAns_f1", "NoAns_f1", "best_f1")
    metric_names = ["exact", "f1"]

    def __init__(self, cfg: TaskOptions, need_train: bool = True):
        self.cfg = cfg
        self.data = load_qa_task(cfg, need_train)
        self.name = self.data.name
        self.skipped = collections.Counter(self.data.skipped)
        self.eval_skipped: dict[str, int] = {}
        self.train_windows = 0

    def model(self, name: str, **kwargs):
        from transformers import AutoModelForQuestionAnswering

        return load_pretrained(AutoModelForQuestionAnswering, name, quiet=True, **kwargs)

    def features(self, tokenizer) -> tuple[list[dict], dict]:
        cfg = self.cfg
        rows = prepare_train_features(
            tokenizer, self.data.train, cfg.max_length, cfg.doc_stride, self.skipped
        )
        if not rows:
            raise UsageError(f"no usable training questions ({describe_skips(self.skipped)})")
        self.train_windows = len(rows)
        return rows, {}

    def score(self, model, tokenizer) -> tuple[dict, dict, dict]:
        """(metrics, answers, null margins) on the evaluation questions."""
        cfg = self.cfg
        metrics, answers, margins, self.eval_skipped = evaluate_qa(
            model,
            tokenizer,
            self.data.eval,
            self.data.version_2,
            cfg.max_length,
            cfg.doc_stride,
            cfg.batch_size,
            cfg.max_answer_length,
            cfg.null_threshold,
        )
        return metrics, answers, margins

    def evaluate(self, trainer) -> dict:
        return self.score(trainer.model, trainer.processing_class)[0]

    def all_skipped(self) -> dict[str, int]:
        return {k: n for k, n in (self.skipped + collections.Counter(self.eval_skipped)).items() if n}

    def report(self) -> dict:
        cfg = self.cfg
        return {
            "version_2": self.data.version_2,
            "train_examples": len(self.data.train),
            "train_windows": self.train_windows,
            "eval_examples": len(self.data.eval),
            "skipped": self.all_skipped(),
            "doc_stride": cfg.doc_stride,
            "max_answer_length": cfg.max_answer_length,
            "null_threshold": cfg.null_threshold,
        }


def _show(label: str, metrics: dict, names) -> None:
    if A.is_main_process():
        print(f"{label}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in names if k in metrics))


# ---------------------------------------------------------------------------------------------
# The runs


def finetune(config: FinetuneConfig) -> dict:
    """Run `rpp-triton finetune`; returns the report written to finetune_report.json."""
    from transformers import DataCollatorWithPadding, set_seed

    started = time.time()
    cfg, partial, model_name, source_report, masks, targs = _prepare(config)
    task = _QuestionAnswering(cfg) if cfg.question_answering else _Classification(cfg)
    tokenizer = load_tokenizer(model_name)
    train_rows, evaluation = task.features(tokenizer)

    set_seed(cfg.seed)
    model = task.model(model_name)
    optimizer, named, block = frozen_mask_optimizer(model, masks, source_report, cfg)
    sparsity_before, digest_before = sparsity_of(w for _, w in named), mask_digest(named)

    A.start_partial(partial, cfg.resume_from_checkpoint)
    trainer = make_trainer_class()(
        model=model,
        args=targs,
        train_dataset=train_rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        **evaluation,
    )
    metrics_before = task.evaluate(trainer)
    _show("before fine-tuning", metrics_before, task.shown)
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    metrics = task.evaluate(trainer)
    trainer.log({f"eval_{k}": v for k, v in metrics.items()})
    _show(task.name, metrics, task.shown)

    sparsity_after, digest_after = sparsity_of(w for _, w in named), mask_digest(named)
    if digest_after != digest_before:
        raise RuntimeError("the sparsity pattern changed during fine-tuning although the masks were frozen")
    report = {
        "task": task.name,
        "metrics": metrics,
        "metrics_before": metrics_before,
        "metric_names": task.metric_names,
        "sparsity_before": sparsity_before,
        "sparsity_after": sparsity_after,
        "masks_unchanged": True,
        "masks_identical_on_all_ranks": ranks_agree(digest_after),
        "model": EMBEDDED_NAME if cfg.model is None else cfg.model,
        "max_length": cfg.max_length,
        **task.report(),
        "steps": trainer.state.global_step,
        "world_size": A.world_size(),
        "seconds": round(time.time() - started, 1),
    }
    if trainer.is_world_process_zero():
        _publish(trainer, partial, cfg, report, named, block, source_report)
        if report.get("skipped"):
            print(f"skipped: {describe_skips(report['skipped'])}")
        print(f"sparsity before {sparsity_before:.4f}, after {sparsity_after:.4f} (masks frozen)")
        print(f"wrote {cfg.output_dir} ({report['seconds']} s)")
    return report


def _publish(trainer, partial, cfg, report, named, block, source_report) -> None:
    """Rank 0: the model, its masks, rpp_report.json (the sparsity after fine-tuning),
    finetune_report.json and the training log into `partial`, then moved into place."""
    trainer.save_model(partial)
    A.save_masks(os.path.join(partial, A.MASKS_FILE), named, block)
    pruning = {
        "sparsity": report["sparsity_after"],
        "target_sparsity": (source_report or {}).get("target_sparsity", 0.0),
        "block_size": list(block),
        "layers": layer_table(named, block),
        "finetune": {k: report[k] for k in ("task", "metrics", "sparsity_before", "sparsity_after")},
    }
    A.write_json(partial, A.REPORT_FILE, pruning)
    A.write_json(partial, A.FINETUNE_REPORT_FILE, report)
    A.write_json(partial, A.LOG_FILE, trainer.state.log_history)
    A.publish(partial, cfg.output_dir, cfg.keep_checkpoints)


def evaluate(config: EvaluateConfig) -> dict:
    """Run `rpp-triton evaluate`: score a saved question-answering model without training it;
    returns what `--output` receives (scores, answers, null margins)."""

    started = time.time()
    if config.output is not None:
        if os.path.isdir(config.output):
            raise UsageError(f"--output {config.output!r} is a directory")
        A.check_writable(os.path.dirname(os.path.abspath(config.output)), config.output)
    model_name, _ = resolve_model(config.model_dir)
    cfg = config.resolved(max_positions(model_name, None))
    task = _QuestionAnswering(cfg, need_train=False)
    tokenizer = load_tokenizer(model_name)
    model, info = task.model(model_name, output_loading_info=True)
    fresh = any("qa_outputs" in k for k in info.get("missing_keys", ()))
    if fresh:
        log.warning("%s has no question-answering head; scoring a randomly initialised one", model_name)
    metrics, answers, margins = task.score(model, tokenizer)
    _show(task.name, metrics, task.shown)
    if "best_f1" in metrics:
        print(f"best F1 {metrics['best_f1']:.2f} at null threshold {metrics['best_f1_thresh']:.3f}")
    skipped = task.all_skipped()
    if skipped:
        print(f"skipped: {describe_skips(skipped)} (a question skipped at tokenisation scores 0)")
    result = {
        "task": task.name,
        "model": cfg.model_dir,
        "metrics": metrics,
        "skipped": skipped,
        "head_initialised_fresh": fresh,
        "max_length": cfg.max_length,
        "doc_stride": cfg.doc_stride,
        "null_threshold": cfg.null_threshold,
        "seconds": round(time.time() - started, 1),
        "predictions": answers,
        "null_margins": {q: m if math.isfinite(m) else None for q, m in margins.items()},
    }
    if cfg.output is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output + ".partial", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(cfg.output + ".partial", cfg.output)
    return result
