"""Typed options of the training runs, validated when they are made. The command line parses flags
into these; the library reads them and never changes them (`resolved()` returns a new config with
the defaults that depend on the data filled in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from rpp_triton.errors import UsageError
from rpp_triton.tiles import as_block

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


# The embedded default is sized to finish in a few minutes on a 2-core CPU: 2 x 100 steps (the
# pruned run and its same-budget dense reference) of 8 blocks of 64 tokens, ~0.4 s a step.
EMBEDDED = {"seq_len": 64, "batch_size": 8, "max_steps": 100, "eval_blocks": 64}
GENERAL = {"seq_len": 128, "batch_size": 32, "max_steps": 2000, "eval_blocks": 512}


@dataclass(frozen=True)
class PruneConfig(RunConfig):
    """`rpp-triton prune`: RPP on the pre-training objective, steered to `target_sparsity`."""

    model: str | None = None
    dataset: str | None = None
    text_column: str | None = None
    target_sparsity: float = 0.7
    block_size: tuple[int, int] = (1, 1)
    max_steps: int | None = None
    dense_steps: int | None = None
    recovery_steps: int | None = None
    prune_by: str = "rms"
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.0
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
    temperature: float = 2.0
    ramp: float = 0.7

    def __post_init__(self):
        super().__post_init__()
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
        if self.prune_by not in ("rms", "magnitude"):
            raise UsageError(f"--prune-by must be rms or magnitude, got {self.prune_by!r}")
        choices = {
            "dense_reference": ("same-budget", "none"),
            "objective": (None, "mlm", "distill", "mlm+distill"),
            "method": ("rpp", "gmp", "oneshot"),
            "optimizer": ("adamw", "lamb"),
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

    def resolved(self) -> PruneConfig:
        """A copy with the size defaults of the embedded default or of a general run filled in."""
        defaults = EMBEDDED if self.embedded else GENERAL
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def steps(self, objective: str) -> tuple[int, int, int]:
        """(dense, prune, recovery) steps of a resolved config. A fresh masked-LM head gets a dense
        start (10%); distillation starts pruning at once; one-shot trains only after its prune."""
        total = self.max_steps
        if self.method == "oneshot":
            return 0, 0, total
        dense = self.dense_steps
        if dense is None:
            dense = max(1, total // 10) if objective == "mlm" else 0
        recovery = self.recovery_steps if self.recovery_steps is not None else (total * 15) // 100
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
