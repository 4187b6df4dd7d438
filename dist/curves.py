"""``mmm4rec curves``: compare training runs' validation curves, as a table and a PNG.

Reads ``OUTPUT_DIR/logs/epochs.csv`` of each run (one row per evaluated epoch; a resumed run
keeps one row per epoch, ``dist/monitor.py``) and prints, per metric, one column per run
and one row per epoch, with each run's best epoch marked ``*``. ``--plot`` draws the same
curves (one panel per metric) with matplotlib (the ``[plots]`` extra). TensorBoard over the
runs' ``tensorboard/`` folders shows the same scalars interactively; this command is for a
terminal, a report or a committed figure.

    mmm4rec curves runs/a runs/b=without-ID --metric valid/hr@10 --metric valid/ndcg@10 \\
        --plot curves.png --markdown

``plot_curves`` is the one plotting function of validation curves (the quickstart's
figure uses it too).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from mmm4rec.errors import OptionalDependencyError, UserError, import_optional

__all__ = ["read_epochs", "plot_curves", "curves_table", "register"]

DEFAULT_METRICS = ("valid/hr@10", "valid/ndcg@10")


def read_epochs(run_dir: str | Path) -> list[dict]:
    """The evaluated epochs of a run: ``[{"epoch": int, "<column>": float, ...}]``, in epoch
    order (numbers parsed; empty cells left out)."""
    path = Path(run_dir) / "logs" / "epochs.csv"
    if not path.is_file():
        raise UserError(f"{path}: no such file (is {run_dir} a training run's --output-dir?)")
    rows = []
    with open(path, newline="") as fh:
        for n, r in enumerate(csv.DictReader(fh), start=2):
            row: dict = {}
            for k, v in r.items():
                if k is None or v in (None, ""):
                    continue
                try:
                    row[k] = float(v)
                except ValueError:
                    raise UserError(f"{path}: line {n}, column {k!r}: not a number: {v!r}") from None
            if "epoch" not in row:
                raise UserError(f"{path}: line {n}: no epoch")
            row["epoch"] = int(row["epoch"])
            rows.append(row)
    return sorted(rows, key=lambda r: r["epoch"])


def _best_epoch(rows: list[dict], metric: str) -> int | None:
    """The first epoch of the best value: the lowest for a loss or a time, the highest otherwise."""
    sign = -1.0 if "loss" in metric or "seconds" in metric else 1.0
    vals = [(sign * r[metric], r["epoch"]) for r in rows if metric in r and not math.isnan(r[metric])]
    return max(vals, key=lambda x: (x[0], -x[1]))[1] if vals else None


def curves_table(runs: dict[str, list[dict]], metric: str, markdown: bool = False, digits: int = 4) -> str:
    """One row per epoch, one column per run: ``metric`` (``*`` marks each run's best epoch:
    lowest loss or seconds, highest anything else)."""
    epochs = sorted({r["epoch"] for rows in runs.values() for r in rows if metric in r})
    best = {label: _best_epoch(rows, metric) for label, rows in runs.items()}
    cells = []
    for e in epochs:
        line = [str(e)]
        for label, rows in runs.items():
            v = next((r[metric] for r in rows if r["epoch"] == e and metric in r), None)
            line.append("" if v is None else f"{v:.{digits}f}" + ("*" if best[label] == e else ""))
        cells.append(line)
    head = ["epoch", *runs]
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in cells]
        return f"{metric}\n\n" + "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *cells, strict=True)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([metric, fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
                     + [fmt.format(*c) for c in cells])


def plot_curves(runs: dict[str, list[dict]], metrics, out: str | Path, title: str) -> Path | None:
    """One panel per metric, one line per run (x: epoch). None (and a message) without matplotlib."""
    try:   # a plot is a by-product: without matplotlib (or with a broken one) the run still ends well
        matplotlib = import_optional("matplotlib", "plots", "plotting")
        matplotlib.use("Agg")
        plt = import_optional("matplotlib.pyplot", "plots", "plotting")
    except OptionalDependencyError as e:
        print(f"[mmm4rec] no plot: {e}", flush=True)
        return None
    metrics = list(metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for label, rows in runs.items():
            pts = [(r["epoch"], r[metric]) for r in rows if metric in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _parse_run(spec: str) -> tuple[str, str]:
    """``DIR`` or ``DIR=LABEL`` (the label defaults to the folder's name)."""
    path, _, label = spec.partition("=")
    return path, label or Path(path).name


def run(args) -> int:
    runs: dict[str, list[dict]] = {}
    for spec in args.runs:
        path, label = _parse_run(spec)
        if label in runs:
            raise UserError(f"{spec}: the label {label!r} is used twice (name runs with DIR=LABEL)")
        runs[label] = [r for r in read_epochs(path) if args.max_epoch is None or r["epoch"] <= args.max_epoch]
    metrics = args.metric or list(DEFAULT_METRICS)
    have = {k for rows in runs.values() for r in rows for k in r}
    for m in metrics:
        if m not in have:
            cols = sorted(k for k in have if k != "epoch")
            raise UserError(f"--metric {m}: no run logged it (columns: {', '.join(cols)})")
    print("\n\n".join(curves_table(runs, m, markdown=args.markdown) for m in metrics), flush=True)
    if args.plot:
        png = plot_curves(runs, metrics, args.plot, args.title)
        if png:
            print(f"[mmm4rec] wrote {png}", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "curves", help="compare runs' validation curves: a table per metric and a PNG",
        description="Read OUTPUT_DIR/logs/epochs.csv of each training run and print each metric per epoch, one "
                    "column per run (* = the run's best epoch); --plot draws the curves.",
        epilog="example: mmm4rec curves runs/pre runs/scratch=from-scratch --metric valid/ndcg@10 --plot c.png")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR[=LABEL]", help="training output folders (--output-dir)")
    p.add_argument("--metric", action="append", default=[], metavar="COLUMN",
                   help=f"an epochs.csv column, repeatable (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--max-epoch", type=int, metavar="N", help="only epochs up to N (compare runs at equal epochs)")
    p.add_argument("--plot", metavar="PNG", help="also draw the curves into this PNG file")
    p.add_argument("--title", default="validation curves (full ranking over all items)", help="the figure's title")
    p.add_argument("--markdown", action="store_true", help="Markdown tables (for docs/ and issue notes)")
    p.set_defaults(func=run)
