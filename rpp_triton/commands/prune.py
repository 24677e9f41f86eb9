"""`rpp-triton prune`: RPP on the masked-LM objective, steered to a target sparsity, then a hard
prune to exactly that target and a few recovery steps with frozen masks.

With no --model and no --dataset it runs offline on the shipped MiniLM and Python's documentation
text, and reports masked-LM accuracy on held-out text for the pruned model and for a dense model
trained with the same budget (same steps, data order and learning rates, lambda = 0).
"""

from __future__ import annotations

import os

from rpp_triton.commands.common import add_run_arguments, block_size_arg
from rpp_triton.errors import UsageError

# The embedded default is sized to finish in a few minutes on a 2-core CPU: 2 x 100 steps (the
# pruned run and its same-budget dense reference) of 8 blocks of 64 tokens, ~0.4 s a step.
EMBEDDED = {"seq_len": 64, "batch_size": 8, "max_steps": 100, "eval_blocks": 64}
GENERAL = {"seq_len": 128, "batch_size": 32, "max_steps": 2000, "eval_blocks": 512}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a BERT-family model with RPP on masked LM",
        description=__doc__,
    )
    p.add_argument("--model", help="hub name or local directory (default: the shipped all-MiniLM-L6-v2)")
    p.add_argument(
        "--dataset",
        help="hub name or local .txt/.json/.jsonl/.csv file (default: Python's documentation text)",
    )
    p.add_argument("--text-column", help="column holding the text (JSON/CSV/hub datasets; default 'text')")
    p.add_argument("--target-sparsity", type=float, default=0.7, help="fraction of pruned weights, in [0, 1)")
    p.add_argument("--block-size", default="1", help="tile: N or BHxBW (default 1)")
    p.add_argument("--max-steps", type=int, help="total optimizer steps (dense + RPP + recovery)")
    p.add_argument("--dense-steps", type=int, help="steps with lambda = 0 first (default 10%% of max)")
    p.add_argument("--recovery-steps", type=int, help="frozen-mask steps after the hard prune (default 15%%)")
    p.add_argument("--prune-by", choices=("rms", "magnitude"), default="rms", help="hard-prune tile score")
    p.add_argument("--seq-len", type=int, help="tokens per training block")
    p.add_argument("--batch-size", type=int, help="blocks per step and process")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rpp-lambda", type=float, default=0.05, help="initial lambda (the controller steers it)")
    p.add_argument("--lambda-gain", type=float, default=5.0, help="controller gain on the sparsity gap")
    p.add_argument("--reweight-every", type=int, default=1, help="reweight alpha every N steps (0: never)")
    p.add_argument("--reweight-eps", type=float, default=0.01, help="alpha = 1 / (tile RMS + this)")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--eval-blocks", type=int, help="held-out blocks to score (dense and pruned)")
    p.add_argument(
        "--head-lr-scale",
        type=float,
        default=10.0,
        help="learning-rate multiplier for a freshly initialised masked-LM head (default 10)",
    )
    p.add_argument(
        "--dense-reference",
        choices=("same-budget", "none"),
        default="same-budget",
        help="same-budget (default): also train a dense copy for the same steps and report its "
        "accuracy beside the pruned one; none: skip it (half the time)",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def validate(args) -> None:
    args.block_size = block_size_arg(args.block_size)
    if not 0.0 <= args.target_sparsity < 1.0:
        raise UsageError(f"--target-sparsity must be in [0, 1), got {args.target_sparsity}")
    for name in ("max_steps", "seq_len", "batch_size", "eval_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("dense_steps", "recovery_steps", "save_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.head_lr_scale <= 0:
        raise UsageError(f"--head-lr-scale must be positive, got {args.head_lr_scale}")
    if not 0 <= args.mlm_probability < 1 or args.lr <= 0 or args.rpp_lambda < 0:
        raise UsageError("--mlm-probability must be in [0, 1), --lr positive and --rpp-lambda non-negative")
    if args.dataset and not os.path.exists(args.dataset) and os.path.splitext(args.dataset)[1]:
        raise UsageError(f"dataset path {args.dataset!r} does not exist")


def run(args) -> int:
    validate(args)
    from rpp_triton.pipeline import prune_pipeline

    prune_pipeline(args)
    return 0
