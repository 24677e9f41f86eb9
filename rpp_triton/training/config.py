"""Typed options of the training runs, validated when they are made. The command line parses flags
into these; the library reads them and never changes them (`resolved()` returns a new config with
the defaults that depend on the data filled in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from rpp_triton.data.sources import DataOptions
from rpp_triton.data.tasks import TASK_NAMES
from rpp_triton.errors import UsageError
from rpp_triton.qa.data import OFFLINE_TASK, QA_TASKS
from rpp_triton.tiles import SCOPES, SCORES, as_block

BACKENDS = ("auto", "triton", "torch")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_finite(config, names, low=None, high=None, low_open=False, high_open=False) -> None:
    """Each named float is finite and within [low, high] (open where said); None is allowed."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
            hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
            where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if (low is not None or high is not None) else ""
            raise UsageError(f"{flag(name)} must be a finite number{where}, got {value}")


def check_ints(config, names, minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            what = "at least 1" if minimum == 1 else f"at least {minimum}"
            raise UsageError(f"{flag(name)} must be {what}, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """What every training run has: where it writes, how it resumes, seed and backend."""

    output_dir: str = ""
    overwrite: bool = False
    resume_from_checkpoint: str | None = None
    save_steps: int = 0
    keep_checkpoints: bool = False
    seed: int = 0
    backend: str = "auto"
    logging_steps: int = 10

    def __post_init__(self):
        if not self.output_dir:
            raise UsageError("--output-dir is required")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check_ints(self, ("save_steps",), 0)
        check_ints(self, ("logging_steps",), 1)


@dataclass(frozen=True)
class TrainerOptions:
    """`TrainingArguments` passed straight through, under their transformers names."""

    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "linear"
    report_to: tuple[str, ...] | None = None  # None: TensorBoard where it is installed
    bf16: bool = False
    fp16: bool = False

    def __post_init__(self):
        check_ints(self, ("gradient_accumulation_steps",), 1)
        check_finite(self, ("warmup_ratio",), 0.0, 1.0, high_open=True)
        if self.report_to is not None:
            names = tuple(self.report_to)
            object.__setattr__(self, "report_to", () if names in (("none",), ()) else names)
        if self.bf16 and self.fp16:
            raise UsageError("--bf16 and --fp16 are alternatives: pass one")
        if self.fp16 and not torch.cuda.is_available():
            raise UsageError("--fp16 needs a CUDA device and this machine has none; on the CPU use --bf16")

    def trainer_kwargs(self) -> dict:
        """The `TrainingArguments` keywords (warmup as a fraction of the steps, as transformers
        reads a `warmup_steps` below 1)."""
        kwargs = {
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "warmup_steps": self.warmup_ratio,
            "lr_scheduler_type": self.lr_scheduler_type,
            "bf16": self.bf16,
            "fp16": self.fp16,
        }
        if self.report_to is not None:
            kwargs["report_to"] = list(self.report_to)
        return kwargs


# The embedded default distils MiniLM for 400 steps of 8 blocks of 64 tokens, a few minutes on a
# 2-core CPU. At 70% (1x1), 100 steps, lr 2e-4 -> 1e-3 raised embedding fidelity from 0.68-0.75 to
# 0.75-0.79 for every method; 400 steps at 1e-3 reached 0.84 (bench/results/quality_cpu.md).
EMBEDDED = {"seq_len": 64, "batch_size": 8, "max_steps": 400, "eval_blocks": 64, "lr": 1e-3}
GENERAL = {"seq_len": 128, "batch_size": 32, "max_steps": 2000, "eval_blocks": 512, "lr": 1e-4}


# LAMB's learning rate grows with the square root of the batch (You et al. 2019): this is the batch
# at which it equals AdamW's.
LAMB_REFERENCE_BATCH = {"embedded": 8, "general": 32}


@dataclass(frozen=True)
class PruneConfig(RunConfig, TrainerOptions):
    """`rpp-triton prune`: a pruning method on a pre-training objective, steered to
    `target_sparsity`. Learning rate and schedule default by optimizer (`resolved()`): AdamW a
    constant rate after a short warm-up; LAMB warm-up then linear (polynomial) decay, at a rate
    that grows with the square root of the total batch."""

    model: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str | None = None
    text_column: str | None = None
    target_sparsity: float = 0.7
    block_size: tuple[int, int] = (1, 1)
    max_steps: int | None = None
    dense_steps: int | None = None
    recovery_steps: int | None = None
    prune_by: str = "activation"
    prune_scope: str = "row"
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float | None = None
    lr_scheduler_type: str | None = None
    reweight_every: int = 1
    reweight_eps: float = 0.01
    mlm_probability: float = 0.15
    eval_blocks: int | None = None
    head_lr_scale: float = 10.0
    dense_reference: str = "same-budget"
    objective: str | None = None
    method: str = "rpp"
    teacher: str | None = None
    optimizer: str = "adamw"
    mask_every: int = 5
    debias: str | None = None
    temperature: float = 2.0
    ramp: float = 0.7

    def __post_init__(self):
        RunConfig.__post_init__(self)
        TrainerOptions.__post_init__(self)
        try:
            object.__setattr__(self, "block_size", as_block(self.block_size))
        except ValueError as exc:
            raise UsageError(f"--block-size: {exc}") from None
        check_finite(self, ("target_sparsity",), 0.0, 1.0, high_open=True)
        check_finite(self, ("mlm_probability",), 0.0, 1.0, high_open=True)
        check_finite(self, ("lr", "head_lr_scale"), 0.0, low_open=True)
        check_finite(self, ("weight_decay", "reweight_eps"), 0.0)
        check_finite(self, ("temperature",), 0.0, low_open=True)
        check_finite(self, ("ramp",), 0.0, 1.0, low_open=True)
        check_ints(self, ("max_steps", "seq_len", "batch_size", "eval_blocks", "mask_every"), 1)
        check_ints(self, ("dense_steps", "recovery_steps", "reweight_every"), 0)
        if self.seq_len is not None and self.seq_len < 8:
            raise UsageError(f"--seq-len must be at least 8, got {self.seq_len}")
        choices = {
            "prune_by": SCORES,
            "prune_scope": SCOPES,
            "dense_reference": ("same-budget", "none"),
            "objective": (None, "mlm", "distill", "mlm+distill"),
            "method": ("rpp", "gmp", "oneshot"),
            "optimizer": ("adamw", "lamb"),
            "debias": (None, "none", "rewind", "refit"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(a for a in allowed if a)
                raise UsageError(f"{flag(name)} must be one of {shown}, got {getattr(self, name)!r}")
        if self.method == "oneshot" and self.recovery_steps == 0:
            raise UsageError("--method oneshot trains only after its prune; --recovery-steps 0 leaves none")

    @property
    def embedded(self) -> bool:
        """True for the offline default: the shipped MiniLM on Python's documentation text."""
        return self.model is None and self.dataset is None

    def resolved(self, world_size: int = 1) -> PruneConfig:
        """A copy with the defaults that depend on the run filled in: sizes (embedded default or
        general), learning rate and schedule (by optimizer)."""
        sizes = EMBEDDED if self.embedded else GENERAL
        values = {k: v for k, v in sizes.items() if getattr(self, k) is None}
        batch = values.get("batch_size", self.batch_size) * self.gradient_accumulation_steps * world_size
        lamb = self.optimizer == "lamb"
        if self.lr is None and lamb:
            reference = LAMB_REFERENCE_BATCH["embedded" if self.embedded else "general"]
            values["lr"] *= (batch / reference) ** 0.5
        if self.lr_scheduler_type is None:
            values["lr_scheduler_type"] = "polynomial" if lamb else "linear"
        if self.warmup_ratio is None:
            values["warmup_ratio"] = 0.1
        if self.debias is None:  # RPP's proximal step shrinks the weights it keeps; the others do not
            values["debias"] = "refit" if self.method == "rpp" else "none"
        return replace(self, **values)

    def steps(self, objective: str) -> tuple[int, int, int]:
        """(dense, prune, recovery) steps of a resolved config. A fresh masked-LM head gets a dense
        start (10%); distillation starts pruning at once; one-shot trains only after its prune."""
        total = self.max_steps
        if self.method == "oneshot":
            return 0, 0, total
        dense = self.dense_steps
        if dense is None:
            dense = max(1, total // 10) if objective == "mlm" else 0
        # 60%: frozen-mask training is what one-shot (all recovery) has more of; at 400 steps RPP
        # kept 0.010 more embedding fidelity with 60% than with 40% (docs/design.md).
        recovery = self.recovery_steps if self.recovery_steps is not None else (total * 60) // 100
        if self.target_sparsity == 0:
            recovery = 0
        prune = total - dense - recovery
        if prune < 1:
            raise UsageError(
                f"--max-steps {total} leaves no pruning steps after {dense} dense "
                f"and {recovery} recovery steps"
            )
        return dense, prune, recovery


def from_namespace(cls, namespace, **overrides):
    """`cls` built from the attributes of an argparse namespace that name its fields."""
    values = {f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)}
    return cls(**{**values, **overrides})


# ---------------------------------------------------------------------------------------------
# Fine-tuning and evaluation


QA_ONLY = ("doc_stride", "max_answer_length", "null_threshold")
NOT_QA = ("text_column", "text_pair_column", "label_column", "regression")
# Input lengths when none is given: (offline pydoc task, any other), per task kind.
MAX_LENGTH = {"classification": (64, 128), "question answering": (192, 384)}
EPOCHS = {"classification": (3.0, 3.0), "question answering": (3.0, 2.0)}
# The offline topic task learns a fresh head on 563 passages: at 3e-4 for 3 epochs the dense MiniLM
# classifier reaches 0.79 accuracy, above the 0.77 its embeddings give a nearest-centroid rule; the
# former 1e-4 for 2 epochs stopped at 0.71.
LR = {"classification": (3e-4, 1e-4), "question answering": (1e-4, 1e-4)}


@dataclass(frozen=True)
class TaskOptions(DataOptions):
    """What `finetune` and `evaluate` share: the task and its data, the input length, the batch
    size, and how question-answering contexts are windowed and answers read off."""

    max_length: int | None = None
    doc_stride: int | None = None
    max_answer_length: int | None = None
    null_threshold: float | None = None
    batch_size: int = 16

    def __post_init__(self):
        super().__post_init__()
        if self.task is not None and self.task not in (*TASK_NAMES, *QA_TASKS):
            known = ", ".join((*TASK_NAMES, *QA_TASKS))
            raise UsageError(f"unknown task {self.task!r} (known: {known}; or pass --train-file)")
        check_ints(self, ("max_length", "batch_size", "max_answer_length"), 1)
        check_ints(self, ("doc_stride",), 0)
        check_finite(self, ("null_threshold",))
        names = NOT_QA if self.question_answering else QA_ONLY
        wrong = [n for n in names if getattr(self, n) is not None and getattr(self, n) is not False]
        if wrong:
            raise UsageError(f"{flag(wrong[0])} does not apply to the task {self.task or 'pydoc-topics'}")
        if self.question_answering and self.max_length is not None:
            check_ints(self, ("max_length",), 16)  # room for a question and some context
            if self.doc_stride is not None and self.doc_stride >= self.max_length // 2:
                raise UsageError(f"--doc-stride must be below max-length / 2, got {self.doc_stride}")

    @property
    def question_answering(self) -> bool:
        return self.task in QA_TASKS

    @property
    def kind(self) -> str:
        return "question answering" if self.question_answering else "classification"

    def _input_defaults(self, positions: int | None) -> dict:
        """The input options left unset, for a model of `positions` positions (None: unknown)."""
        if positions is not None and self.max_length is not None and self.max_length > positions:
            raise UsageError(f"--max-length {self.max_length} is more than the model's {positions} positions")
        length = self.max_length or MAX_LENGTH[self.kind][not self.offline_default]
        length = min(length, positions or length)
        if not self.question_answering:
            return {"max_length": length}
        return {
            "max_length": length,
            "doc_stride": length // 3 if self.doc_stride is None else self.doc_stride,
            "max_answer_length": self.max_answer_length or 30,
            "null_threshold": 0.0 if self.null_threshold is None else self.null_threshold,
        }


@dataclass(frozen=True)
class FinetuneConfig(RunConfig, TrainerOptions, TaskOptions):
    """`rpp-triton finetune`: a task head trained on a (pruned) encoder with its masks frozen."""

    model: str | None = None
    epochs: float | None = None
    max_steps: int | None = None
    lr: float | None = None
    weight_decay: float = 0.01

    def __post_init__(self):
        RunConfig.__post_init__(self)
        TrainerOptions.__post_init__(self)
        TaskOptions.__post_init__(self)
        check_finite(self, ("lr", "epochs"), 0.0, low_open=True)
        check_finite(self, ("weight_decay",), 0.0)
        check_ints(self, ("max_steps",), 1)
        if self.validation_file is not None and self.train_file is None:
            raise UsageError("--validation-file needs --train-file for fine-tuning")

    def resolved(self, positions: int | None = None) -> FinetuneConfig:
        """A copy with the defaults that depend on the task and the model (`positions`) filled in;
        a `max_length` beyond the model's positions is a UsageError."""
        epochs = self.epochs or EPOCHS[self.kind][not self.offline_default]
        lr = self.lr or LR[self.kind][not self.offline_default]
        return replace(self, epochs=epochs, lr=lr, **self._input_defaults(positions))


@dataclass(frozen=True)
class EvaluateConfig(TaskOptions):
    """`rpp-triton evaluate`: a saved question-answering model scored without training."""

    model_dir: str = ""
    task: str | None = OFFLINE_TASK
    batch_size: int = 32
    output: str | None = None

    def __post_init__(self):
        if self.task not in QA_TASKS:
            raise UsageError(f"unknown question-answering task {self.task!r} (known: {', '.join(QA_TASKS)})")
        if not self.model_dir:
            raise UsageError("a model directory is required")
        super().__post_init__()

    def resolved(self, positions: int | None = None) -> EvaluateConfig:
        """A copy with the input defaults for a model of `positions` positions filled in."""
        return replace(self, **self._input_defaults(positions))
