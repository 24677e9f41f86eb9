"""`rpp-triton evaluate MODEL_DIR --task ...`: score a saved question-answering model without
training it, with the official SQuAD v1.1 / v2.0 scores (exact match, F1; for v2.0 the answerable
and unanswerable breakdowns and the best null threshold).

Tasks: squad, squad_v2 (hub, a local SQuAD-format file with --validation-file, or a SQuAD-shaped
--dataset) and the offline pydoc-qa / pydoc-qa-v2 sets built from Python's documentation. Prints
the scores, and with --output writes them (with the answers and null margins) as JSON.
"""

from __future__ import annotations

from rpp_triton.commands.common import (
    STANDARD_NAMES,
    add_dataset_arguments,
    add_input_arguments,
    add_standard_names,
)


def register(subparsers) -> None:
    from rpp_triton.qa.data import OFFLINE_TASK, QA_TASKS

    p = subparsers.add_parser(
        "evaluate", help="score a saved question-answering model (exact match, F1)", description=__doc__
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory with a question-answering head")
    p.add_argument(
        "--task", default=OFFLINE_TASK, help=f"one of {', '.join(QA_TASKS)} (default {OFFLINE_TASK})"
    )
    p.add_argument("--validation-file", help="local SQuAD-format JSON file to score on")
    p.add_argument("--dataset", help="SQuAD-shaped dataset: hub name (org/name) or local dataset folder")
    add_dataset_arguments(p, "validation_split", "split to score (default validation)")
    add_input_arguments(p, "tokens per window (default 384; pydoc-qa 192)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", help="write the scores, answers and null margins to this JSON file")
    add_standard_names(p, {**STANDARD_NAMES, "--batch-size": "--per_device_eval_batch_size"})
    p.set_defaults(func=run)


def run(args) -> int:
    from rpp_triton.training.config import EvaluateConfig, from_namespace
    from rpp_triton.training.finetune import evaluate

    evaluate(from_namespace(EvaluateConfig, args))
    return 0
