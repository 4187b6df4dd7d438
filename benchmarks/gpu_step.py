#!/usr/bin/env python
"""Training-step times on one GPU (part of ``scripts/gpu_check.sh``), and its report.

``step``: one process, one device. Forward+backward+NAdam step of MMM4Rec at the paper's
fine-tuning sizes (N=256, 8 heads of 64, state 64, 768-d text and image features, ID term,
L=20, batch 1024, full softmax over 4,385 items; 1 and 2 layers) in fp32 and in bf16
(autocast, as ``train.precision: bf16``), against SASRec (64 hidden, 2 layers) under the
same settings; then the catalog loss at 10^6 items (world size 1): the full softmax as
dense logits and item-chunked (``losses.full_softmax_ce(chunk_size=...)``), and the
vocab-parallel / sampled losses where this build has them. Each row: median ms per step
over ``--repeats`` timed steps after warm-up (CUDA synchronised), sequences/s, peak memory.

``report``: merges what ``scripts/gpu_check.sh`` left in the output folder (kernel test
log, ``benchmarks/kernels.py`` JSON, this script's JSON) into ``summary.json`` and
``summary.md``.

    python -m benchmarks.gpu_step step --out DIR [--batch 1024] [--repeats 20]
    python -m benchmarks.gpu_step step --out DIR --cpu-smoke      # CPU, tiny sizes (tests)
    python -m benchmarks.gpu_step report --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["step", "report"])
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--batch", type=int, default=1024, help="sequences per step (default 1024)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--items", type=int, default=4385, help="catalog of the main rows (default 4,385)")
    p.add_argument("--big-items", type=int, default=1_000_000, help="catalog of the loss rows (default 10^6)")
    p.add_argument("--chunk", type=int, default=65536, help="item chunk of the chunked full softmax")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run every row on CPU at tiny sizes (a test of this script, not a measurement)")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.repeats, args.warmup, args.items, args.big_items, args.chunk = 4, 2, 1, 50, 3000, 1000
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.items < 1 or args.big_items < 1:
        p.error("--batch, --repeats, --items and --big-items must be >= 1, --warmup >= 0")
    return args


# ----------------------------------------------------------------------------- timing
class StepTimer:
    """Median wall time of ``fn()`` in ms, the device synchronised around each call."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def _sync(self):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def __call__(self, fn) -> dict:
        import torch

        for _ in range(self.warmup):
            fn()
        self._sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else None
        return {"ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "peak_GiB": peak}


def make_batch(torch, b, L, num_items, device, g):
    lens = torch.randint(max(1, L // 4), L + 1, (b,), generator=g)
    items = torch.randint(1, num_items + 1, (b, L), generator=g)
    pad = torch.arange(L)[None] >= lens[:, None]
    items[pad] = 0
    times = torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 86400, 1) + 1.6e9
    times[pad] = 0
    batch = {"item_seq": items, "time_seq": times, "item_seq_len": lens,
             "target": torch.randint(1, num_items + 1, (b,), generator=g), "weight": torch.ones(b)}
    return {k: v.to(device) for k, v in batch.items()}


def build(kind: str, num_items: int, layers: int, device: str, small: bool):
    import torch

    from mmm4rec import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig

    torch.manual_seed(0)
    if kind == "SASRec":
        return SASRec(SASRecConfig(num_items=num_items, max_len=20)).to(device)
    size = dict(hidden_size=32, inner_size=32, d_state=16, head_dim=16, n_groups=4, text_dim=24,
                image_dim=20) if small else {}
    cfg = MMM4RecConfig(num_items=num_items, max_len=20, num_layers=layers, use_id=True, chunk_size=32,
                        time_padding="window", missing_modality="bias", padding_class=True, **size)
    model = MMM4Rec(cfg)
    g = torch.Generator().manual_seed(0)
    n = num_items + 1
    model.tables.load_features({"text": torch.randn(n, cfg.text_dim, generator=g),
                                "image": torch.randn(n, cfg.image_dim, generator=g),
                                "modality_mask": torch.ones(n, 2)})
    return model.to(device)


def step_fn(torch, model, batch, precision: str, device: str, loss_fn=None):
    opt = torch.optim.NAdam([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=6.25e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.calculate_loss(batch, "full") if loss_fn is None else loss_fn(model, batch)
        loss.backward()
        opt.step()

    return step


def run_steps(args) -> dict:
    import torch

    from mmm4rec import losses

    device = "cpu" if args.cpu_smoke else "cuda"
    if args.cpu_smoke:
        torch.set_num_threads(1)
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_step.py: no CUDA device (use --cpu-smoke to test this script on CPU)")
    timer = StepTimer(device, args.warmup, args.repeats)
    g = torch.Generator().manual_seed(0)
    rows = []

    def add(name, precision, res, batch=args.batch, note="", main=False):
        res = dict(res) if res else {}
        if "ms" in res:
            res["seq_per_s"] = batch / res["ms"] * 1e3
        rows.append({"row": name, "precision": precision, "batch": batch, **res, "note": note, "main": main})
        print(f"{name} [{precision}]: " + (f"{res['ms']:.2f} ms/step" if "ms" in res else note), flush=True)

    batch = make_batch(torch, args.batch, 20, args.items, device, g)
    for kind, layers in (("MMM4Rec", 1), ("MMM4Rec", 2), ("SASRec", 2)):
        for precision in ("fp32", "bf16"):
            model = build(kind, args.items, layers, device, args.cpu_smoke)
            name = f"{kind} {layers} layer{'s' if layers > 1 else ''}, full softmax over {args.items:,} items"
            add(name, precision, timer(step_fn(torch, model, batch, precision, device)), main=True)
            del model

    # the catalog loss at --big-items (world size 1)
    big = make_batch(torch, args.batch, 20, args.big_items, device, g)
    model = build("MMM4Rec", args.big_items, 1, device, args.cpu_smoke)
    excl = losses.excludes_padding_class(model.config)

    def full(chunk):
        def loss_fn(m, b):
            u, V = m(b)
            return losses.full_softmax_ce(u, V, b["target"], b["weight"], exclude_padding=excl, chunk_size=chunk)
        return loss_fn

    for precision in ("fp32", "bf16"):
        for label, chunk in (("dense logits", None), (f"item chunks of {args.chunk:,}", args.chunk)):
            name = f"MMM4Rec 1 layer, full softmax over {args.big_items:,} items, {label}"
            try:
                add(name, precision, timer(step_fn(torch, model, big, precision, device, full(chunk))))
            except torch.OutOfMemoryError as e:
                add(name, precision, None, note=f"out of memory: {str(e).splitlines()[0]}")
                torch.cuda.empty_cache()
    for kind in sorted(losses.LOSSES):
        if kind == "full":                     # timed above, dense and chunked
            continue
        name = f"MMM4Rec 1 layer, loss '{kind}' (mmm4rec.losses.LOSSES) over {args.big_items:,} items"
        for precision in ("fp32", "bf16"):
            fn = step_fn(torch, model, big, precision, device, lambda m, b, kind=kind: m.loss(b, kind).value)
            add(name, precision, timer(fn))
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return {"env": env, "cpu_smoke": args.cpu_smoke, "rows": rows}


# ----------------------------------------------------------------------------- report
def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def step_table(step: dict) -> list[str]:
    out = ["| row | precision | batch | ms/step (median) | ms (min) | sequences/s | peak GiB | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in step["rows"]:
        out.append(f"| {r['row']} | {r['precision']} | {r['batch']} | {_fmt(r.get('ms'), '.2f')} | "
                   f"{_fmt(r.get('ms_min'), '.2f')} | {_fmt(r.get('seq_per_s'), ',.0f')} | "
                   f"{_fmt(r.get('peak_GiB'), '.2f')} | {r.get('note', '')} |")
    return out


def ratios(step: dict) -> list[str]:
    """bf16 vs fp32 per row, and MMM4Rec vs SASRec at equal precision (main catalog rows)."""
    ms = {(r["row"], r["precision"]): r.get("ms") for r in step["rows"]}
    main = {r["row"] for r in step["rows"] if r.get("main")}
    out = []
    for (row, prec), v in ms.items():
        if prec == "bf16" and v and ms.get((row, "fp32")):
            out.append(f"- {row}: bf16 runs at {ms[(row, 'fp32')] / v:.2f}x fp32's speed")
    sas = {p: v for (row, p), v in ms.items() if row.startswith("SASRec") and row in main}
    for (row, prec), v in ms.items():
        if row.startswith("MMM4Rec") and row in main and v and sas.get(prec):
            out.append(f"- {row} [{prec}]: {v / sas[prec]:.2f}x SASRec's time per step")
    return out


def write_report(out: Path) -> dict:
    summary: dict = {"written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lines = [f"# GPU check ({summary['written']})", ""]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    summary["commit"] = commit
    meta = out / "meta.json"
    if meta.is_file():
        summary["meta"] = json.loads(meta.read_text())
        lines += [f"Machine: {summary['meta'].get('gpu', 'n/a')}; driver {summary['meta'].get('driver', 'n/a')}; "
                  f"commit {commit}.", ""]
    tests = out / "kernel_tests.log"
    lines += ["## tests/test_kernels_gpu.py", ""]
    if tests.is_file():
        tail = [ln for ln in tests.read_text().splitlines() if ln.strip()]
        result = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln or " error" in ln
                       or " skipped" in ln), tail[-1] if tail else "no output")
        summary["kernel_tests"] = result.strip("= ")
        lines.append(f"Result: {summary['kernel_tests']}")
    else:
        summary["kernel_tests"] = "not run"
        lines.append("not run")
    for dtype in ("bf16", "fp32"):
        kj, kt = out / f"kernels_{dtype}.json", out / f"kernels_{dtype}.txt"
        lines += ["", f"## benchmarks/kernels.py --dtype {dtype} (batch 1024, L 20/50/200/1000)", ""]
        if kj.is_file():
            summary[f"kernels_{dtype}"] = json.loads(kj.read_text())
        if kt.is_file():
            text = kt.read_text()
            lines += [ln for ln in text.splitlines() if ln.startswith("|") or ln.startswith("#")] or [text[-2000:]]
        else:
            lines.append("not run")
    sj = out / "train_step.json"
    lines += ["", "## Training step (benchmarks/gpu_step.py)", ""]
    if sj.is_file():
        step = json.loads(sj.read_text())
        summary["train_step"] = step
        if step.get("cpu_smoke"):
            lines += ["CPU SMOKE RUN (tiny sizes on CPU: a test of the script, not a measurement)", ""]
        lines += [f"{step['env']}", ""] + step_table(step) + [""] + ratios(step)
    else:
        lines.append("not run")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "step":
        res = run_steps(args)
        (args.out / "train_step.json").write_text(json.dumps(res, indent=2) + "\n")
        print("\n".join(step_table(res)))
        return 0
    write_report(args.out)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
