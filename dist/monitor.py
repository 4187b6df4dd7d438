"""What a run reports (rank 0 only): tqdm progress, TensorBoard, CSV, console lines.

    OUTPUT_DIR/logs/steps.csv     step, epoch, loss, lr, samples/s (every log_every_steps)
    OUTPUT_DIR/logs/epochs.csv    epoch, step, train loss, valid metrics, timings
    OUTPUT_DIR/tensorboard/       the same scalars (train/*, valid/*, test/*)

A resumed run first drops the rows written after its checkpoint, so each file holds
one row per step/epoch as if the run had never stopped.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

__all__ = ["Monitor"]


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
        if new:
            self.fields = list(row)
        extra = [k for k in row if k not in self.fields]
        if extra:   # a new column (e.g. first evaluation): rewrite with the wider header
            with open(self.path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            self.fields = self.fields + extra
            with open(self.path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.fields)
                w.writeheader()
                w.writerows(rows)
        with open(self.path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in self.fields})


class Monitor:
    """Rank 0 writes; every other rank gets a no-op monitor."""

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self._bar = None
        self._tb = None
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

    # --- console
    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"[mmm4rec] {msg}")
        else:
            print(f"[mmm4rec] {msg}", flush=True)

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
        self.steps.write({"step": step, "epoch": epoch, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"train/{k}", v, step)

    def epoch_scalars(self, step: int, epoch: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.epochs.write({"epoch": epoch, "step": step, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
