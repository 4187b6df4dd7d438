#!/usr/bin/env python
"""Loader throughput from local disk and from a local S3 server, against training.

Everything is measured in the same run, so the ratios are what to read:

1. ``SequenceLoader`` samples/s (real, weight-1 rows; worker start-up included, whole
   epochs) reading the same shard set from local disk and from moto's S3 server on
   127.0.0.1, for 0 and 2 loader workers: S3 / local.
2. MMM4Rec's training consumption at the paper's sizes (N=256, 1 layer, 512-d CLIP
   text and image features, full-softmax CE, forward + backward + Adam step) in
   samples/s: loader / training says whether the loader can slow training down.

Data: the bundled ``scientific_mm`` sample (2,928 users, 10,928 train samples per
epoch), or with ``--dataset unisrec_scientific`` the full Scientific set from
``$MMM4REC_SHARED_DATA`` (34,101 train samples per epoch).

    python -m benchmarks.data_loader [--epochs 3] [--batch-size 256] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a file, benchmarks/ would lead sys.path and shadow installed modules (__init__.py)
    sys.exit(print(f"run it as a module from the repository root: python -m benchmarks.{Path(__file__).stem} ...",
                   file=sys.stderr) or 2)

import torch

REPO = Path(__file__).resolve().parents[1]
from data_shards import FeatureFile, SequenceLoader, build_shards, import_dataset
from scripts.s3_server import moto_binary, moto_server


def load_data(name: str):
    if name == "scientific_mm":
        d = REPO / "data" / "samples" / "scientific_mm"
        feats = d
    else:
        shared = Path(os.environ.get("MMM4REC_SHARED_DATA", REPO.parent / "shared" / "data"))
        d, feats = shared / "unisrec_scientific", shared / "missrec_scientific_mm_subset"
        if not d.is_dir():
            sys.exit(f"{d} not found (set MMM4REC_SHARED_DATA)")
    ids = str(feats / "Scientific.item2index")
    return import_dataset(
        "unisrec", d, text_features=FeatureFile(str(feats / "Scientific.feat1CLS"), dim=512, ids=ids),
        image_features=FeatureFile(str(feats / "Scientific.feat3CLS"), dim=512, ids=ids))


def loader_rate(url: str, workers: int, args, storage_options=None) -> tuple[float, int]:
    """(samples/s, samples) over ``args.epochs`` whole epochs."""
    loader = SequenceLoader(url, "train", batch_size=args.batch_size, max_len=args.max_len, num_workers=workers,
                            storage_options=storage_options, shuffle_buffer=args.shuffle_buffer)
    n = 0
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            n += int(batch["weight"].sum())
    return n / (time.perf_counter() - t0), n


def training_rate(data, url: str, args) -> float | None:
    """MMM4Rec samples/s (forward + backward + step), or None if the model is unavailable."""
    try:
        from mmm4rec import MMM4Rec, MMM4RecConfig
    except ImportError as e:
        print(f"(model not importable: {e}; training consumption not measured)")
        return None
    torch.manual_seed(0)
    model = MMM4Rec(MMM4RecConfig(text_dim=512, image_dim=512, num_items=data.num_items, max_len=args.max_len))
    model.set_item_table(data.items)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = SequenceLoader(url, "train", batch_size=args.batch_size, max_len=args.max_len, num_workers=0)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == args.train_steps + 1:
            break

    def step(batch):
        opt.zero_grad()
        model.calculate_loss(batch, "full").backward()
        opt.step()

    step(batches[0])  # warm-up
    t0 = time.perf_counter()
    n = 0
    for b in batches[1:]:
        step(b)
        n += int(b["weight"].sum())
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["scientific_mm", "unisrec_scientific"], default="scientific_mm")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--shard-size", type=int, default=250, help="users per shard")
    p.add_argument("--shuffle-buffer", type=int, default=20000)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args()

    binary = moto_binary()
    if binary is None:
        sys.exit("moto_server not found: pip install 'moto[server]'")
    data = load_data(args.dataset)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, moto_server(binary) as s3:
        local = f"{tmp}/shards"
        remote = s3.make_bucket("bench") + "/shards"
        build_shards(data, local, shard_size=args.shard_size, progress=False)
        build_shards(data, remote, shard_size=args.shard_size, storage_options=s3.storage_options, progress=False)
        for w in args.workers:
            local_rate, n = loader_rate(local, w, args)
            s3_rate, _ = loader_rate(remote, w, args, s3.storage_options)
            rows.append((w, n, local_rate, s3_rate))
        train = training_rate(data, local, args)

    header = ("| loader workers | samples | local disk (samples/s) | local S3 (samples/s) | S3 / local |"
              + (" local / training |" if train else ""))
    lines = [
        f"dataset {args.dataset}: {data.num_users} users, batch {args.batch_size}, L={args.max_len}, "
        f"{args.epochs} epochs per measurement; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}",
        "",
        header,
        "|---:|---:|---:|---:|---:|" + ("---:|" if train else ""),
    ]
    for w, n, lr, sr in rows:
        lines.append(f"| {w} | {n} | {lr:,.0f} | {sr:,.0f} | {sr / lr:.2f} |"
                     + (f" {lr / train:,.0f}x |" if train else ""))
    if train:
        lines += ["", f"MMM4Rec training consumption (N=256, 1 layer, full softmax over {data.num_items} items, "
                      f"fwd+bwd+Adam): {train:,.0f} samples/s"]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
