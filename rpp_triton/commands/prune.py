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


def run(args) -> int:
    from rpp_triton.training.config import PruneConfig, from_namespace

    config = from_namespace(PruneConfig, args, block_size=block_size_arg(args.block_size))
    if config.dataset and not os.path.exists(config.dataset) and os.path.splitext(config.dataset)[1]:
        raise UsageError(f"dataset path {config.dataset!r} does not exist")
    from rpp_triton.training.prune import prune

    prune(config)
    return 0
