"""`rpp-triton evaluate MODEL_DIR --task ...`: score a saved question-answering model without
training it, with the official SQuAD exact-match and F1 metrics.

Tasks: squad, squad_v2 (hub, or a local SQuAD-format file with --validation-file) and the offline
pydoc-qa / pydoc-qa-v2 sets built from Python's documentation. Prints the scores, and with
--output writes them (and the predicted answers) as JSON.
"""

from __future__ import annotations

import os

from rpp_triton.errors import UsageError


def register(subparsers) -> None:
    from rpp_triton.squad import OFFLINE_TASK, QA_TASKS

    p = subparsers.add_parser(
        "evaluate", help="score a saved question-answering model (exact match, F1)", description=__doc__
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory with a question-answering head")
    p.add_argument(
        "--task", default=OFFLINE_TASK, help=f"one of {', '.join(QA_TASKS)} (default {OFFLINE_TASK})"
    )
    p.add_argument("--validation-file", help="local SQuAD-format JSON file to score on")
    p.add_argument("--max-length", type=int, help="tokens per window (default 384; pydoc-qa 192)")
    p.add_argument(
        "--doc-stride", type=int, help="tokens shared by neighbouring windows (default max-length/3)"
    )
    p.add_argument("--max-answer-length", type=int, default=30, help="longest answer in tokens")
    p.add_argument(
        "--null-threshold",
        type=float,
        default=0.0,
        help="v2.0: answer empty when null score - best span > this",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", help="write metrics and predictions to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.validation_file is not None and not os.path.isfile(args.validation_file):
        raise UsageError(f"--validation-file {args.validation_file!r} does not exist")
    if args.max_answer_length < 1:
        raise UsageError(f"--max-answer-length must be at least 1, got {args.max_answer_length}")
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"model directory {args.model_dir!r} does not exist")
    from rpp_triton import squad as S

    args.train_file = None
    S.qa_defaults(args)

    import json
    import time

    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from rpp_triton.training.hub import load_pretrained, resolve_model

    started = time.time()
    model_name, _ = resolve_model(args.model_dir)
    data = S.load_qa_task(args.task, None, args.validation_file, need_train=False)
    tokenizer = load_pretrained(AutoTokenizer, model_name)
    model, info = load_pretrained(AutoModelForQuestionAnswering, model_name, output_loading_info=True)
    fresh = [k for k in info.get("missing_keys", ()) if "qa_outputs" in k]
    if fresh:
        print(f"warning: {model_name} has no question-answering head; scoring a randomly initialised one")
    metrics, predictions, skipped = S.evaluate_qa(
        model,
        tokenizer,
        data.eval,
        data.version_2,
        args.max_length,
        args.doc_stride,
        args.batch_size,
        args.max_answer_length,
        args.null_threshold,
    )
    total = {k: data.skipped.get(k, 0) + skipped.get(k, 0) for k in sorted({*data.skipped, *skipped})}
    skipped = {k: n for k, n in total.items() if n}
    S._print_metrics(data.name, metrics)
    if data.version_2 and "best_f1" in metrics:
        print(f"best F1 {metrics['best_f1']:.2f} at null threshold {metrics['best_f1_thresh']:.3f}")
    if skipped:
        print(f"skipped: {S.describe_skips(skipped)} (scored as unanswered when skipped at tokenisation)")
    if args.output:
        result = {
            "task": data.name,
            "model": args.model_dir,
            "metrics": metrics,
            "skipped": skipped,
            "head_initialised_fresh": bool(fresh),
            "seconds": round(time.time() - started, 1),
            "predictions": predictions,
        }
        tmp = args.output + ".partial"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output)
    return 0
