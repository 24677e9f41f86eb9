"""`rpp-triton` command line. Each subcommand lives in `rpp_triton/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser and sets `func`. Heavy imports stay inside `func`, so
`--help` is fast."""

import argparse
import importlib
import sys

from rpp_triton import __version__
from rpp_triton.errors import UsageError

# Subcommands in the order `--help` lists them.
COMMANDS = ("prune", "finetune", "evaluate", "report", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rpp-triton",
        description="Reweighted Proximal Pruning for BERT-family models: prune, fine-tune, report, serve.",
    )
    parser.add_argument("--version", action="version", version=f"rpp-triton {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rpp_triton.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"rpp_triton.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except UsageError as exc:
        print(f"rpp-triton {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rpp-triton {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
