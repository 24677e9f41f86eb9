"""Argument helpers the training subcommands share, and the transformers spellings of their flags
(`--learning_rate` for `--lr`, ...) so that commands written for transformers' scripts work."""

from __future__ import annotations

import argparse
import re

from rpp_triton.errors import UsageError


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help where the help does not already say its default and
    there is one to say."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {action.default})"


def block_size_arg(text: str) -> tuple[int, int]:
    """`32`, `32x32` or `16x32` -> (bh, bw)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX,]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise UsageError(f"--block-size must be N or BHxBW with positive integers, got {text!r}")
    bh = int(m.group(1))
    return bh, int(m.group(2) or bh)


def add_run_arguments(p) -> None:
    """Options every training subcommand has."""
    p.add_argument(
        "--output-dir", required=True, help="where the finished run goes (written as OUT.partial first)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another run")
    p.add_argument(
        "--resume-from-checkpoint",
        metavar="CKPT",
        help="continue from a checkpoint directory (OUT.partial/checkpoint-N of an interrupted run)",
    )
    p.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep checkpoint-N directories in the output"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto", help="RPPAdamW backend")
    p.add_argument("--logging-steps", type=int, default=10)


# The project's flags under the names transformers' `TrainingArguments` and its example scripts
# (run_glue.py, run_qa.py) give them.
STANDARD_NAMES = {
    "--lr": "--learning_rate",
    "--batch-size": "--per_device_train_batch_size",
    "--epochs": "--num_train_epochs",
    "--max-steps": "--max_steps",
    "--weight-decay": "--weight_decay",
    "--output-dir": "--output_dir",
    "--overwrite": "--overwrite_output_dir",
    "--resume-from-checkpoint": "--resume_from_checkpoint",
    "--save-steps": "--save_steps",
    "--logging-steps": "--logging_steps",
    "--gradient-accumulation-steps": "--gradient_accumulation_steps",
    "--warmup-ratio": "--warmup_ratio",
    "--lr-scheduler-type": "--lr_scheduler_type",
    "--report-to": "--report_to",
    "--model": "--model_name_or_path",
    "--task": "--task_name",
    "--dataset": "--dataset_name",
    "--dataset-config": "--dataset_config_name",
    "--train-file": "--train_file",
    "--validation-file": "--validation_file",
    "--max-length": "--max_seq_length",
    "--doc-stride": "--doc_stride",
    "--max-answer-length": "--max_answer_length",
    "--null-threshold": "--null_score_diff_threshold",
}


def add_standard_names(parser: argparse.ArgumentParser, names: dict[str, str] = STANDARD_NAMES) -> None:
    """Let every flag of `parser` that has a transformers spelling answer to it as well (call it
    once all arguments are added). `--help` shows both spellings."""
    for action in parser._actions:
        for own in list(action.option_strings):
            alias = names.get(own)
            if alias and alias not in parser._option_string_actions:
                action.option_strings.append(alias)
                parser._option_string_actions[alias] = action


def add_trainer_arguments(
    p, warmup_ratio: float | None = 0.1, lr_scheduler_type: str | None = "linear", by: str = "the optimizer"
) -> None:
    """`TrainingArguments` options a run passes straight through (see `TrainerOptions`). A default
    of None is chosen later, by `by`."""
    g = p.add_argument_group("transformers TrainingArguments")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=warmup_ratio,
        help="share of the steps with a rising learning rate "
        f"(default: {by if warmup_ratio is None else format(warmup_ratio, 'g')})",
    )
    g.add_argument(
        "--lr-scheduler-type",
        default=lr_scheduler_type,
        help="learning-rate schedule: linear, cosine, constant, polynomial, ... "
        f"(default: {lr_scheduler_type or by})",
    )
    g.add_argument(
        "--report-to",
        nargs="+",
        metavar="NAME",
        help="where logs go: tensorboard, wandb, ..., or none (default: TensorBoard where installed)",
    )
    g.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (CPU or GPU)")
    g.add_argument("--fp16", action="store_true", help="float16 mixed precision (CUDA only)")


def add_dataset_arguments(g, split_dest: str = "split", split_help: str = "training split (default train)"):
    """`--dataset-config` and `--split`: which configuration and split of a named dataset."""
    g.add_argument("--dataset-config", help="configuration of the dataset (GLUE: the task name)")
    g.add_argument("--split", dest=split_dest, help=split_help)


def add_input_arguments(p, max_length_help: str) -> None:
    """Input length, and how question answering windows a context and reads an answer off."""
    p.add_argument("--max-length", type=int, help=max_length_help)
    qa = p.add_argument_group("question answering")
    qa.add_argument(
        "--doc-stride", type=int, help="tokens shared by neighbouring windows (default max-length / 3)"
    )
    qa.add_argument("--max-answer-length", type=int, help="longest answer in tokens (default 30)")
    qa.add_argument(
        "--null-threshold",
        type=float,
        help="v2.0: the answer is empty when null score - best span score > this (default 0)",
    )
