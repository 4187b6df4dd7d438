#!/usr/bin/env python
"""Catalog scale: per-rank peak memory and step time of the three training paths, and
the sharded evaluation's throughput, for synthetic catalogs, 1 and 2 processes (gloo),
ratios printed against the 1-process run of the same size in the same run.

Paths (one training step = item tower + loss + backward, MMM4Rec's real item tower:
text adapter, normalisation, fusion, temperature; users are a linear layer of random
inputs, the same for every path, so the numbers isolate the catalog's cost):

* ``allitems`` -- what ``dist/`` did before the vocab-parallel softmax: every rank
  holds its shard of the feature table, receives ALL rows (the torchrec lookup of
  every item: made outside the timed step here, so its communication is not timed),
  encodes them all and takes the full softmax;
* ``vocab``    -- the vocab-parallel full softmax (``mmm4rec.catalog``): each rank
  encodes only its own rows, the softmax is completed across ranks;
* ``sampled``  -- sampled softmax: in-batch targets + ``--negatives`` uniform negatives
  with the log-Q correction; their rows come from the owning ranks (an all-reduce of
  the looked-up rows stands in for torchrec's all-to-all).

``eval users/s``: every rank encodes its own items once, then ranks ``--eval-users``
users per rank against all items (``sharded_target_ranks``).

    python -m benchmarks.catalog --items 100000 1000000 --procs 1 2 [--markdown out.md]

Memory is the peak resident set of each process over its training steps minus its
resident set after start-up (imports, process group), the largest over the ranks (the
table's shard is part of it); features are stored in
``--feature-dtype`` (16 bit by default, as ``tables.feature_dtype: fp16``).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import socket
import sys
import time
import traceback
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

import torch

PATHS = ("allitems", "vocab", "sampled")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _features(lo: int, hi: int, dim: int, dtype: torch.dtype, block: int = 65536) -> torch.Tensor:
    """Rows lo..hi-1 of the synthetic catalog's features (``data_shards.synthetic``: a row
    is the same whatever range a process asks for; row 0 the padding), made a block at a
    time in ``dtype``."""
    from data_shards.synthetic import synthetic_text

    out = torch.zeros(hi - lo, dim, dtype=dtype)
    for a in range(max(lo, 1), hi, block):
        z = min(hi, a + block)
        out[a - lo:z - lo] = torch.from_numpy(synthetic_text(a, z, dim, seed=1000))
    return out


def _tower(args):
    from mmm4rec.models.configs import MMM4RecConfig
    from mmm4rec.models.mmm4rec import MMM4RecDense

    torch.manual_seed(0)
    cfg = MMM4RecConfig(num_items=args.num_items, hidden_size=args.hidden, text_dim=args.text_dim, image_dim=4,
                        num_layers=1, inner_size=2 * args.hidden, head_dim=args.hidden, n_groups=1,
                        d_state=16, max_len=8, chunk_size=8)
    return MMM4RecDense(cfg)


def _encode(dense, feats: torch.Tensor, chunk: int) -> torch.Tensor:
    """Item vectors of feature rows (fp32 compute), chunk by chunk."""
    parts = []
    for a in range(0, feats.shape[0], chunk):
        f = feats[a:a + chunk].float()
        rows = {"text": f, "image": torch.zeros(f.shape[0], 4),
                "modality_mask": torch.tensor([[1.0, 0.0]]).expand(f.shape[0], 2)}
        parts.append(dense.item_vectors(rows))
    return torch.cat(parts) if parts else torch.zeros(0, dense.cfg.hidden_size)


def _worker(rank: int, ws: int, port: int, args, q) -> None:
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    tdist.init_process_group("gloo", rank=rank, world_size=ws)
    try:
        q.put((rank, _measure(rank, ws, args)))
    except Exception:  # noqa: BLE001 -- reported by the parent
        q.put((rank, "ERROR " + traceback.format_exc()))
    finally:
        tdist.destroy_process_group()


def _measure(rank: int, ws: int, args) -> dict:
    import torch.distributed as tdist

    from mmm4rec import catalog, losses

    n_rows = args.num_items + 1
    dtype = torch.float16 if args.feature_dtype == "fp16" else torch.float32
    dense = _tower(args)
    user = torch.nn.Linear(32, args.hidden)
    base = _rss_mb()
    lo, hi = catalog.even_ranges(n_rows, ws)[rank]
    feats = _features(lo, hi, args.text_dim, dtype)            # this rank's shard of the table
    g = torch.Generator().manual_seed(7 + rank)
    times = []
    for step in range(args.steps + 1):
        x = torch.randn(args.batch, 32, generator=g)
        target = torch.randint(1, n_rows, (args.batch,), generator=g)
        everything = None
        if args.path == "allitems":   # the looked-up rows of every item (fp32) on every rank: made untimed
            everything = _features(0, n_rows, args.text_dim, torch.float32)
        tdist.barrier()
        t0 = time.perf_counter()
        u = user(x)
        if args.path == "allitems":
            V = _encode(dense, everything, args.chunk)
            loss = losses.full_softmax_ce(u, V, target)
        elif args.path == "vocab":
            V = _encode(dense, feats, args.chunk)
            ce = catalog.vocab_parallel_ce(u, V, lo, target, chunk_size=args.chunk)
            loss = ce.sum() / (args.batch * ws) * ws
        else:
            neg = torch.randint(1, n_rows, (args.negatives,), generator=torch.Generator().manual_seed(step))
            ids = torch.cat([target, neg])
            rows = torch.zeros(len(ids), args.text_dim)
            mine = (ids >= lo) & (ids < hi)
            rows[mine] = feats[ids[mine] - lo].float()
            if ws > 1:
                tdist.all_reduce(rows)   # stands in for the all-to-all of a torchrec lookup
            V = _encode(dense, rows, args.chunk)
            lq = torch.log(torch.full((args.negatives,), args.negatives / args.num_items))
            ce = catalog.sampled_softmax_ce(u, V[:args.batch], target, neg_ids=neg, V_neg=V[args.batch:],
                                            neg_log_q=lq)
            loss = ce.mean()
        loss.backward()
        tdist.barrier()
        times.append(time.perf_counter() - t0)
        dense.zero_grad(set_to_none=True)
        user.zero_grad(set_to_none=True)
        del u, V, loss, everything
    out = {"step_s": sum(times[1:]) / max(1, len(times) - 1), "peak_mb": _peak_mb() - base}   # training only
    if args.path == "vocab" and args.eval_users:
        with torch.no_grad():
            tdist.barrier()
            t0 = time.perf_counter()
            V = _encode(dense, feats, args.chunk)
            done = 0
            while done < args.eval_users:
                b = min(args.batch * 4, args.eval_users - done)
                u = user(torch.randn(b, 32, generator=g))
                t = torch.randint(1, n_rows, (b,), generator=g)
                catalog.sharded_target_ranks(u, V, lo, t, chunk_size=args.chunk)
                done += b
            tdist.barrier()
            out["eval_users_s"] = args.eval_users * ws / (time.perf_counter() - t0)
    return out


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return float("inf")


def estimate_gb(args, items: int, ws: int, path: str) -> float:
    """Rough memory of a row (all ranks): the table shards, and per path the rows and
    activations a rank keeps for backward (about 8 [n, hidden] fp32 tensors)."""
    d, n_h = args.text_dim, args.hidden
    s = 2 if args.feature_dtype == "fp16" else 4
    per_rank = items / ws * d * s
    if path == "allitems":
        per_rank += items * (2 * d * 4 + 8 * n_h * 4)
    elif path == "vocab":
        per_rank += items / ws * (d * 4 + 8 * n_h * 4)
    return ws * (per_rank / 2 ** 30 + 0.5)


def run(args, items: int, ws: int, path: str) -> dict:
    import torch.multiprocessing as mp

    a = argparse.Namespace(**{**vars(args), "num_items": items, "path": path})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, ws, port, a, q)) for r in range(ws)]
    for p in procs:
        p.start()
    res = {}
    for _ in range(ws):
        try:
            r, v = q.get(timeout=args.timeout)
        except Exception:  # noqa: BLE001 -- a process died (out of memory): the row says so
            break
        res[r] = v
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(res) < ws or any(isinstance(v, str) for v in res.values()):
        errs = [v for v in res.values() if isinstance(v, str)]
        return {"error": (errs[0].splitlines()[-1] if errs else "a process died (exit codes "
                          f"{[p.exitcode for p in procs]})")}
    return {"step_s": max(v["step_s"] for v in res.values()), "peak_mb": max(v["peak_mb"] for v in res.values()),
            "eval_users_s": res[0].get("eval_users_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--text-dim", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="users per rank and step")
    ap.add_argument("--negatives", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=65536, help="items encoded / scored per chunk")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--eval-users", type=int, default=1024, help="users per rank in the evaluation timing")
    ap.add_argument("--feature-dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--max-allitems", type=int, default=1_000_000, help="largest catalog for the allitems path")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--memory-fraction", type=float, default=0.7,
                    help="skip a row whose estimated memory exceeds this fraction of the available memory")
    ap.add_argument("--markdown", help="also write the table to this file")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    head = (f"catalog benchmark, {platform.node() or 'host'}: {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"load {load:.1f}; text {args.text_dim} ({args.feature_dtype}), hidden {args.hidden}, batch "
            f"{args.batch}/rank, {args.negatives} negatives")
    print(head, flush=True)
    lines = ["| items | procs | path | peak MB/rank | x 1 proc | step s | x 10^5 | eval users/s |",
             "|---|---|---|---|---|---|---|---|"]
    results = {}
    for items in args.items:
        for ws in args.procs:
            for path in args.paths:
                need, have = estimate_gb(args, items, ws, path), _available_gb()
                if path == "allitems" and items > args.max_allitems:
                    r = {"error": f"not run (> --max-allitems {args.max_allitems}: does not fit)"}
                elif need > args.memory_fraction * have:
                    r = {"error": f"not run: needs ~{need:.1f} GB, {have:.1f} GB available (machine shared)"}
                else:
                    r = run(args, items, ws, path)
                results[items, ws, path] = r
                if "error" in r:
                    row = f"| {items:,} | {ws} | {path} | - | - | - | - | {r['error']} |"
                else:
                    one = results.get((items, 1, path), {})
                    first = results.get((min(args.items), ws, path), {})
                    mem_x = f"{r['peak_mb'] / one['peak_mb']:.2f}" if one.get("peak_mb") else "-"
                    t_x = f"{r['step_s'] / first['step_s']:.2f}" if first.get("step_s") else "-"
                    ev = f"{r['eval_users_s']:,.0f}" if r.get("eval_users_s") else ""
                    row = (f"| {items:,} | {ws} | {path} | {r['peak_mb']:,.0f} | {mem_x} | {r['step_s']:.3f} | "
                           f"{t_x} | {ev} |")
                lines.append(row)
                print(row, flush=True)
    buf = io.StringIO()
    buf.write(head + "\n\n" + "\n".join(lines) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(buf.getvalue())
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
