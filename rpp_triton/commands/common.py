"""Argument helpers the training subcommands share."""

from __future__ import annotations

import re

from rpp_triton.errors import UsageError


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
