"""`prune`: a pruning method (RPP, or a baseline on the same budget) on a pre-training objective
(masked LM, distillation from the dense model, or both) through `transformers.Trainer`, steered to
a target sparsity, the hard prune to exactly that target and frozen-mask recovery steps; then the
quality of the dense and the pruned model, measured side by side. Works under `torchrun` (every
rank holds the teacher, only rank 0 writes) and publishes its output directory atomically
(docs/design.md, "Pruning")."""

from __future__ import annotations

import logging
import os
import shutil
import time

from rpp_triton import artifacts as A
from rpp_triton.errors import UsageError
from rpp_triton.report import quality_lines
from rpp_triton.tiles import layer_table, sparsity_of
from rpp_triton.training.config import PruneConfig
from rpp_triton.training.controller import CONTROLLERS, controller_reweights
from rpp_triton.training.hub import (
    load_pretrained,
    load_tokenizer,
    max_positions,
    resolve_model,
    training_arguments,
)
from rpp_triton.training.objectives import Objective
from rpp_triton.training.quality import QualityProbe
from rpp_triton.training.trainer import make_trainer_class, pruned_named_params

DENSE_PROTOCOL = {
    "mlm": "same budget: a second run from the same checkpoint, head initialisation, seed, data order, "
    "learning rates and number of steps, with no pruning",
    "distill": "the starting model (the teacher), untouched",
}
FIDELITY_PASSAGES = 128
log = logging.getLogger("rpp_triton.prune")


def _load_student(cfg: PruneConfig, model_name: str):
    """(student, objective, newly initialised head keys, decoder tied). The checkpoint is read as a
    masked-LM model to see whether it has a head; without one the default objective is `distill`,
    which trains the bare encoder."""
    from transformers import AutoModelForMaskedLM, set_seed

    set_seed(cfg.seed)  # a fresh head starts the same in every run
    model, info = load_pretrained(AutoModelForMaskedLM, model_name, quiet=True, output_loading_info=True)
    prefix = model.base_model_prefix + "."
    head_new = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(prefix))
    missing = [k for k in info.get("missing_keys", ()) if k.startswith(prefix)]
    if missing:
        log.warning(
            "%s: %d encoder weights missing from the checkpoint, e.g. %s",
            model_name,
            len(missing),
            missing[0],
        )
    objective = cfg.objective or ("distill" if head_new else "mlm+distill")
    if objective == "distill":
        if head_new and cfg.objective is None:
            log.warning(
                "the model has no masked-LM head: pruning the encoder by distillation from the dense model"
            )
        return model.base_model, objective, [], False
    if head_new:
        log.warning(
            "the model has no masked-LM head: a fresh one is initialised and trained at %gx the "
            "learning rate%s",
            cfg.head_lr_scale,
            "; its logits are not distilled" if "distill" in objective else "",
        )
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    return model, objective, head_new, out_emb is not None and out_emb.weight is in_emb.weight


