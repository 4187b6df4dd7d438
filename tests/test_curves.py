"""``mmm4rec curves``: runs' epochs.csv side by side, best epochs marked, a PNG, clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dist.curves import curves_table, read_epochs
from dist.monitor import Monitor

REPO = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, name: str, hr: list[float]) -> Path:
    """A run folder whose epochs.csv is written by the trainer's own Monitor."""
    out = root / name
    mon = Monitor(out, enabled=True)
    for e, v in enumerate(hr, start=1):
        mon.epoch_scalars(5 * e, e, {"train_loss": 10.0 - e, "valid/hr@10": v, "valid/ndcg@10": v / 2})
    mon.close()
    return out


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist", "curves", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_table_marks_each_runs_best_epoch_and_leaves_missing_epochs_blank(tmp_path):
    a = _run_dir(tmp_path, "a", [0.10, 0.30, 0.20])
    b = _run_dir(tmp_path, "b", [0.25, 0.15])
    runs = {"a": read_epochs(a), "zero": read_epochs(b)}
    assert [r["epoch"] for r in runs["a"]] == [1, 2, 3] and runs["a"][1]["valid/hr@10"] == pytest.approx(0.30)
    lines = curves_table(runs, "valid/hr@10").splitlines()
    assert lines[0] == "valid/hr@10" and lines[1].split() == ["epoch", "a", "zero"]
    assert lines[3].split() == ["1", "0.1000", "0.2500*"]
    assert lines[4].split() == ["2", "0.3000*", "0.1500"]
    assert lines[5].split() == ["3", "0.2000"]                  # b has no epoch 3
    loss = curves_table(runs, "train_loss").splitlines()
    assert loss[5].split() == ["3", "7.0000*"] and loss[4].split() == ["2", "8.0000", "8.0000*"]   # lowest
    md = curves_table(runs, "valid/ndcg@10", markdown=True).splitlines()
    assert md[2] == "| epoch | a | zero |" and md[5] == "| 2 | 0.1500* | 0.0750 |"


def test_cli_prints_tables_writes_the_png_and_names_bad_input(tmp_path):
    pytest.importorskip("matplotlib", reason="the [plots] extra is not installed")
    a = _run_dir(tmp_path, "a", [0.10, 0.30])
    b = _run_dir(tmp_path, "b", [0.20, 0.25])
    r = _cli(str(a), f"{b}=second", "--metric", "valid/hr@10", "--plot", str(tmp_path / "c.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines()[1].split() == ["epoch", "a", "second"] and "0.3000*" in r.stdout
    r1 = _cli(str(a), f"{b}=second", "--max-epoch", "1", cwd=tmp_path)
    assert r1.returncode == 0 and "0.3000" not in r1.stdout and "0.1000" in r1.stdout, r1.stderr[-3000:]
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for args, names in (([str(tmp_path / "nope")], "nope/logs/epochs.csv"),
                        ([str(a), "--metric", "valid/hr@99"], "valid/hr@99"),
                        ([str(a), f"{b}=a"], "used twice")):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and names in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "bad" / "logs").mkdir(parents=True)
    (tmp_path / "bad" / "logs" / "epochs.csv").write_text("epoch,valid/hr@10\n1,0.1\n2,oops\n")
    r = _cli(str(tmp_path / "bad"), cwd=tmp_path)
    assert r.returncode == 2 and "line 3" in r.stderr and "oops" in r.stderr, r.stderr
