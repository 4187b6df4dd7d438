"""The one CLI: ``mmm4rec <command> ...`` (``python -m dist``).

Each package contributes its commands through a ``register(subparsers)`` function
(kept import-light: heavy imports happen inside the command). ``mmm4rec --help``
lists them all. Errors follow the one policy of ``mmm4rec.errors``: a user error prints
one line and exits 2 (``--traceback``: with its traceback), anything else keeps its
traceback and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from mmm4rec.errors import add_traceback_flag, run_command
from mmm4rec.log import setup_logging

COMMAND_MODULES = (
    "dist.quickstart",      # quickstart
    "data_shards.cli",      # data build / inspect
    "dist.cli",             # train / evaluate / export
    "dist.serving.cli",     # retrieval export / items / recommend
    "dist.curves",          # curves
    "mmm4rec.envinfo",      # env
)


def build_parser() -> argparse.ArgumentParser:
    from mmm4rec import __version__

    parser = argparse.ArgumentParser(
        prog="mmm4rec",
        description="MMM4Rec at scale: build WebDataset shards, pretrain with DeepSpeed ZeRO + torchrec, "
                    "export the transferable weights, fine-tune on a new domain, evaluate.",
        epilog="Run 'mmm4rec COMMAND --help' for a command's options. Docs: README.md and docs/.",
    )
    parser.add_argument("--version", action="version", version=f"mmm4rec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    add_traceback_flag(parser)   # before or after any (sub-)command
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(f"mmm4rec {args.command}", lambda: args.func(args), args.traceback)


if __name__ == "__main__":
    sys.exit(main())
