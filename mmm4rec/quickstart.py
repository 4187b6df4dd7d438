"""``mmm4rec quickstart`` (work in progress)."""
from __future__ import annotations


def run(args) -> int:
    raise SystemExit("quickstart: not implemented yet")


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="pretrain -> export -> fine-tune on bundled real samples")
    p.set_defaults(func=run)
