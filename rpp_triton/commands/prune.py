"""`rpp-triton prune`: prune a BERT-family encoder while it trains on a pre-training objective,
steered to a target sparsity, then a hard prune to exactly that target and a few recovery steps
with frozen masks. RPP by default; gradual magnitude pruning and one-shot magnitude pruning run on
the same budget for comparison.

With no --model and no --dataset it runs offline on the shipped all-MiniLM-L6-v2 and Python's
documentation text, distilling from the dense model, and reports embedding fidelity and topic
accuracy of the pruned model beside the dense one (and masked-LM accuracy where the model has a
head).
"""

from __future__ import annotations

from rpp_triton.commands.common import (
    DefaultsFormatter,
    add_dataset_arguments,
    add_run_arguments,
    add_standard_names,
    add_trainer_arguments,
    block_size_arg,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a BERT-family model (RPP, or a baseline) on masked LM and/or distillation",
        description=__doc__,
        formatter_class=DefaultsFormatter,
    )
    src = p.add_argument_group("model and data")
    src.add_argument("--model", help="hub name or local directory (default: the shipped all-MiniLM-L6-v2)")
    src.add_argument(
        "--dataset",
        help="hub name or local .txt/.json/.jsonl/.csv file (default: Python's documentation text)",
    )
    add_dataset_arguments(src)
    src.add_argument("--text-column", help="column holding the text (JSON/CSV/hub datasets; default 'text')")
    src.add_argument("--teacher", help="distillation teacher directory (default: the starting dense model)")

    how = p.add_argument_group("pruning")
    how.add_argument("--target-sparsity", type=float, default=0.7, help="share of pruned weights, in [0, 1)")
    how.add_argument("--block-size", default="1", help="tile: N or BHxBW")
    how.add_argument(
        "--method",
        choices=("rpp", "gmp", "oneshot"),
        default="rpp",
        help="rpp; or a baseline on the same budget: gradual magnitude pruning on the same schedule, "
        "or one magnitude prune followed by frozen-mask training",
    )
    how.add_argument(
        "--objective",
        choices=("mlm", "distill", "mlm+distill"),
        help="training loss (default: mlm+distill where the model has a masked-LM head, else distill)",
    )
    how.add_argument("--optimizer", choices=("adamw", "lamb"), default="adamw", help="RPPAdamW or RPPLamb")
    how.add_argument(
        "--prune-by",
        choices=("activation", "rms", "magnitude"),
        default="activation",
        help="tile score every method ranks by: activation = RMS of the tile's weights x RMS of its "
        "input features on training text (Wanda-style); rms or magnitude = the weights alone",
    )
    how.add_argument(
        "--prune-scope",
        choices=("row", "layer", "global"),
        default="row",
        help="where scores compete: row = about the target share of every output row (of tiles) "
        "is pruned, layer = of every weight, global = the lowest scores overall",
    )
    how.add_argument(
        "--ramp", type=float, default=0.7, help="share of the prune steps the ramp to the target takes"
    )
    how.add_argument("--mask-every", type=int, default=5, help="gmp: steps between mask updates")
    how.add_argument(
        "--debias",
        choices=("none", "rewind", "refit"),
        help="what the kept weights become at the hard prune: refit = the least-squares fit, on "
        "calibration text, of each starting layer's output (SparseGPT's reconstruction, for the mask "
        "the method chose), rewind = their starting values, none = as trained (rewind and refit undo "
        "RPP's proximal shrinkage; the mask stays) (default: refit for rpp, none for gmp and oneshot)",
    )
    how.add_argument(
        "--reweight-every", type=int, default=1, help="rpp: reweight alpha every N steps (0: never)"
    )
    how.add_argument("--reweight-eps", type=float, default=0.01, help="rpp: alpha = 1 / (tile RMS + this)")

    steps = p.add_argument_group("budget")
    steps.add_argument(
        "--max-steps", type=int, help="total optimizer steps (default 400 embedded, else 2000)"
    )
    steps.add_argument(
        "--dense-steps", type=int, help="unpruned steps first (default: 10%% with masked LM, else 0)"
    )
    steps.add_argument(
        "--recovery-steps", type=int, help="frozen-mask steps after the hard prune (default 60%%)"
    )
    steps.add_argument(
        "--seq-len", type=int, help="tokens per training block (default 64 embedded, else 128)"
    )
    steps.add_argument(
        "--batch-size", type=int, help="blocks per step and process (default 8 embedded, else 32)"
    )
    steps.add_argument(
        "--lr",
        type=float,
        help="learning rate (default 1e-3 embedded, else 1e-4; LAMB: that x sqrt(total batch / 8, or / 32 "
        "off the embedded default))",
    )
    steps.add_argument("--weight-decay", type=float, default=0.0)
    steps.add_argument("--mlm-probability", type=float, default=0.15)
    steps.add_argument("--temperature", type=float, default=2.0, help="distillation temperature on logits")
    steps.add_argument(
        "--eval-blocks", type=int, help="held-out blocks to score (default 64 embedded, else 512)"
    )
    steps.add_argument(
        "--head-lr-scale",
        type=float,
        default=10.0,
        help="learning-rate multiplier for a freshly initialised masked-LM head",
    )
    steps.add_argument(
        "--dense-reference",
        choices=("same-budget", "none"),
        default="same-budget",
        help="with masked LM: also train a dense copy for the same steps and report it beside the "
        "pruned one (none: skip it, half the time); with distillation the starting model is the reference",
    )
    add_trainer_arguments(
        p,
        warmup_ratio=0.1,
        lr_scheduler_type=None,
        by="linear for AdamW, polynomial for LAMB",
    )
    add_run_arguments(p)
    add_standard_names(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rpp_triton.training.config import PruneConfig, from_namespace

    config = from_namespace(PruneConfig, args, block_size=block_size_arg(args.block_size))
    from rpp_triton.training.prune import prune

    prune(config)
    return 0
