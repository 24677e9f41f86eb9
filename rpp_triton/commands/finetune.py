"""`rpp-triton finetune`: train a classification head on a (pruned) encoder with its masks frozen,
so the sparsity before and after is identical.

Tasks: GLUE by name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, each with its metric), local
CSV/JSON files (--train-file, --text-column, --label-column), or with neither the offline default:
which of eight Python documentation topics a passage comes from.
"""

from __future__ import annotations

import os

from rpp_triton.commands.common import add_run_arguments
from rpp_triton.errors import UsageError


def register(subparsers) -> None:
    from rpp_triton.data.tasks import TASK_NAMES

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pruned model on a downstream task with frozen masks",
        description=__doc__,
    )
    p.add_argument("--model", help="pruned model directory, hub name (default: the shipped all-MiniLM-L6-v2)")
    p.add_argument(
        "--task",
        help=f"task name: {', '.join(TASK_NAMES)}; question answering: squad, squad_v2, pydoc-qa, "
        "pydoc-qa-v2 (local SQuAD JSON via --train-file) (default: pydoc-topics)",
    )
    p.add_argument("--train-file", help="local CSV/JSON/JSONL training file")
    p.add_argument("--validation-file", help="local validation file (default: every 5th training row)")
    p.add_argument("--text-column", help="text column of local files (default 'text')")
    p.add_argument("--text-pair-column", help="second text column for sentence-pair tasks")
    p.add_argument("--label-column", help="label column of local files (default 'label')")
    p.add_argument("--regression", action="store_true", help="labels are numbers (local files)")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 3; pydoc-topics 2)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--max-length", type=int, help="tokens per example, truncated (default 128; pydoc-topics 64)"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    add_run_arguments(p)
    p.set_defaults(func=run)


def validate(args) -> None:
    offline_task = args.train_file is None and args.task in (None, "pydoc-topics")
    if args.epochs is None:
        args.epochs = 2.0 if offline_task else 3.0
    if args.max_length is None:
        args.max_length = 64 if offline_task else 128
    for name in ("max_steps", "batch_size", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.epochs <= 0 or args.lr <= 0:
        raise UsageError("--epochs and --lr must be positive")
    for name in ("train_file", "validation_file"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{name.replace('_', '-')} {path!r} does not exist")
    if args.validation_file and not args.train_file:
        raise UsageError("--validation-file needs --train-file")


def run(args) -> int:
    from rpp_triton.squad import QA_TASKS, finetune_qa

    if args.task in QA_TASKS:  # question answering (SQuAD v1.1/v2.0, pydoc-qa) lives in squad.py
        finetune_qa(args)
        return 0
    validate(args)
    from rpp_triton.pipeline import finetune_pipeline

    finetune_pipeline(args)
    return 0
