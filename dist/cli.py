"""``mmm4rec train | evaluate | export``: the distributed trainer's commands.

Kept import-light (``mmm4rec --help`` imports every command module): torch,
DeepSpeed and torchrec are imported inside the commands.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import MutableMapping, Sequence
from pathlib import Path

_log = logging.getLogger(__name__)
__all__ = ["register", "launcher_command", "launcher_env", "free_port", "port_is_free", "command", "arg"]

TRAIN_PY = Path(__file__).resolve().parent / "train.py"


def _default_nproc() -> int:
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 -- torch missing/broken: let the launcher report it
        return 1


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def process_env(env: MutableMapping[str, str], local_processes: int, has_cuda: bool) -> None:
    """The process-environment policy of training, in one place: for the launcher that
    starts the ranks (:func:`launcher_env`) and inside each rank (``dist.env``) alike.
    One shared extension cache; without a GPU, DeepSpeed's CPU accelerator and the cores
    split between this node's processes. (A Slurm job sets the threads from its
    allocation first: slurm/common.sh.)"""
    from mmm4rec.paths import cache_dir

    env.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(local_processes, 1))))


def launcher_env(nproc: int, base: dict | None = None) -> dict:
    """Environment for a local multi-process launch (:func:`process_env`, unbuffered
    output, the repository on PYTHONPATH)."""
    env = dict(os.environ if base is None else base)
    cuda = _has_cuda()
    process_env(env, nproc, cuda)
    if not cuda:
        # a CUDA_VISIBLE_DEVICES of a GPU-less machine only makes the deepspeed launcher print
        # that it ignores it (the CPU accelerator reads the same variable)
        env.pop("CUDA_VISIBLE_DEVICES", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    from mmm4rec.paths import REPO_ROOT

    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                             if p])
    return env


def launcher_command(nproc: int, train_args: list[str], launcher: str = "deepspeed",
                     master_port: int | None = None) -> list[str]:
    """The command line that runs dist/train.py on ``nproc`` local processes."""
    py = sys.executable
    if launcher == "deepspeed":
        exe = shutil.which("deepspeed", path=os.path.dirname(py) + os.pathsep + os.environ.get("PATH", ""))
        cmd = [exe] if exe else [py, "-m", "deepspeed.launcher.runner"]
        cmd += ["--num_gpus", str(nproc)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        if not _has_cuda():
            # its INFO lines (world info, "Setting CUDA_VISIBLE_DEVICES=0,1", spawn commands)
            # mean nothing on CPU; warnings and errors still show (forwarded to launch.py)
            cmd += ["--log_level", "warning"]
        return cmd + [str(TRAIN_PY), *train_args]
    if launcher == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if master_port:
            cmd += ["--master_port", str(master_port)]
        return cmd + [str(TRAIN_PY), *train_args]
    if launcher == "none":
        return [py, str(TRAIN_PY), *train_args]
    raise ValueError(f"--launcher must be deepspeed, torchrun or none, got {launcher!r}")


# ------------------------------------------------------------------ commands
@dataclasses.dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call, written down: ``arg("--k", type=int, help=...)``."""
    flags: tuple[str, ...]
    options: dict


def arg(*flags: str, **options) -> Arg:
    return Arg(flags, options)


def command(subparsers, name: str, func, *, arguments: Sequence[Arg] = (), **parser_options) -> argparse.ArgumentParser:
    """A sub-command of the ``mmm4rec`` CLI: its parser, its arguments and the function that runs it."""
    p = subparsers.add_parser(name, **parser_options)
    for a in arguments:
        p.add_argument(*a.flags, **a.options)
    p.set_defaults(func=func)
    return p


def add_run_arguments(p: argparse.ArgumentParser, traceback_default: object = False) -> None:
    """The options of a run that ``mmm4rec train`` and ``dist/train.py`` share (the first
    passes them on to the second)."""
    from mmm4rec.errors import add_traceback_flag

    p.add_argument("--config", required=True, metavar="PATH",
                   help="experiment YAML (e.g. configs/tiny_pretrain.yaml)")
    p.add_argument("--output-dir", metavar="DIR", default=None,
                   help="run directory: config.yaml, checkpoints/, logs/, tensorboard/, export/, metrics.json "
                        "(default: runs/<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, the value parsed as YAML; repeatable "
                        "(e.g. --set train.epochs=3 --set model.hidden_size=64)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the output directory (start fresh if there "
                        "is none); without it an output directory that holds checkpoints is refused")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved experiment config and the DeepSpeed config it hands to DeepSpeed "
                        "for the run's world size (secrets redacted; keys where the DeepSpeed JSON differs are "
                        "listed) and exit; starts nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config against the shard set's manifest, build the model on the meta device, "
                        "print parameter counts, item-table rows and bytes per rank and the planned steps for the "
                        "run's world size, and exit; starts no process group")
    add_traceback_flag(p, default=traceback_default)


