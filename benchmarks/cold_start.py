#!/usr/bin/env python
"""Cold-start: items never seen in training, added to a retrieval export with ``items add``.

Protocol (the real Scientific split, ``unisrec_scientific``, 5-core, MiniLM text features):

1. Hold out a seeded random 10% of the items (``--holdout``). They never appear in training,
   neither as targets nor in histories.
2. Every user's last interaction is the test target (leave-one-out). Training sequences are
   the users' earlier interactions with the held-out items removed; MMM4Rec (no ID term)
   trains on every prefix of them, single process, ``--epochs`` epochs.
3. ``export_retrieval`` serves the other 90% of the catalog; ``add_items`` adds the held-out
   items from their text (the offline MiniLM encoder) with no training.
4. Users whose test target is a held-out item ("cold users"): HR@10 / NDCG@10 of the full
   ranking (all items) from ``Retrieval.recommend``, against popularity (training counts: a
   held-out item has none) and a uniformly random ranking (expected value); and the target's
   rank among the held-out items alone (model vs random). Warm users for reference.

    python -m benchmarks.cold_start [--epochs 2] [--holdout 0.1] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import math
import os
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
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]

from benchmarks.report import markdown_report
from data_shards import TextEncoder, collate, import_dataset
from data_shards.features import DEFAULT_TEXT_ENCODER
from dist.serving import Retrieval, add_items, export_retrieval
from mmm4rec import MMM4Rec, MMM4RecConfig
from mmm4rec.paths import text_cache_dir

MAX_LEN = 20
K = 10


def ndcg(rank: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank < K else 0.0


def random_expected(n: int) -> tuple[float, float]:
    """HR@K and NDCG@K of a uniformly random ranking of ``n`` candidates (expected values)."""
    return min(K, n) / n, sum(ndcg(r) for r in range(min(K, n))) / n


def metrics(ranks: list[int]) -> tuple[float, float]:
    return float(np.mean([r < K for r in ranks])), float(np.mean([ndcg(r) for r in ranks]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--holdout", type=float, default=0.1, help="fraction of items held out of training")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64, help="hidden size N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", default=None, help="also write the table here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(os.environ.get("MMM4REC_SHARED_DATA", REPO.parent / "shared" / "data"))
    src = shared / "unisrec_scientific"
    if not src.is_dir():
        sys.exit(f"{src} not found (set MMM4REC_SHARED_DATA)")
    data = import_dataset("unisrec", src, name="Scientific",
                          text_encoder=TextEncoder(DEFAULT_TEXT_ENCODER, cache_dir=text_cache_dir()))
    n_items = data.items.num_items
    table = data.items.with_features(image=np.zeros((n_items + 1, 1), np.float32),
                                     image_mask=np.zeros(n_items + 1, bool))   # text only
    rng = np.random.default_rng(args.seed)
    held = np.sort(rng.choice(np.arange(1, n_items + 1), int(round(args.holdout * n_items)), replace=False))
    is_held = np.zeros(n_items + 1, bool)
    is_held[held] = True

    train, tests, train_seqs = [], [], []
    for s in data.sequences:
        items, times = np.asarray(s.items), np.asarray(s.times)
        tests.append({"user": s.user, "history": items[:-1][-MAX_LEN:], "history_time": times[:-1][-MAX_LEN:],
                      "target": int(items[-1]), "target_time": float(times[-1])})
        keep = ~is_held[items[:-1]]
        it, tt = items[:-1][keep], times[:-1][keep]
        train_seqs.append(it)
        for t in range(1, len(it)):
            lo = max(0, t - MAX_LEN)
            train.append({"user": s.user, "history": it[lo:t], "history_time": tt[lo:t], "target": int(it[t]),
                          "target_time": float(tt[t])})
    assert not any(is_held[x["target"]] or is_held[x["history"]].any() for x in train)
    cold = [x for x in tests if is_held[x["target"]]]
    warm = [x for x in tests if not is_held[x["target"]]]
    print(f"Scientific: {len(data.sequences):,} users, {n_items:,} items, {len(held):,} held out; "
          f"{len(train):,} training samples; {len(cold):,} cold / {len(warm):,} warm test users", flush=True)

    torch.manual_seed(args.seed)
    cfg = MMM4RecConfig(hidden_size=args.hidden, inner_size=args.hidden, d_state=16, n_groups=2, head_dim=32,
                        max_len=MAX_LEN, text_dim=table.text_dim, image_dim=1, num_items=n_items,
                        dropout_prob=0.1, embedding_drop_prob=0.1, time_dropout_prob=0.1)
    model = MMM4Rec(cfg)
    model.set_item_table(table)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    warm_ids = np.flatnonzero(~is_held[1:]) + 1          # the softmax runs over these (never padding)
    warm_pos = np.full(n_items + 1, -1)
    warm_pos[warm_ids] = np.arange(len(warm_ids))
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = np.random.default_rng(epoch).permutation(len(train))
        losses = []
        for s in tqdm(range(0, len(order), 256), desc=f"epoch {epoch + 1}", unit="batch"):
            batch = collate([train[i] for i in order[s:s + 256]], MAX_LEN)
            # the full softmax over warm items only: a held-out item is never a negative either
            u, V = model(batch, torch.from_numpy(warm_ids))
            loss = torch.nn.functional.cross_entropy(u @ V.T, torch.from_numpy(warm_pos[batch["target"].numpy()]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        out = export_retrieval(model, table, Path(tmp) / "ret", rows=warm_ids)
        ret = Retrieval.load(out)
        served_before = ret.num_active
        add_items(ret, [{"item_id": str(table.item_ids[i]), "text": str(table.item_text[i])} for i in held])
        ret.save()
        ret = Retrieval.load(out)
        assert ret.num_active == n_items

        def hist(x):
            return {"items": [str(table.item_ids[i]) for i in x["history"]], "times": x["history_time"].tolist()}

        def ranks_full(group):
            out = []
            for s in range(0, len(group), 512):
                part = group[s:s + 512]
                u = ret.user_vectors([hist(x) for x in part])
                scores = u @ ret.vectors[1:].T                       # every served item
                row_ids = np.asarray(ret.item_ids[1:])
                for x, sc, in zip(part, scores):
                    tgt = np.flatnonzero(row_ids == table.item_ids[x["target"]])[0]
                    out.append(int((sc > sc[tgt]).sum()))
            return out

        ranks = {"cold": ranks_full(cold), "warm": ranks_full(warm)}
        # agreement with the index: the top-10 of recommend() holds the target iff rank < 10
        recs = ret.recommend([hist(x) for x in cold], k=K)
        hits = [str(table.item_ids[x["target"]]) in {i for i, _ in r} for x, r in zip(cold, recs)]
        assert hits == [r < K for r in ranks["cold"]], "index top-10 disagrees with the full ranking"
        # the target among the held-out items only
        held_rows = np.array([ret.active_row_of[str(table.item_ids[i])] for i in held])
        pos = {int(i): j for j, i in enumerate(held)}
        u = ret.user_vectors([hist(x) for x in cold])
        sc = u @ ret.vectors[held_rows].T
        among_new = [int((s > s[pos[x["target"]]]).sum()) for x, s in zip(cold, sc)]

    # popularity: training counts (held-out items have none: ranked after every warm item)
    counts = np.bincount(np.concatenate(train_seqs), minlength=n_items + 1)
    counts[0] = -1
    order = np.argsort(-counts[1:], kind="stable") + 1
    pop_rank = np.empty(n_items + 1, np.int64)
    pop_rank[order] = np.arange(n_items)
    pop = {g: [int(pop_rank[x["target"]]) for x in grp] for g, grp in (("cold", cold), ("warm", warm))}

    rows = []
    for g, grp in (("cold", cold), ("warm", warm)):
        rows.append((g, len(grp), "full catalog", metrics(ranks[g]), metrics(pop[g]), random_expected(n_items)))
    rows.append(("cold", len(cold), "held-out items only", metrics(among_new), None, random_expected(len(held))))
    intro = [f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.threads} threads; unisrec_scientific 5-core "
             f"({len(data.sequences):,} users, {n_items:,} items), {len(held):,} items ({args.holdout:.0%}) held "
             f"out of training and added with items add ({served_before:,} served before); MMM4Rec N={args.hidden}, "
             f"text only (MiniLM), no ID term, {args.epochs} epochs ({train_s:.0f} s)"]
    header = ["test users", "count", "ranked among", "MMM4Rec HR@10", "NDCG@10", "popularity HR@10", "NDCG@10",
              "random HR@10", "NDCG@10"]
    table = [[str(g), f"{n:,}", str(among), f"{h:.4f}", f"{nd:.4f}", *([f"{p[0]:.4f}", f"{p[1]:.4f}"] if p else
                                                                     ["n/a", "n/a"]), f"{rh:.4f}", f"{rn:.4f}"]
             for g, n, among, (h, nd), p, (rh, rn) in rows]
    markdown_report("".join(intro), header, table, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
