#!/usr/bin/env python
"""Distributed MMM4Rec training: DeepSpeed ZeRO (dense weights) + torchrec (item tables).

    deepspeed --num_gpus 2 dist/train.py --config configs/tiny_pretrain.yaml --output-dir runs/pt
    torchrun --nproc_per_node 2 dist/train.py --config configs/tiny_finetune.yaml \\
        --output-dir runs/ft --set train.init_from=runs/pt/export
    python dist/train.py --config configs/tiny_pretrain.yaml      # one process

Reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the environment
(set by deepspeed, torchrun and slurm/common.sh); without them it runs as one process.
Writes OUTPUT_DIR/{config.yaml, checkpoints/, logs/, tensorboard/, export/, metrics.json}.
Exit status: 0 on success, 2 on a configuration, data or storage error (one line on
stderr; ``--traceback`` adds its traceback), 1 on a non-finite loss (one line) or any
other failure (traceback). See docs/training.md
and docs/reliability.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

# The launchers run this file as a script, which puts dist/ first on sys.path: its
# modules (config.py, engine.py, ...) must not shadow top-level packages. Import them
# as the `dist` package from the repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def build_parser() -> argparse.ArgumentParser:
    from dist.cli import add_run_arguments

    p = argparse.ArgumentParser(
        prog="dist/train.py",
        description="Train MMM4Rec (or SASRec) with DeepSpeed ZeRO for the dense weights and torchrec "
                    "EmbeddingCollections for the item tables, on CPU (gloo) or GPU (NCCL).",
        epilog="Launch with `deepspeed --num_gpus N dist/train.py ...` or `torchrun --nproc_per_node N "
               "dist/train.py ...`; a plain `python dist/train.py ...` runs one process. RANK, WORLD_SIZE, "
               "LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment. Exit status: 0 success, 2 "
               "configuration/data/storage error (one line), 1 non-finite loss (one line) or other failure. "
               "Config reference: docs/training.md; faults: docs/reliability.md.")
    add_run_arguments(p)
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="world size that --print-config / --dry-run plan for (default: WORLD_SIZE, else 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK from the environment is used")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mmm4rec.log import setup_logging

    setup_logging()   # rank 0 speaks (RANK from the launcher)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from dist.env import prepare_process_env

    prepare_process_env()   # before DeepSpeed is imported (accelerator, extension cache, threads)

    from dist.config import load_experiment
    from dist.errors import should_print, user_facing_error

    try:
        cfg = load_experiment(args.config, args.overrides)
        if args.print_config or args.dry_run:
            if os.environ.get("RANK", "0") != "0":   # under a launcher: rank 0 reports, the rest exit
                return 0
            from dist.plan import dry_run, print_config

            world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
            if args.print_config:
                print_config(cfg, args.config, world)
            if args.dry_run:
                dry_run(cfg, args.config, world)
            return 0
        output_dir = args.output_dir or os.path.join("runs", cfg.name)
        from dist.trainer import run

        run(cfg, args.config, output_dir, resume=args.resume)
    except Exception as e:  # noqa: BLE001 -- user errors: one line (mmm4rec/errors.py); others: traceback
        handled = user_facing_error(e)
        if handled is None:
            raise
        status, line = handled
        rank = int(os.environ.get("RANK", "0"))
        if should_print(e, rank):
            if args.traceback:
                traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
            print(f"dist/train.py: error: {'' if rank == 0 else f'[rank {rank}] '}{line}", file=sys.stderr,
                  flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