def _train(args) -> int:
    train_args = ["--config", args.config]
    if args.output_dir:
        train_args += ["--output-dir", args.output_dir]
    for ov in args.overrides:
        train_args += ["--set", ov]
    if args.resume:
        train_args.append("--resume")
    if getattr(args, "traceback", False):
        train_args.append("--traceback")
    nproc = args.nproc or _default_nproc()
    env = launcher_env(nproc)
    if args.print_config or args.dry_run:   # one plain process, no process group: dist/train.py's own
        flags = ["--print-config"] * args.print_config + ["--dry-run"] * args.dry_run
        cmd = launcher_command(1, [*train_args, *flags, "--world-size", str(nproc)], "none")
        os.execvpe(cmd[0], cmd, env)
    launcher = "none" if nproc == 1 and args.launcher == "auto" else \
        ("deepspeed" if args.launcher == "auto" else args.launcher)
    _check_before_launch(args, launcher, nproc)
    env["MMM4REC_DS_OVERLAP_SHOWN"] = "1"
    cmd = launcher_command(nproc, train_args, launcher, args.master_port)
    from mmm4rec.config import redact_argv

    _log.info(" ".join(redact_argv(cmd)))
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


#: the rendezvous port deepspeed and torchrun use when none is given
DEFAULT_MASTER_PORT = 29500


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous or test server)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a rendezvous server could listen on ``port`` (all interfaces, as torch's TCPStore)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _check_before_launch(args, launcher: str, nproc: int) -> None:
    """Checked before any process starts (errors: one line, exit 2, through ``dist.main``):
    the config and DeepSpeed JSON (the keys where the JSON differs from the experiment
    config are printed; the experiment config wins), the output folder, the shard set's
    manifest against the model config (reaching the storage), the rendezvous port."""
    from mmm4rec.config import ConfigError

    from .build import prelaunch_check
    from .config import deepspeed_overlap, load_deepspeed_config, load_experiment, report_overlap

    cfg = load_experiment(args.config, args.overrides)
    path, ds = load_deepspeed_config(cfg, args.config)
    report_overlap(path, deepspeed_overlap(ds, cfg, nproc))
    prelaunch_check(cfg, args.config, args.output_dir or os.path.join("runs", cfg.name))
    if launcher != "none":
        port = args.master_port or DEFAULT_MASTER_PORT
        if not port_is_free(port):
            raise ConfigError(f"--master-port: rendezvous port {port} is already in use (another run?); "
                              f"pass a free one with --master-port N")


def _export(args) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)
    print(f"exported {args.checkpoint} -> {out} (model.safetensors in {args.dtype}, config.json, README.md)")
    return 0


def _evaluate(args) -> int:
    from .evaluate_cmd import evaluate_path

    metrics = evaluate_path(args.path, args.config, args.split, args.overrides)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="distributed training (DeepSpeed ZeRO + torchrec) through the deepspeed launcher",
        description="Run dist/train.py on N local processes through the deepspeed launcher (torchrun with "
                    "--launcher torchrun; one plain process with --nproc 1). On a machine without GPUs it sets "
                    "DS_ACCELERATOR=cpu and splits the cores between processes (OMP_NUM_THREADS). For clusters "
                    "use slurm/pretrain.sh and slurm/finetune.sh.")
    add_run_arguments(p, traceback_default=argparse.SUPPRESS)
    p.add_argument("--nproc", "--num-gpus", type=int, default=None, metavar="N",
                   help="processes (default: the number of GPUs, else 1)")
    p.add_argument("--launcher", choices=("auto", "deepspeed", "torchrun"), default="auto",
                   help="auto: deepspeed for N > 1, a plain process for N = 1")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (launcher default otherwise)")
    p.set_defaults(func=_train)

    command(
        subparsers, "export", _export,
        help="write a checkpoint's transferable weights (safetensors + config.json)",
        description="Export the dense (transferable) weights of a dist/train.py checkpoint -- adapters and blocks, "
                    "not the item feature tables nor the ID term -- as model.safetensors + config.json, the format of "
                    "SeqRecModel.save_pretrained, loadable with MMM4Rec.from_pretrained(OUT), and a model card "
                    "README.md (config, data manifest sha256, feature encoders, the run's metrics). Works for every "
                    "ZeRO stage (ZeRO-3 partitions are consolidated with DeepSpeed's fp32 utilities).",
        arguments=[
            arg("checkpoint", metavar="CHECKPOINT",
                help="a checkpoint directory (OUTPUT_DIR/checkpoints/step_N), or a run's OUTPUT_DIR or "
                     "checkpoints directory (its best checkpoint)"),
            arg("out", metavar="OUT", help="output directory: new, empty or an earlier export (replaced "
                                          "atomically); a folder with anything else is refused, never deleted"),
            arg("--dtype", choices=("fp32", "bf16"), default="fp32",
                help="how the weights are stored (bf16 halves the file; from_pretrained casts back to the "
                     "model's dtype)"),
        ])

    command(
        subparsers, "evaluate", _evaluate,
        help="full-ranking HR/NDCG/MRR@K of a checkpoint or an export on a split",
        description="Evaluate a checkpoint (dense weights + trainable item tables) or an export (dense weights; the "
                    "item features come from the data, an ID term starts at zero) on the valid or test split of the "
                    "experiment's data, ranking every user's target against all items, in one process.",
        arguments=[
            arg("path", metavar="CHECKPOINT|EXPORT",
                help="checkpoint directory, run OUTPUT_DIR (its best checkpoint), or export directory"),
            arg("--config", metavar="PATH", default=None,
                help="experiment YAML naming the data and eval settings (default for a checkpoint: its own "
                     "config.yaml; required for an export)"),
            arg("--split", choices=("valid", "test"), default="test"),
            arg("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                help="config override, repeatable (e.g. --set data.url=s3://bucket/other)"),
            arg("--output", metavar="FILE", help="also write the metrics JSON here"),
        ])
