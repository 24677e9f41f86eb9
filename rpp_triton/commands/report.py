"""`rpp-triton report MODEL_DIR`: per-layer sparsity table and a PNG of the kept tiles."""

from __future__ import annotations

import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="per-layer sparsity table and a picture of kept tiles", description=__doc__
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a directory written by prune or finetune (or any model)"
    )
    p.add_argument("--png", help="where to write the picture (default: MODEL_DIR/rpp_tiles.png)")
    p.add_argument("--block-size", help="tile to draw, N or BHxBW (default: the run's tile, else 1)")
    p.add_argument("--json", action="store_true", help="print the per-layer rows as JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from rpp_triton import report as R
    from rpp_triton.commands.common import block_size_arg

    block = block_size_arg(args.block_size) if args.block_size else None
    info, weights = R.load_layers(args.model_dir, block)
    rows, text = R.table(weights, info["block_size"])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(text)
        for key, label in (("dense", "dense"), ("pruned", "pruned")):
            m = info.get(key)
            if m and m.get("mlm_accuracy") is not None:
                print(f"masked LM ({label}): accuracy {m['mlm_accuracy']:.4f}, loss {m['mlm_loss']:.4f}")
        if info.get("finetune"):
            metrics = info["finetune"]["metrics"]
            print(
                f"fine-tuned on {info['finetune']['task']}: "
                + ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in metrics.items()
                    if k in ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman")
                )
            )
    png = args.png or os.path.join(args.model_dir, "rpp_tiles.png")
    R.picture(weights, info["block_size"], png)
    if not args.json:
        print(f"wrote {png}")
    return 0