def _load_teacher(cfg: PruneConfig, model_name: str, student, tokenizer, want_head: bool):
    """The frozen teacher: `--teacher DIR`, else the starting dense model. Its masked-LM head is
    kept only when it has a trained one. A teacher with another vocabulary or hidden size cannot
    be matched and is a UsageError."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    name = resolve_model(cfg.teacher)[0] if cfg.teacher else model_name
    teacher, info = load_pretrained(AutoModelForMaskedLM, name, quiet=True, output_loading_info=True)
    prefix = teacher.base_model_prefix + "."
    if not want_head or any(not k.startswith(prefix) for k in info.get("missing_keys", ())):
        teacher = teacher.base_model
    if teacher.config.hidden_size != student.config.hidden_size:
        raise UsageError(
            f"teacher {name!r} has hidden size {teacher.config.hidden_size}, the model "
            f"{student.config.hidden_size}: their hidden states cannot be matched"
        )
    if cfg.teacher:
        try:
            same = AutoTokenizer.from_pretrained(name).get_vocab() == tokenizer.get_vocab()
        except (OSError, ValueError):
            same = teacher.config.vocab_size == len(tokenizer)
        if not same:
            raise UsageError(f"teacher {name!r} uses another vocabulary than the model")
    return teacher.eval().requires_grad_(False)


def _optimizer_class(name: str):
    import rpp_triton as rpp

    return rpp.RPPAdamW if name == "adamw" else rpp.RPPLamb


def _param_groups(model, cfg: PruneConfig, head_new: list[str]) -> list[dict]:
    """The default pruning split, with a freshly initialised masked-LM head (MiniLM ships without
    one) in its own group at `head_lr_scale` x the learning rate, so it fits within the budget.
    Where RPP's controller sets alpha itself (scaled scores), the optimizer does not reweight."""
    from rpp_triton import param_groups

    groups = param_groups(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        reweight_every=0 if controller_reweights(cfg.prune_by, cfg.prune_scope) else cfg.reweight_every,
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


class _Run:
    """One Trainer run writing to `out`: the student, the optimizer, the method's controller and
    the objective. `method=None` trains densely (the same-budget reference)."""

    def __init__(
        self,
        cfg: PruneConfig,
        student,
        data,
        out,
        steps,
        method,
        teacher,
        checkpoints=True,
        resume_state=None,
    ):
        from transformers import default_data_collator

        tokenizer, train_blocks, eval_blocks = data
        self.model, self.objective_name, self.head_new, self.tied = student
        try:
            self.optimizer = _optimizer_class(cfg.optimizer)(
                _param_groups(self.model, cfg, self.head_new), lr=cfg.lr
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        dense_steps, prune_steps, recovery_steps = steps
        controller_cls = CONTROLLERS[method or "rpp"]
        kwargs = {"mask_every": cfg.mask_every} if method == "gmp" else {}
        if controller_cls.method == "rpp":
            kwargs.update(reweight_every=cfg.reweight_every, reweight_eps=cfg.reweight_eps)
        if method and (cfg.prune_by == "activation" or cfg.debias == "refit"):
            scales, grams = _calibrate(self.model, self.optimizer, train_blocks, cfg.batch_size, cfg.debias)
            kwargs.update(column_scales=scales if cfg.prune_by == "activation" else None, grams=grams)
        self.controller = controller_cls(
            self.optimizer,
            cfg.target_sparsity if method else 0.0,
            cfg.block_size,
            dense_steps,
            prune_steps,
            recovery_steps,
            ramp=cfg.ramp,
            prune_by=cfg.prune_by,
            scope=cfg.prune_scope,
            settings={
                "seed": cfg.seed,
                "lr": cfg.lr,
                "objective": self.objective_name,
                "ramp": cfg.ramp,
                "debias": cfg.debias,
                "prune_by": cfg.prune_by,
                "prune_scope": cfg.prune_scope,
            },
            rewind=_snapshot(self.optimizer) if method and cfg.debias in ("rewind", "refit") else None,
            **kwargs,
        )
        if resume_state is not None:  # before the Trainer, which creates `out`
            self.controller.load_state_dict(resume_state)
        total = sum(steps)
        targs = training_arguments(
            out,
            max_steps=total,
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            save_steps=cfg.save_steps or total,
            save_strategy="steps" if cfg.save_steps and checkpoints else "no",
            save_total_limit=None if cfg.keep_checkpoints else 2,
            logging_steps=cfg.logging_steps,
            seed=cfg.seed,
            eval_strategy="no",
            **cfg.trainer_kwargs(),
        )
        if "mlm" not in self.objective_name:
            eval_blocks = [{k: v for k, v in b.items() if k != "labels"} for b in eval_blocks]
        self.trainer = make_trainer_class()(
            model=self.model,
            args=targs,
            train_dataset=train_blocks,
            eval_dataset=eval_blocks,
            data_collator=default_data_collator,  # masking happens per step (Objective.mask)
            processing_class=tokenizer,
            optimizers=(self.optimizer, None),
            callbacks=[self.controller],
        )
        self.trainer.controller = self.controller
        self.trainer.objective = Objective(
            self.objective_name, self.model, teacher, cfg.temperature, tokenizer, cfg.mlm_probability
        )


def _calibrate(model, optimizer, blocks, batch_size, debias: str):
    """(input-feature RMS, input second-moment matrices or None) of every pruned weight on
    training blocks, measured on the model as loaded (dense; a resumed run too, since the Trainer
    loads the checkpoint later). The matrices are measured only for the refit, and then give the
    RMS as well (their diagonal), in the same pass."""
    from rpp_triton.training.calibration import input_gram, input_rms

    names = {id(p): name for name, p in pruned_named_params(optimizer)}
    if debias != "refit":
        return input_rms(model, names, blocks, batch_size), None
    grams = input_gram(model, names, blocks, batch_size)
    return {name: g.diagonal().sqrt() for name, g in grams.items()}, grams


def _snapshot(optimizer) -> dict:
    """The pruned weights as loaded (before any step, resumed runs included), on the CPU."""
    return {name: p.detach().to("cpu", copy=True) for name, p in pruned_named_params(optimizer)}


def _read_text(cfg: PruneConfig, tokenizer, model_name: str):
    from rpp_triton.data import text as D

    if cfg.dataset is None:
        train_text, held_text = D.default_text()
        dataset_name = "pydoc_data.topics"
    else:
        train_text, held_text = D.load_text(cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.split)
        dataset_name = cfg.dataset
    seq_len = min(cfg.seq_len, max_positions(model_name, cfg.seq_len))
    train_blocks = D.mlm_blocks(tokenizer, train_text, seq_len)
    eval_blocks = D.static_masked_eval(
        tokenizer, D.mlm_blocks(tokenizer, held_text, seq_len)[: cfg.eval_blocks], cfg.mlm_probability
    )
    if not train_blocks or not eval_blocks:
        raise UsageError(f"dataset {dataset_name!r} is too short for blocks of {seq_len} tokens")
    return (tokenizer, train_blocks, eval_blocks), held_text, dataset_name, seq_len


def _scores(evals: dict, key: str) -> dict:
    """A phase's held-out scores without the `eval_` prefix and Trainer's bookkeeping."""
    skip = ("runtime", "per_second", "epoch")
    return {
        k.removeprefix("eval_"): v
        for k, v in evals.get(key, {}).items()
        if not any(s in k for s in skip) and k != "eval_loss"
    }


def prune(config: PruneConfig) -> dict:
    """Run `rpp-triton prune`; returns the report written to rpp_report.json."""

    started = time.time()
    cfg = config.resolved(A.world_size())
    partial = A.check_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume_from_checkpoint)
    controller_state = None
    if cfg.resume_from_checkpoint:
        controller_state = A.check_checkpoint(cfg.resume_from_checkpoint)
        if controller_state is None:
            raise UsageError(f"checkpoint {cfg.resume_from_checkpoint!r} has no {A.CONTROLLER_FILE}")
    model_name, _ = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_name)
    if tokenizer.mask_token_id is None and cfg.objective != "distill":
        raise UsageError(f"tokenizer of {model_name!r} has no mask token; use --objective distill")
    data, held_text, dataset_name, seq_len = _read_text(cfg, tokenizer, model_name)

    student = _load_student(cfg, model_name)
    objective = student[1]
    steps = cfg.steps(objective)
    teacher = None
    if "distill" in objective:
        teacher = _load_teacher(cfg, model_name, student[0], tokenizer, "mlm" in objective)
    reference = teacher
    if reference is None:
        from transformers import AutoModel

        reference = load_pretrained(AutoModel, model_name).eval()
    # Before the Trainer exists: loading and embedding must not move the RNG its run starts from.
    probe = QualityProbe(tokenizer, held_text[:FIDELITY_PASSAGES], reference)
    run = _Run(cfg, student, data, partial, steps, cfg.method, teacher, resume_state=controller_state)
    trainer, controller = run.trainer, run.controller

    A.start_partial(partial, cfg.resume_from_checkpoint)
    same_budget = "mlm" in objective and cfg.target_sparsity > 0 and cfg.dense_reference == "same-budget"
    if same_budget and "dense_reference" not in controller.evals:
        # Same start, head initialisation, data order, learning rates and step count; no pruning.
        ref_dir = os.path.join(partial, "dense-reference")
        student = _load_student(cfg, model_name)
        ref_steps = (steps[0], steps[1] + steps[2], 0)
        ref = _Run(cfg, student, data, ref_dir, ref_steps, None, teacher, checkpoints=False)
        ref.trainer.train()
        controller.evals["dense_reference"] = {**ref.controller.evals["final"], **probe.measure(ref.model)}
        del ref
        if A.is_main_process():
            shutil.rmtree(ref_dir, ignore_errors=True)
    if steps[0] == 0 and cfg.resume_from_checkpoint is None and cfg.method != "oneshot":
        # The state before any training, scored directly: through Trainer it would log before
        # training starts, when TensorBoard's writer does not know the output directory yet.
        scores = trainer.objective.evaluate(run.model, trainer.eval_dataset, cfg.batch_size)
        controller.evals["dense"] = {f"eval_{k}": v for k, v in scores.items()}
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)

    named = pruned_named_params(run.optimizer)
    evals = controller.evals
    if cfg.target_sparsity == 0:
        dense, protocol = {**_scores(evals, "final"), **probe.measure(run.model)}, "this run (target 0)"
    elif "dense_reference" in evals:
        dense, protocol = _scores(evals, "dense_reference"), DENSE_PROTOCOL["mlm"]
    else:
        dense, protocol = probe.dense, DENSE_PROTOCOL["distill"]
    pruned = {**_scores(evals, "final"), **probe.measure(run.model)}
    dense_steps, prune_steps, recovery_steps = steps
    report = {
        "sparsity": sparsity_of(w for _, w in named),
        "target_sparsity": cfg.target_sparsity,
        "block_size": list(cfg.block_size),
        "layers": layer_table(named, cfg.block_size),
        "method": cfg.method,
        "objective": objective,
        "optimizer": cfg.optimizer,
        "quality": {"dense": dense, "pruned": pruned},
        "dense_reference": protocol,
        "phases": {k: _scores(evals, k) for k in ("dense", "hard_pruned") if k in evals},
        "sparsity_before_hard_prune": controller.pre_prune_sparsity,
        "steps": {
            "dense": dense_steps,
            "prune": prune_steps,
            "recovery": recovery_steps,
            "total": cfg.max_steps,
        },
        "prune_by": cfg.prune_by,
        "prune_scope": cfg.prune_scope,
        "debias": cfg.debias,
        "teacher": cfg.teacher or ("the starting model" if teacher is not None else None),
        "model": "all-MiniLM-L6-v2 (embedded)" if cfg.model is None else cfg.model,
        "dataset": dataset_name,
        "seq_len": seq_len,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "precision": "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32",
        "seed": cfg.seed,
        "world_size": A.world_size(),
        "masks_identical_on_all_ranks": controller.ranks_agree,
        "mask_digest": controller.mask_digest,
        "newly_initialised": run.head_new,
        "seconds": round(time.time() - started, 1),
    }
    if run.head_new:
        report["note"] = (
            "the checkpoint has no masked-LM head: it was initialised fresh"
            + (" with its decoder tied to the word embeddings" if run.tied else "")
            + f"; it trains at {cfg.head_lr_scale:g}x the learning rate"
        )
    if trainer.is_world_process_zero():
        trainer.save_model(partial)
        A.save_masks(os.path.join(partial, A.MASKS_FILE), named, cfg.block_size)
        A.write_json(partial, A.LOG_FILE, trainer.state.log_history)
        A.write_json(partial, A.REPORT_FILE, report)
        A.publish(partial, cfg.output_dir, cfg.keep_checkpoints)
        print("\n".join([*quality_lines(report), f"wrote {cfg.output_dir} ({report['seconds']} s)"]))
    return report
