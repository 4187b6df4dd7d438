"""The one CLI: ``mmm4rec <command> ...``.

Each package contributes its commands through a ``register(subparsers)`` function
(kept import-light: heavy imports happen inside the command). ``mmm4rec --help``
lists them all.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "dist.quickstart",      # quickstart
    "data_shards.cli",      # data build / inspect
    "dist.cli",             # train / evaluate / export
    "dist.serving.cli",     # retrieval export / items / recommend
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors: one clear line, no traceback
        from mmm4rec.config import ConfigError

        if isinstance(e, (ConfigError, FileNotFoundError, ValueError)) and not getattr(args, "traceback", False):
            print(f"mmm4rec {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
