"""`rpp-triton finetune`: train a task head on a (pruned) encoder with its masks frozen, so the
sparsity before and after is identical.

Tasks: GLUE by name (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, each with its metric),
question answering (squad, squad_v2; the offline pydoc-qa and pydoc-qa-v2), local files
(--train-file: CSV/JSON/JSONL with --text-column/--label-column, or SQuAD JSON for question
answering), any dataset (--dataset: a hub name such as nyu-mll/glue, or a local dataset folder, with
--dataset-config and --split), or with none of these the offline default: which of eight Python
documentation topics a passage comes from. transformers' flag names work too (--learning_rate,
--per_device_train_batch_size, --num_train_epochs, --max_seq_length, ...).
"""

from __future__ import annotations

from rpp_triton.commands.common import (
    add_dataset_arguments,
    add_input_arguments,
    add_run_arguments,
    add_standard_names,
    add_trainer_arguments,
)


def register(subparsers) -> None:
    from rpp_triton.data.tasks import TASK_NAMES
    from rpp_triton.qa.data import QA_TASKS

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pruned model on a downstream task with frozen masks",
        description=__doc__,
    )
    p.add_argument("--model", help="pruned model directory, hub name (default: the shipped all-MiniLM-L6-v2)")
    p.add_argument(
        "--task",
        help=f"task name: {', '.join(TASK_NAMES)}; question answering: {', '.join(QA_TASKS)} "
        "(default: pydoc-topics)",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train-file", help="local CSV/JSON/JSONL (or SQuAD JSON) training file")
    data.add_argument("--validation-file", help="local validation file (default: every 5th training row)")
    data.add_argument("--dataset", help="hub dataset (org/name) or local dataset folder or file")
    add_dataset_arguments(data)
    data.add_argument("--validation-split", help="evaluation split (default validation or test, else 1 in 5)")
    data.add_argument("--text-column", help="text column (default 'text', or the GLUE task's)")
    data.add_argument("--text-pair-column", help="second text column for sentence-pair tasks")
    data.add_argument("--label-column", help="label column (default 'label')")
    data.add_argument("--regression", action="store_true", help="labels are numbers (local files, datasets)")
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=float, help="passes over the training data (default 3; SQuAD 2)")
    train.add_argument("--max-steps", type=int, help="stop after N steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4; offline pydoc-topics 3e-4)")
    train.add_argument("--weight-decay", type=float, default=0.01)
    add_input_arguments(p, "tokens per example (default 128, question answering 384; offline tasks less)")
    add_trainer_arguments(p)
    add_run_arguments(p)
    add_standard_names(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rpp_triton.training.config import FinetuneConfig, from_namespace
    from rpp_triton.training.finetune import finetune

    finetune(from_namespace(FinetuneConfig, args))
    return 0
