#!/usr/bin/env python
"""Forward+backward throughput on this machine, as ratios measured in the same run.

1. Training step (full-softmax CE) of MMM4Rec and SASRec at the paper's sizes
   (MMM4Rec: N=256, E=512, 8 heads of 64, state 64, 768-d text and image features;
   SASRec: 64 hidden, 2 layers) over a Scientific-sized catalog (4,385 items).
2. The SSD alone: quadratic (dual) form vs chunked scan for history lengths
   20, 50, 200, 1000 (8 heads of 64, state 64, 8 groups).

    python benchmarks/train_step.py [--batch 128] [--repeats 5] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmm4rec import MMM4Rec, MMM4RecConfig, SASRec, SASRecConfig  # noqa: E402
from mmm4rec.kernels.ssd_ref import ssd_chunked_ref, ssd_quadratic_ref  # noqa: E402


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(b, L, num_items, g):
    lens = torch.randint(L // 2, L + 1, (b,), generator=g)
    items = torch.randint(1, num_items + 1, (b, L), generator=g)
    pad = torch.arange(L)[None] >= lens[:, None]
    items[pad] = 0
    times = torch.cumsum(torch.rand(b, L, generator=g, dtype=torch.float64) * 86400, 1)
    times[pad] = 0
    return {"item_seq": items, "time_seq": times, "item_seq_len": lens,
            "target": torch.randint(1, num_items + 1, (b,), generator=g), "weight": torch.ones(b)}


def model_rows(args, g):
    num_items, L = 4385, 20
    mm = MMM4Rec(MMM4RecConfig(num_items=num_items, max_len=L))
    mm.tables.load_features({"text": torch.randn(num_items + 1, 768, generator=g),
                             "image": torch.randn(num_items + 1, 768, generator=g),
                             "modality_mask": torch.ones(num_items + 1, 2)})
    sas = SASRec(SASRecConfig(num_items=num_items, max_len=L))
    batch = make_batch(args.batch, L, num_items, g)
    rows = []
    for name, model in (("SASRec", sas), ("MMM4Rec", mm)):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(opt=opt, model=model):
            opt.zero_grad(set_to_none=True)
            model.calculate_loss(batch, "full").backward()
            opt.step()

        t = timeit(step, args.repeats)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append((name, n, args.batch / t))
    return rows


def ssd_rows(args, g):
    H, P, S, G = 8, 64, 64, 8
    rows = []
    for L in (20, 50, 200, 1000):
        b = max(1, args.ssd_tokens // L)
        x = torch.randn(b, L, H, P, generator=g, requires_grad=True)
        dt = torch.randn(b, L, H, generator=g, requires_grad=True)
        A = (-torch.rand(H, generator=g) * 4 - 0.5).requires_grad_()
        B = torch.randn(b, L, G, S, generator=g, requires_grad=True)
        C = torch.randn(b, L, G, S, generator=g, requires_grad=True)
        D = torch.ones(H, requires_grad=True)
        bias = torch.zeros(H, requires_grad=True)
        ins = (x, dt, A, B, C, D, bias)
        res = {}
        for form, fn in (("quadratic", ssd_quadratic_ref),
                         ("chunked", lambda *a: ssd_chunked_ref(*a, chunk_size=64))):
            res[form] = b / timeit(lambda fn=fn, ins=ins: fn(*ins).sum().backward(), args.repeats)
        rows.append((L, b, res["quadratic"], res["chunked"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128, help="sequences per training step (default 128)")
    ap.add_argument("--ssd-tokens", type=int, default=4000, help="batch*length per SSD call (default 4000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = (f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [f"# Training-step benchmark ({head})", "",
             f"## Forward+backward+Adam step, full-softmax CE over 4,385 items, batch {args.batch}, L=20", "",
             "| model | trainable params | sequences/s | relative to SASRec |", "|---|---|---|---|"]
    mr = model_rows(args, g)
    for name, n, sps in mr:
        lines.append(f"| {name} | {n:,} | {sps:,.0f} | {sps / mr[0][2]:.2f}x |")
    lines += ["", "## SSD alone, forward+backward (8 heads x 64, state 64, chunk 64)", "",
              "| L | batch | quadratic seq/s | chunked seq/s | chunked / quadratic |", "|---|---|---|---|---|"]
    for L, b, q, c in ssd_rows(args, g):
        lines.append(f"| {L} | {b} | {q:,.1f} | {c:,.1f} | {c / q:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
