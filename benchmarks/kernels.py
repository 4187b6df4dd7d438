#!/usr/bin/env python
"""Forward+backward time of the Triton kernels against their baselines, on one GPU.

1. SSD: ours (``ssd_chunked_triton``) vs the PyTorch chunked reference, the quadratic
   (dual) form and mamba_ssm's ``mamba_chunk_scan_combined`` (when installed; run with
   its fused D, which costs the same as ours), at recommendation shapes: batch 1024,
   L = 20 / 50 / 200 / 1000, 8 heads of 64, state 64, groups as in the model (8).
2. Fourier filter: the fused kernel vs the torch.fft reference, L = 20 / 50 / 200 / 512.

Ratios are baseline time / our time (> 1: ours is faster). Each row also gives the
achieved bandwidth (the bytes the op must move at least: inputs read, outputs and
gradients written, once each) and FLOP/s (of the algorithm as implemented), against
ceilings measured in the same run: a device-to-device copy and a dense matmul.

    python -m benchmarks.kernels [--dtype bf16|fp16|fp32] [--batch 1024] [--json out.json]
    python -m benchmarks.kernels --interpret-smoke    # CPU: one tiny shape, interpreter

Needs a CUDA GPU; without one it says so and exits 0. ``--interpret-smoke`` runs one
tiny shape through the same code path on CPU via TRITON_INTERPRET=1 (a test of this
script, not a measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lengths", default="20,50,200,1000", help="SSD sequence lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--state", type=int, default=64)
    p.add_argument("--groups", type=int, default=8, help="B/C groups (model default: 8 = heads)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--fourier-lengths", default="20,50,200,512")
    p.add_argument("--no-quadratic", action="store_true", help="skip the O(L^2) baseline")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="CPU only: run one tiny shape through Triton's interpreter")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- timing
def bench_ms(fn, device, grad_to_none=()):
    """Mean time of fn() in ms: triton.testing.do_bench (CUDA events, L2 flushed) on GPU."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, grad_to_none=list(grad_to_none))
    fn()                                    # interpreter smoke: wall clock, 2 repeats
    times = []
    for _ in range(2):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_ceilings(torch, device, dtype):
    """Copy bandwidth (GB/s, read + write) and dense matmul TFLOP/s in ``dtype`` / TF32 / fp32."""
    n = (1 << 28) if device == "cuda" else (1 << 20)          # 1 GiB of fp32 on GPU
    src = torch.empty(n, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device)
    out = {"copy_GBps": 2 * src.numel() * 4 / ms / 1e6}
    m = 8192 if device == "cuda" else 256
    kinds = [("tf32", torch.float32, True), ("fp32", torch.float32, False)]
    if dtype != torch.float32:
        kinds.insert(0, (str(dtype).replace("torch.", ""), dtype, False))
    for name, dt, tf32 in kinds:
        a = torch.randn(m, m, device=device, dtype=dt)
        b = torch.randn(m, m, device=device, dtype=dt)
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = bench_ms(lambda a=a, b=b: a @ b, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        out[f"matmul_{name}_TFLOPs"] = 2 * m ** 3 / ms / 1e9
    return out


# ----------------------------------------------------------------------------- SSD
def ssd_cost(b, L, H, P, G, S, Q, elt):
    """(bytes, flops) of one forward+backward of the chunked scan as our kernels run it."""
    io_fwd = b * L * (H * P + H + 2 * G * S) * elt + b * L * H * P * elt          # in, y
    io_bwd = b * L * (2 * H * P + H + 2 * G * S) * elt + b * L * (H * P + H + 2 * G * S) * elt
    c = math.ceil(L / Q)
    per = b * c * H                                                              # (chunk, head)
    multi = c > 1                                                                # stages 2-3 run
    fwd = per * (2 * Q * Q * S + 2 * Q * Q * P + (4 * Q * P * S if multi else 0))
    bwd = per * (4 * Q * Q * P + 6 * Q * Q * S + (8 * Q * P * S if multi else 0))
    bwd += per * (2 * Q * P * S if multi else 0)                                 # recompute states
    return io_fwd + io_bwd, fwd + bwd


def ssd_rows(torch, args, device, dtype, ceilings, mamba):
    from benchmarks.kernel_checks import SSDShape, mamba_cpu_shims, ssd_inputs
    from mmm4rec.kernels.ssd_combined import kernel_chunk_size, ssd_chunked_triton
    from mmm4rec.kernels.ssd_ref import ssd_chunked_ref, ssd_quadratic_ref

    # the interpreter smoke runs mamba's kernels on CPU tensors too (see mamba_cpu_shims)
    shims = mamba_cpu_shims if device == "cpu" else contextlib.nullcontext

    rows = []
    for L in [int(v) for v in args.lengths.split(",")]:
        shape = SSDShape(args.batch, L, args.heads, args.head_dim, args.groups, args.state)
        ins = [t.detach().requires_grad_(True) for t in ssd_inputs(shape, 0, device, dtype)]
        dy = torch.randn(args.batch, L, args.heads, args.head_dim, device=device, dtype=dtype)

        def fwd_bwd(f, ins=ins, dy=dy):
            def run():
                with shims():
                    f(*ins).backward(dy)
            return run

        impls = {
            "ours": lambda *a: ssd_chunked_triton(*a, chunk_size=args.chunk),
            "torch_chunked": lambda *a: ssd_chunked_ref(*a, chunk_size=args.chunk),
        }
        if not args.no_quadratic:
            impls["torch_quadratic"] = ssd_quadratic_ref
        if mamba is not None:
            def mamba_fn(x, dt, A, B, C, D, dt_bias):
                # the same cost as ours: its own fused skip term (on x, not on dt * x)
                return mamba(x, dt, A, B, C, args.chunk, D=D, dt_bias=dt_bias, dt_softplus=True)
            impls["mamba"] = mamba_fn
        row = {"L": L}
        for name, f in impls.items():
            try:
                row[f"{name}_ms"] = bench_ms(fwd_bwd(f), device, grad_to_none=ins)
            except (torch.cuda.OutOfMemoryError, MemoryError):
                row[f"{name}_ms"] = None              # reported as OOM (the quadratic form at L=1000)
                for t in ins:
                    t.grad = None
                if device == "cuda":
                    torch.cuda.empty_cache()
        Q = kernel_chunk_size(args.chunk, L, args.state)
        nbytes, flops = ssd_cost(args.batch, L, args.heads, args.head_dim, args.groups,
                                 args.state, Q, torch.finfo(dtype).bits // 8)
        ours = row["ours_ms"]
        row["GBps"] = nbytes / ours / 1e6
        row["TFLOPs"] = flops / ours / 1e9
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- Fourier
def fourier_cost(rows, L, elt):
    F = L // 2 + 1
    nbytes = rows * L * elt * (2 + 1) + rows * L * elt * (1 + 2) + 12 * 2 * F * F * 4
    flops = rows * (24 * L * F + 72 * F * F)
    return nbytes, flops


def fourier_rows(torch, args, device, dtype, ceilings):
    from benchmarks.kernel_checks import fourier_inputs
    from mmm4rec.kernels.fourier_fused import fourier_filter_triton
    from mmm4rec.kernels.fourier_ref import fourier_filter_ref

    rows = []
    for L in [int(v) for v in args.fourier_lengths.split(",")]:
        d_t, d_v, cls = fourier_inputs(args.batch, args.heads, L, 0, device, dtype)
        leaves = [t.requires_grad_(True) for t in (d_t, d_v, *(w for cl in cls for w in cl))]
        g = torch.randn_like(d_t)

        def fwd_bwd(f, leaves=leaves, g=g):
            def run():
                f(leaves[0], leaves[1], leaves[2:6], leaves[6:10], leaves[10:14]).backward(g)
            return run

        row = {"L": L,
               "ours_ms": bench_ms(fwd_bwd(fourier_filter_triton), device, grad_to_none=leaves),
               "torch_fft_ms": bench_ms(fwd_bwd(fourier_filter_ref), device, grad_to_none=leaves)}
        nbytes, flops = fourier_cost(args.batch * args.heads, L, torch.finfo(dtype).bits // 8)
        row["GBps"] = nbytes / row["ours_ms"] / 1e6
        row["TFLOPs"] = flops / row["ours_ms"] / 1e9
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report
_NOT_RUN = object()


def _fmt_ms(v):
    return "     n/a" if v is _NOT_RUN else "     OOM" if v is None else f"{v:8.3f}"


def _ratio(base, ours):
    return "     " if base is None or base is _NOT_RUN else f"{base / ours:5.2f}x"


def report(ssd, fourier, ceilings, meta):
    copy = ceilings["copy_GBps"]
    mm_key = next(k for k in ceilings if k.startswith("matmul_"))
    mm = ceilings[mm_key]
    print(f"\n{meta['device']} | {meta['dtype']} | torch {meta['torch']} | triton {meta['triton']}"
          f" | mamba_ssm {meta['mamba_ssm'] or 'not installed'}")
    print("ceilings: copy " + f"{copy:,.0f} GB/s; " +
          "; ".join(f"{k[7:-7]} matmul {v:,.1f} TFLOP/s" for k, v in ceilings.items()
                    if k.startswith("matmul_")))
    print(f"\nSSD forward+backward  (batch {meta['batch']}, {meta['heads']} heads of "
          f"{meta['head_dim']}, state {meta['state']}, {meta['groups']} groups, chunk {meta['chunk']})")
    print("     L |  ours ms | chunked ms (x) | quadratic ms (x) |  mamba ms (x) |"
          "  GB/s (% copy) | TFLOP/s (% mm)")
    for r in ssd:
        o = r["ours_ms"]
        print(f"{r['L']:6d} | {o:8.3f} | {_fmt_ms(r.get('torch_chunked_ms', _NOT_RUN))} "
              f"{_ratio(r.get('torch_chunked_ms', _NOT_RUN), o)} | {_fmt_ms(r.get('torch_quadratic_ms', _NOT_RUN))}"
              f"   {_ratio(r.get('torch_quadratic_ms', _NOT_RUN), o)} | {_fmt_ms(r.get('mamba_ms', _NOT_RUN))} "
              f"{_ratio(r.get('mamba_ms', _NOT_RUN), o)} | {r['GBps']:6.0f} ({100 * r['GBps'] / copy:4.1f}%) |"
              f" {r['TFLOPs']:6.1f} ({100 * r['TFLOPs'] / mm:4.1f}%)")
    print(f"\nFourier filter forward+backward  (batch {meta['batch']}, {meta['heads']} heads)")
    print("     L | fused ms | torch.fft ms (x) |  GB/s (% copy) | TFLOP/s (% mm)")
    for r in fourier:
        o = r["ours_ms"]
        print(f"{r['L']:6d} | {o:8.3f} | {r['torch_fft_ms']:8.3f}   {_ratio(r['torch_fft_ms'], o)} |"
              f" {r['GBps']:6.0f} ({100 * r['GBps'] / copy:4.1f}%) |"
              f" {r['TFLOPs']:6.1f} ({100 * r['TFLOPs'] / mm:4.1f}%)")
    print("\n(x) = baseline time / our time; > 1 means ours is faster. Goals: SSD >= 1x mamba,"
          " fused filter >= 3x torch.fft.")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
        args.batch, args.lengths, args.fourier_lengths = 2, "40", "20"
        args.heads, args.head_dim, args.state, args.groups, args.chunk = 2, 16, 16, 1, 16
        args.dtype = "fp32"                        # the interpreter gets bf16 wrong
    import torch

    if not args.interpret_smoke and not torch.cuda.is_available():
        print("python -m benchmarks.kernels needs a CUDA GPU and found none (torch.cuda.is_available() "
              "is False): nothing was timed.\nOn CPU, `--interpret-smoke` runs one tiny shape "
              "through Triton's interpreter to check this script's code path.")
        return 0
    import triton

    device = "cpu" if args.interpret_smoke else "cuda"
    dtype = getattr(torch, DTYPES[args.dtype])
    from benchmarks.kernel_checks import load_mamba_chunk_scan_combined

    mamba, mamba_version = load_mamba_chunk_scan_combined()
    if mamba is None:
        print(f"[kernels] no mamba column: {mamba_version}")
        mamba_version = None
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke)",
            "dtype": args.dtype, "torch": torch.__version__, "triton": triton.__version__,
            "mamba_ssm": mamba_version, "batch": args.batch, "heads": args.heads,
            "head_dim": args.head_dim, "state": args.state, "groups": args.groups,
            "chunk": args.chunk}
    torch.manual_seed(0)
    ceilings = measure_ceilings(torch, device, dtype)
    ssd = ssd_rows(torch, args, device, dtype, ceilings, mamba)
    fourier = fourier_rows(torch, args, device, dtype, ceilings)
    report(ssd, fourier, ceilings, meta)
    if args.interpret_smoke:
        # the smoke run also checks the numbers the timed code computed
        import benchmarks.kernel_checks as testing

        errs = testing.check_ssd(testing.SSDShape(2, 40, 2, 16, 1, 16), 16, 0, "cpu")
        errs_f = testing.check_fourier(2, 2, 20, 0, "cpu")
        worst = max(max(errs.values()), max(errs_f.values()))
        print(f"\ninterpreter smoke: code path OK; worst relative error vs the float64 "
              f"references {worst:.1e}")
        if worst > 1e-4:
            return 1
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "ceilings": ceilings, "ssd": ssd,
                                         "fourier": fourier}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
