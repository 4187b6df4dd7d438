"""What a run reports (rank 0 only): tqdm progress, TensorBoard, CSV, console lines.

    OUTPUT_DIR/logs/steps.csv     step, epoch, loss, lr, samples/s (every log_every_steps)
    OUTPUT_DIR/logs/epochs.csv    epoch, step, train loss, valid metrics, timings
    OUTPUT_DIR/tensorboard/       the same scalars (train/*, valid/*, test/*)
    W&B / MLflow                  the same scalars again, when enabled (``dist/trackers.py``)

Every step row also carries throughput and memory: ``steps_per_s`` (optimizer steps
per second since the last row), ``samples_per_s`` (from the trainer), ``mem_rss_gib``
and ``mem_peak_rss_gib`` (this process), and on CUDA ``cuda_mem_gib`` /
``cuda_peak_mem_gib`` (``torch.cuda.memory_allocated`` / its peak).

A resumed run first drops the rows written after its checkpoint, so each file holds
one row per step/epoch as if the run had never stopped.
"""
from __future__ import annotations

import csv
import logging
import resource
import sys
import time
from pathlib import Path

_log = logging.getLogger(__name__)
__all__ = ["Monitor", "memory_scalars"]

_GIB = 1024 ** 3


def memory_scalars() -> dict:
    """This process's memory now and at its peak (GiB), and CUDA's when there is a GPU."""
    import psutil
    import torch

    out = {"mem_rss_gib": psutil.Process().memory_info().rss / _GIB,
           "mem_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_mem_gib"] = torch.cuda.memory_allocated() / _GIB
        out["cuda_peak_mem_gib"] = torch.cuda.max_memory_allocated() / _GIB
    return out


class _Csv:
    def __init__(self, path: Path):
        self.path = path
        self.fields: list[str] | None = None
        if path.is_file():
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), None)
            self.fields = header or None

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        with open(self.path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        kept = [r for r in rows if int(float(r.get("step") or 0)) <= step]
        with open(self.path, "w", newline="") as fh:
            if self.fields:
                w = csv.DictWriter(fh, fieldnames=self.fields)
                w.writeheader()
                w.writerows(kept)

    def write(self, row: dict) -> None:
        new = not self.path.is_file() or self.fields is None
        fields = list(row) if new or self.fields is None else self.fields
        extra = [k for k in row if k not in fields]
        if extra:   # a new column (e.g. first evaluation): rewrite with the wider header
            with open(self.path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            fields = fields + extra
            with open(self.path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
        self.fields = fields
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in fields})


class Monitor:
    """Rank 0 writes; every other rank gets a no-op monitor."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None, trackers=None,
                 run_config: dict | None = None, run_name: str = "mmm4rec"):
        """``trackers``: a ``TrackersConfig`` (W&B / MLflow switches); ``run_config``: the
        resolved config they record (pass it redacted)."""
        self.enabled = enabled
        self._bar = None
        self._tb = None
        self.trackers: list = []
        self._last = (resume_step or 0, time.time())
        if not enabled:
            return
        logs = output_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.steps = _Csv(logs / "steps.csv")
        self.epochs = _Csv(logs / "epochs.csv")
        if resume_step is not None:
            self.steps.truncate_after(resume_step)
            self.epochs.truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)
        except ImportError:  # tensorboard is a dependency; keep training if it is broken
            self.log("tensorboard is not importable: scalars go to the CSV files only")
        if trackers is not None:
            from .trackers import open_trackers

            self.trackers = open_trackers(trackers, output_dir, run_name, run_config or {},
                                          resume=resume_step is not None)

    # --- console
    def log(self, msg: str) -> None:
        if self.enabled:
            _log.info(msg)   # through tqdm.write (mmm4rec.log): the progress bar stays intact

    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="step", dynamic_ncols=True,
                         mininterval=0.5 if tty else 30.0, leave=tty)

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- scalars
    def step_scalars(self, step: int, epoch: int, scalars: dict) -> None:
        if not self.enabled:
            return
        now = time.time()
        last_step, last_t = self._last
        scalars = {**scalars, "steps_per_s": (step - last_step) / max(now - last_t, 1e-9), **memory_scalars()}
        self._last = (step, now)
        self.steps.write({"step": step, "epoch": epoch, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        for t in self.trackers:
            t.log({f"train/{k}": v for k, v in scalars.items()}, step)

    def epoch_scalars(self, step: int, epoch: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.epochs.write({"epoch": epoch, "step": step, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        numeric = {k: v for k, v in scalars.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for t in self.trackers:
            t.log({"epoch": epoch, **numeric}, step)

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
        for t in self.trackers:
            t.close()
        self.trackers = []
