"""`rpp-triton report MODEL_DIR`: per-layer sparsity table and a PNG of the kept tiles."""

from __future__ import annotations

import json
import os

from rpp_triton.errors import UsageError


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
    from rpp_triton.artifacts import check_writable
    from rpp_triton.commands.common import block_size_arg

    block = block_size_arg(args.block_size) if args.block_size else None
    png = args.png or os.path.join(args.model_dir, "rpp_tiles.png")
    if os.path.isdir(png):
        raise UsageError(f"--png {png!r} is a directory")
    check_writable(os.path.dirname(os.path.abspath(png)), png)
    info, weights = R.load_layers(args.model_dir, block)
    rows, text = R.table(weights, info["block_size"])
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(text)
        for line in R.quality_lines(info):
            print(line)
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
    R.picture(weights, info["block_size"], png)
    if not args.json:
        print(f"wrote {png}")
    return 0
