#!/usr/bin/env python
"""Serving throughput: user tower + FAISS index at 10^5 and 10^6 items, exact vs approximate.

Everything is measured in the same run, so the ratios are what to read:

1. ``Retrieval.recommend`` end to end (JSON-like histories -> gathered rows -> the exported
   user tower (torch.export) -> index search -> top-10 ids), queries/s, for the exact
   (``IndexFlatIP``) and the approximate (``IndexIVFFlat``, the export's default nlist/nprobe)
   index; approx / exact is the speed-up;
2. the user tower alone (the ceiling any index leaves);
3. recall@10 of the approximate index against the exact one, over the same queries.

Model: MMM4Rec at the paper's sizes (N=256, 1 layer) over the bundled ``scientific_mm``
sample's features (MiniLM text 384-d, CLIP image 512-d), seeded random weights, or a
trained export with ``--model``. Catalog: the sample's 1,585 real items plus synthetic items
(a real item's features plus Gaussian noise of half the features' spread), encoded by the
exported item encoder, up to 10^5 / 10^6 items. Queries: the sample's real test histories.

    python -m benchmarks.retrieval [--sizes 100000 1000000] [--queries 1024] [--batch 256]
                                   [--threads 2] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import markdown_report
from data_shards import ensure_sample_shards, expand, iter_sequences, load_item_table
from dist.serving import Retrieval, export_retrieval
from dist.serving import index as idx
from mmm4rec import MMM4Rec, MMM4RecConfig


def build_model(table, model_path: str | None):
    if model_path:
        from dist.serving.build import load_model

        return load_model(model_path, table)[0]
    torch.manual_seed(0)
    cfg = MMM4RecConfig(text_dim=table.text_dim, image_dim=table.image_dim, num_items=table.num_items)
    model = MMM4Rec(cfg)
    model.set_item_table(table)
    return model


def synthetic_vectors(ret: Retrieval, n: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """Item vectors of ``n`` synthetic items through the export's item encoder."""
    rng = np.random.default_rng(seed)
    names = ret.table_names
    real = {k: ret.features[k][1:] for k in names}
    spread = {k: real[k].std(axis=0, keepdims=True) * 0.5 for k in ("text", "image")}
    out = np.empty((n, ret.manifest['vectors']['dim']), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        pick = rng.integers(0, len(real["text"]), m)
        rows = {k: real[k][pick].copy() for k in names}
        for k in ("text", "image"):
            rows[k] += rng.standard_normal(rows[k].shape, dtype=np.float32) * spread[k]
        with torch.no_grad():
            out[s:s + m] = ret.encoder(*[torch.from_numpy(rows[k]) for k in names]).numpy()
    return out


def time_alternating(fns: dict, batches) -> dict[str, float]:
    """queries/s of each ``fns[name](batch)``, run alternately batch by batch (after one
    warm-up call each), so that a change in machine load hits every column alike."""
    for fn in fns.values():
        fn(batches[0])
    spent = dict.fromkeys(fns, 0.0)
    n = 0
    for b in batches:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(b)
            spent[name] += time.perf_counter() - t0
        n += len(b)
    return {name: n / t for name, t in spent.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="catalog sizes")
    ap.add_argument("--queries", type=int, default=1024, help="timed queries per measurement")
    ap.add_argument("--batch", type=int, default=256, help="queries per recommend() call")
    ap.add_argument("--threads", type=int, default=2, help="torch and FAISS threads")
    ap.add_argument("--model", default=None, help="a trained export/checkpoint (default: seeded random weights)")
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss = idx.faiss()
    faiss.omp_set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        url = ensure_sample_shards("scientific_mm", Path(tmp) / "shards", progress=False)
        table = load_item_table(url)
        model = build_model(table, args.model)
        ret = Retrieval.load(export_retrieval(model, table, Path(tmp) / "ret", progress=False))
        ret.tower, ret.encoder  # noqa: B018 -- load both programs before the directory goes
        seqs = list(iter_sequences(url))
    test = [s for q in seqs for s in expand(q["user"], q["items"], q["times"], "test", model.config.max_len)]
    hist = [{"items": [str(table.item_ids[i]) for i in s["history"]], "times": s["history_time"].tolist()}
            for s in test]
    hist = (hist * (1 + args.queries // len(hist)))[:args.queries]
    batches = [hist[s:s + args.batch] for s in range(0, len(hist), args.batch)]
    tower_qps = time_alternating({"tower": ret.user_vectors}, batches)["tower"]
    users = ret.user_vectors(hist)
    print(f"user tower alone: {tower_qps:,.0f} queries/s (batch {args.batch}, {args.threads} threads)", flush=True)

    base_vectors, base_ids = ret.vectors, ret.item_ids
    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        extra = synthetic_vectors(ret, n - table.num_items, seed=n)
        ret.vectors = np.concatenate([base_vectors, extra])
        ret.item_ids = base_ids + [f"synthetic-{j}" for j in range(len(extra))]
        ret.active = np.ones(len(ret.item_ids), bool)
        ret.active[0] = False
        ret._reindex()
        t_enc = time.perf_counter() - t0
        build = {}
        for kind in idx.KINDS:
            t0 = time.perf_counter()
            ret.indexes[kind] = idx.build_index(kind, ret.vectors[1:])
            build[kind] = time.perf_counter() - t0
        ivf = ret.indexes["approx"]
        print(f"{n:,} items: encoded in {t_enc:.1f}s; exact index {build['exact']:.1f}s, IVF (nlist {ivf.nlist}, "
              f"nprobe {ivf.nprobe}) {build['approx']:.1f}s", flush=True)
        qps = time_alternating({kind: lambda b, kind=kind: ret.recommend(b, k=10, index=kind)
                                for kind in idx.KINDS}, batches)
        ubatches = [users[s:s + args.batch] for s in range(0, len(users), args.batch)]
        index_qps = time_alternating({kind: lambda u, kind=kind: ret.search_vectors(u, 10, kind)
                                      for kind in idx.KINDS}, ubatches)
        exact, _ = ret.search_vectors(users, 10, "exact")
        approx, _ = ret.search_vectors(users, 10, "approx")
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
        rows.append((n, qps["exact"], qps["approx"], index_qps["exact"], index_qps["approx"], recall, ivf.nlist,
                     ivf.nprobe))
        print(f"  tower + index: exact {qps['exact']:,.1f} q/s, approx {qps['approx']:,.1f} q/s "
              f"({qps['approx'] / qps['exact']:.2f}x); index alone: exact {index_qps['exact']:,.0f} q/s, "
              f"approx {index_qps['approx']:,.0f} q/s ({index_qps['approx'] / index_qps['exact']:.1f}x); "
              f"recall@10 {recall:.3f}", flush=True)
        for kind in idx.KINDS:
            ret.indexes[kind] = None
        ret.vectors = None

    intro = [f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
             f"faiss {faiss.__version__}; MMM4Rec N={model.config.hidden_size}, batches of {args.batch} queries, "
             f"top-10; user tower alone: {tower_qps:,.0f} queries/s"]
    header = ["items", "tower + exact q/s", "tower + approx q/s", "approx / exact", "exact index alone q/s",
              "approx index alone q/s", "approx / exact", "recall@10 of approx", "nlist / nprobe"]
    table = [[f"{n:,}", f"{qe:,.1f}", f"{qa:,.1f}", f"{qa / qe:.2f}x", f"{ie:,.0f}", f"{ia:,.0f}", f"{ia / ie:.1f}x",
              f"{rec:.3f}", f"{nl} / {npb}"] for n, qe, qa, ie, ia, rec, nl, npb in rows]
    markdown_report("".join(intro), header, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
