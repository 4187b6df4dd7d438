"""``mmm4rec quickstart``: the whole transfer pipeline on bundled real data, on this machine.

1. builds WebDataset shards of two bundled samples on local disk (standing in for S3;
   the same code reads ``s3://``): ``amazon_mix`` (four Amazon domains: Beauty, Toys,
   Health, Games; item titles, real timestamps) and ``scientific_mm`` (Amazon
   Scientific, text + CLIP image vectors);
2. pretrains MMM4Rec on ``amazon_mix`` (``--pretrain-data office``: the Office sample)
   with 2 processes through the ``deepspeed`` launcher (DeepSpeed ZeRO-2 for the dense
   weights, torchrec for the item tables; gloo on CPU);
3. exports the transferable weights of the best checkpoint (``mmm4rec export``);
4. fine-tunes on ``scientific_mm`` from that export, and from scratch for comparison,
   the same epochs each; epoch 0 is the start's own valid evaluation (``eval.at_start``);
5. prints the test metrics of both, their valid metrics at equal epochs, and writes
   ``summary.json`` and ``validation_curves.png`` into the run directory.

About 80 s on a 2-core CPU machine with warm caches (2026-12-01; DeepSpeed's shared-memory op and the MiniLM
text vectors are built once per machine and cached).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mmm4rec.paths import REPO_ROOT as REPO

__all__ = ["run", "register"]
_log = logging.getLogger(__name__)
CONFIGS = REPO / "configs"


def _say(msg: str) -> None:
    _log.info(msg, extra={"tag": "quickstart"})


def _launch(name: str, run_dir: Path, args: list[str], nproc: int, launcher: str) -> Path:
    """Run dist/train.py (its output to logs/NAME.log); then show its epochs from its metrics.json."""
    from dist.cli import free_port, launcher_command, launcher_env

    out = run_dir / name
    cmd = launcher_command(nproc, ["--output-dir", str(out), *args], launcher if nproc > 1 else "none",
                           master_port=free_port())
    log_path = run_dir / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _say(f"{name}: {' '.join(os.path.relpath(c) if c.startswith(str(REPO)) else c for c in cmd)}")
    _say(f"{name}: running; its log: {log_path}")
    t0 = time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=launcher_env(nproc), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log_path.read_text().splitlines()[-40:]
        raise RuntimeError(f"{name} failed with exit code {rc} after {time.time() - t0:.0f}s; full log: "
                           f"{log_path}\n" + "\n".join(tail))
    metrics = json.loads((out / "metrics.json").read_text())
    for h in metrics["history"]:
        valid = ", ".join(f"{k.removeprefix('valid/')} {v:.4f}" for k, v in h.items()
                          if k in ("valid/ndcg@10", "valid/hr@10"))
        loss = f"train loss {h['train_loss']:.4f}" if "train_loss" in h else "initial weights"
        _say(f"    epoch {h['epoch']}: {loss}" + (f", valid {valid}" if valid else ""))
    _say(f"{name}: done in {time.time() - t0:.0f}s, best epoch {metrics.get('best_epoch')}")
    return out


def _table(rows: list[tuple[str, dict]]) -> str:
    cols = ["hr@10", "ndcg@10", "hr@20", "ndcg@20", "hr@50", "ndcg@50"]
    head = f"{'fine-tuning on scientific_mm':<32}{'best epoch':>11}" + "".join(f"{c:>9}" for c in cols)
    lines = [head, "-" * len(head)]
    for label, m in rows:
        test = m.get("test") or {}
        lines.append(f"{label:<32}{m.get('best_epoch') or '-':>11}"
                     + "".join(f"{test.get(c, float('nan')):>9.4f}" for c in cols))
    return "\n".join(lines)


def _epoch_table(runs: dict[str, dict]) -> str:
    """Validation NDCG@10 / HR@10 per epoch, one column pair per run (equal-epoch comparison)."""
    curves = {label: {h["epoch"]: h for h in m["history"] if "valid/ndcg@10" in h} for label, m in runs.items()}
    epochs = sorted({e for c in curves.values() for e in c})
    if not epochs:
        return ""
    head = f"{'epoch':>5}" + "".join(f"{label + ' ndcg@10':>32}{'hr@10':>8}" for label in curves)
    lines = [head, "-" * len(head)]
    for e in epochs:
        cells = [(c[e]["valid/ndcg@10"], c[e]["valid/hr@10"]) if e in c else (float("nan"),) * 2
                 for c in curves.values()]
        lines.append(f"{e:>5}" + "".join(f"{n:>32.4f}{h:>8.4f}" for n, h in cells))
    return "\n".join(lines)


def _plot(runs: dict[str, dict], out: Path) -> Path | None:
    from dist.curves import plot_curves

    return plot_curves({label: m["history"] for label, m in runs.items()}, ("valid/ndcg@10", "valid/hr@10"), out,
                       "MMM4Rec quickstart: validation curves (full ranking over all items)")


def run(args) -> int:
    try:
        return _run(args)
    except RuntimeError as e:   # a training step failed: its log tail, no traceback of ours
        print(f"[quickstart] error: {e}", file=sys.stderr, flush=True)
        return 1


def _run(args) -> int:
    t_start = time.time()
    run_dir = Path(args.run_dir or REPO / "runs" / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        from mmm4rec.config import ConfigError

        raise ConfigError(f"--run-dir {run_dir} is not empty; choose a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    _say(f"run directory: {run_dir}")

    # 1. shards on local disk (an s3:// URL works the same way: data.url=s3://bucket/prefix)
    from data_shards import ensure_sample_shards

    t0 = time.time()
    # MiniLM vectors come from the machine-wide text cache (mmm4rec.paths): encoded once
    pre_data = args.pretrain_data
    shards = {name: ensure_sample_shards(name, run_dir / "shards", progress=False)
              for name in (pre_data, "scientific_mm")}
    _say(f"shards built in {time.time() - t0:.0f}s: {shards[pre_data]}, {shards['scientific_mm']}")

    data = lambda name: ["--set", "data.sample=null", "--set", f"data.url={shards[name]}"]  # noqa: E731
    epochs = lambda n: ["--set", f"train.epochs={n}"] if n else []  # noqa: E731

    # 2. pretraining
    pre = _launch("pretrain", run_dir, ["--config", str(CONFIGS / "quickstart_pretrain.yaml"), *data(pre_data),
                                        *epochs(args.pretrain_epochs)], args.nproc, args.launcher)
    # 3. export of the best checkpoint (the run also left one in pretrain/export)
    from dist.export import export_checkpoint

    export = export_checkpoint(pre, run_dir / "export")
    _say(f"exported the transferable weights of {pre} -> {export}")
    # 4. fine-tuning, from the export and from scratch
    ft_cfg = ["--config", str(CONFIGS / "quickstart_finetune.yaml"), *data("scientific_mm"),
              *epochs(args.finetune_epochs)]
    runs = {"from pretrained export": _launch("finetune", run_dir, [*ft_cfg, "--set", f"train.init_from={export}"],
                                              args.nproc, args.launcher)}
    if not args.no_scratch:
        runs["from scratch"] = _launch("scratch", run_dir, ft_cfg, args.nproc, args.launcher)

    # 5. report
    metrics = {label: json.loads((path / "metrics.json").read_text()) for label, path in runs.items()}
    pre_metrics = json.loads((pre / "metrics.json").read_text())
    table = _table(list(metrics.items()))
    by_epoch = _epoch_table(metrics)
    plot = _plot(metrics, run_dir / "validation_curves.png")
    total = time.time() - t_start
    summary = {"run_dir": str(run_dir), "shards": shards, "export": str(export), "wall_seconds": round(total, 1),
               "pretrain": {k: pre_metrics[k] for k in ("best_epoch", "best_valid", "timings")},
               "finetune": {label: {k: m[k] for k in ("best_epoch", "test", "best_valid", "timings")}
                            for label, m in metrics.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    n_test = metrics[next(iter(metrics))]["test"]["count"]
    print(f"Test metrics of the best checkpoint (full ranking over all {n_test:.0f}"
          f" test users' targets against every item; pretraining on {pre_data}: best epoch "
          f"{pre_metrics['best_epoch']}, valid ndcg@10 {pre_metrics['best_valid']['ndcg@10']:.4f})")
    print(table)
    print()
    if by_epoch:
        print("Validation NDCG@10 at equal epochs (the same budget for both):")
        print(by_epoch)
        print()
    _say(f"total wall time {total:.0f}s; summary {run_dir / 'summary.json'}"
         + (f"; validation curves {plot}" if plot else ""))
    _say("TensorBoard: tensorboard --logdir " + str(run_dir))
    return 0


def register(subparsers) -> None:
    from dist.cli import arg, command

    command(
        subparsers, "quickstart", run,
        help="pretrain -> export -> fine-tune on bundled real data (2 processes, CPU is enough)",
        description="Build shards of the bundled samples on local disk, pretrain MMM4Rec on 'amazon_mix' (four "
                    "Amazon domains) with 2 processes through the deepspeed launcher (ZeRO-2 + torchrec), "
                    "export, fine-tune on 'scientific_mm' from the export and from scratch (same epochs), print "
                    "the test metrics and the valid metrics per epoch, and save the validation curves. About 1.5 "
                    "minutes on 2 CPU cores with warm caches (one-time builds: about a minute more).",
        arguments=[
            arg("--run-dir", default=None, help="output directory (default runs/quickstart-<time>; must be new)"),
            arg("--nproc", type=int, default=2, help="processes per run"),
            arg("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed"),
            arg("--pretrain-epochs", type=int, default=None, help="override configs/quickstart_pretrain.yaml"),
            arg("--finetune-epochs", type=int, default=None, help="override configs/quickstart_finetune.yaml"),
            arg("--no-scratch", action="store_true", help="skip the from-scratch comparison run"),
            arg("--pretrain-data", choices=("amazon_mix", "office"), default="amazon_mix",
                help="bundled pretraining sample: 'amazon_mix' (Beauty, Toys, Health, Games: four Amazon "
                     "domains, titles, real timestamps) or 'office' (Amazon Office Products); see "
                     "data/samples/PROVENANCE.md"),
        ])


if __name__ == "__main__":
    from dist.main import main

    sys.exit(main(["quickstart", *sys.argv[1:]]))
