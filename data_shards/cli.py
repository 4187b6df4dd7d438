"""``mmm4rec data ...``: build and inspect shard sets.

``register(subparsers)`` adds the ``data`` command group to the main CLI; this module
also runs on its own: ``python -m data_shards.cli data build --help``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .errors import DataError

__all__ = ["main", "register"]

_EPILOG = """\
examples:
  mmm4rec data build --format unisrec --input ../shared/data/unisrec_scientific --out shards/scientific
  mmm4rec data build --format unisrec --input data/samples/scientific_mm \\
      --image-features data/samples/scientific_mm/Scientific.feat3CLS,dim=512 --out s3://bucket/sci_mm
  mmm4rec data build --format lcrec --input data/samples/office --domain office \\
      --format unisrec --input data/samples/scientific_mm --domain scientific_mm --out shards/mix
  mmm4rec data build --format amazon2018 --input Industrial_and_Scientific.csv \\
      --meta meta_Industrial_and_Scientific.json.gz --out shards/sci2018
  mmm4rec data build --format recbole --input ../shared/data/seqrec_benchmark/amazon2014-beauty \\
      --format recbole --input ../shared/data/seqrec_benchmark/amazon2014-toy \\
      --max-users 2000 --sample-seed 0 --out shards/pretrain-mix    # 2,000 users drawn per domain

S3: endpoint and credentials from --endpoint-url or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY. Several --format/--input pairs build one multi-domain mix
(ids prefixed with the domain); per-source options (--name, --domain, --meta,
--image-features, --text-features) are given once per source, in the same order,
'-' meaning none.
"""


def _default_cache() -> str:
    from mmm4rec.paths import text_cache_dir

    return str(text_cache_dir())


def _feature_spec(spec: str):
    """``PATH[,dim=N][,ids=FILE][,format=F][,key=K][,encoder=NAME]`` -> FeatureFile (or None for '-')."""
    from .features import FeatureFile

    if spec == "-":
        return None
    path, *opts = spec.split(",")
    kw: dict[str, Any] = {}
    for o in opts:
        k, sep, v = o.partition("=")
        if not sep or k not in ("dim", "ids", "format", "key", "encoder"):
            raise argparse.ArgumentTypeError(f"feature option {o!r}: expected dim=, ids=, format=, key= or encoder=")
        kw[k] = int(v) if k == "dim" else v
    return FeatureFile(path, **kw)


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _users(value: str) -> int | str:
    """One ``--max-users`` value: a count >= 1, or '-' (all users)."""
    return value if value == "-" else _positive_int(value)


def _max_users(values, n: int) -> list:
    """``--max-users``: none, once for every source, or once per source ('-' = all users)."""
    values = values or []
    if len(values) not in (0, 1, n):
        raise DataError("--max-users", f"given {len(values)} times for {n} source(s); give it once (every "
                        "source) or once per source ('-' = all users)")
    return _per_source(values * n if len(values) == 1 else values, n, "--max-users")


def _per_source(values, n: int, flag: str):
    if not values:
        return [None] * n
    if len(values) != n:
        raise DataError(flag, f"given {len(values)} times for {n} source(s); give it once per source ('-' = none)")
    return [None if v == "-" else v for v in values]


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if isinstance(c, int) else str(c).ljust(w)
                               for c, w in zip(r, widths))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary(manifest: dict, url: str) -> str:
    """The human-readable summary of a shard set (printed by ``build`` and ``inspect``)."""
    m = manifest
    seq_bytes = sum(s["bytes"] for s in m["sequences"]["shards"])
    item_bytes = sum(s["bytes"] for s in m["items"]["shards"])
    out = [f"{url}  ({m['name']}, schema {m['schema_version']}, time source: {m['time_source']})", ""]
    out.append(_table([(s, m["splits"][s]["users"], m["splits"][s]["samples"]) for s in ("train", "valid", "test")],
                      ("split", "users", "samples")))
    out.append("")
    out.append(_table([(k, f["dim"], f["present"], f["encoder"] or "-") for k, f in m["features"].items()],
                      ("feature", "dim", "items with it", "encoder")))
    out.append("")
    ds = m["dataset"]
    out.append(_table([("before filtering", ds["counts_raw"]["users"], ds["counts_raw"]["items"],
                        ds["counts_raw"]["interactions"]),
                       (f"after {ds['k_core']}-core", m["num_users"], m["num_items"], m["num_interactions"])],
                      ("", "users", "items", "interactions")))
    samples = [(d.get("name", m["name"]), d["sample"]) for d in [ds, *(ds.get("domains") or [])] if d.get("sample")]
    for dom, smp in samples:
        out.append(f"{dom}: users sampled: {min(smp['max_users'], smp['users_before'])} of {smp['users_before']} "
                   f"(seed {smp['seed']}), before the k-core filter")
    out.append("")
    out.append(_table([("sequences", len(m["sequences"]["shards"]), seq_bytes),
                       ("items", len(m["items"]["shards"]), item_bytes)], ("shards", "files", "bytes")))
    bad = ds.get("bad_records")
    for d in ds.get("domains") or []:
        if d.get("bad_records"):
            bad = bad or {"skipped": 0, "by_reason": {}, "examples": []}
            bad = {"skipped": bad["skipped"] + d["bad_records"]["skipped"],
                   "by_reason": {**bad["by_reason"], **d["bad_records"]["by_reason"]},
                   "examples": bad["examples"] + d["bad_records"]["examples"]}
    if bad and bad["skipped"]:
        out += ["", f"skipped {bad['skipped']} bad record(s): "
                + ", ".join(f"{n} {why}" for why, n in bad["by_reason"].items())]
        out += [f"  {e['where']}: {e['why']}" for e in bad["examples"]]
    return "\n".join(out)


def _build(args) -> int:
    from . import build_shards, combine_domains, import_dataset
    from .features import TextEncoder

    n = len(args.format)
    if len(args.input) != n:
        raise SystemExit(f"--format given {n} times but --input {len(args.input)} times; pair them")
    names, domains, metas = (_per_source(v, n, f) for v, f in
                             ((args.name, "--name"), (args.domain, "--domain"), (args.meta, "--meta")))
    images = [_feature_spec(s) for s in args.image_features] if args.image_features else [None] * n
    texts = [_feature_spec(s) for s in args.text_features] if args.text_features else [None] * n
    _per_source(images, n, "--image-features")
    max_users = _max_users(args.max_users, n)
    _per_source(texts, n, "--text-features")
    encoder = None
    if args.text_encoder.lower() != "none":
        encoder = TextEncoder(args.text_encoder, batch_size=args.encode_batch_size, device=args.device,
                              cache_dir=args.text_cache)
    t0 = time.perf_counter()
    datasets = [
        import_dataset(fmt, path, name=name, domain=domain, meta=meta, k_core=args.k_core, skip_bad=args.skip_bad,
                       text_encoder=encoder if tf is None else None, text_features=tf, image_features=imf,
                       max_users=mu, sample_seed=args.sample_seed)
        for fmt, path, name, domain, meta, tf, imf, mu in zip(args.format, args.input, names, domains, metas, texts,
                                                              images, max_users)
    ]
    data = datasets[0] if n == 1 else combine_domains(datasets)
    storage = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    manifest = build_shards(data, args.out, shard_size=args.shard_size, items_per_shard=args.items_per_shard,
                            seed=args.seed, storage_options=storage)
    print(summary(manifest, args.out))
    print(f"\nbuilt in {time.perf_counter() - t0:.1f} s")
    return 0


def _synth(args) -> int:
    from .synthetic import build_synthetic

    t0 = time.perf_counter()
    storage = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    try:
        manifest = build_synthetic(args.out, args.items, args.users, text_dim=args.text_dim, min_len=args.min_len,
                                   max_len=args.max_len, skew=args.skew, seed=args.seed,
                                   feature_dtype=args.feature_dtype, shard_size=args.shard_size,
                                   items_per_shard=args.items_per_shard, storage_options=storage)
    except ValueError as e:
        raise DataError(f"mmm4rec data synth: {e}") from None
    print(summary(manifest, args.out))
    print(f"\nbuilt in {time.perf_counter() - t0:.1f} s")
    return 0


def _inspect(args) -> int:
    from . import load_item_rows, read_manifest
    from .shards import Store, decode_sequence, read_shard_records

    storage = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    manifest = read_manifest(args.url, storage)
    print(summary(manifest, args.url))
    if args.verify:
        store = Store(args.url, storage)
        for entry in manifest["sequences"]["shards"]:
            where = store.display(entry["path"])
            for rec in read_shard_records(store, entry, verify=True):
                decode_sequence(rec, where, int(manifest["num_items"]))   # ids in 1..num_items
        n, block = int(manifest["num_items"]), 1 << 20                  # finite features, a block of rows at a
        for lo in range(0, n + 1, block):                                 # time (any catalog size)
            load_item_rows(args.url, lo, min(n + 1, lo + block), storage, verify=True, manifest=manifest)
        print(f"\nverified {len(manifest['sequences']['shards']) + len(manifest['items']['shards'])} shards "
              "against the manifest checksums; every item id is in 1..num_items, every feature finite")
    return 0


def register(subparsers) -> None:
    """Add ``data build``, ``data synth`` and ``data inspect`` to ``subparsers`` (dispatch: ``args.func(args)``)."""
    from .formats import FORMATS

    data = subparsers.add_parser("data", help="build and inspect WebDataset shard sets",
                                 description="Build and inspect WebDataset shard sets (see docs/data.md).")
    sub = data.add_subparsers(dest="data_command", required=True)

    b = sub.add_parser("build", help="import a dataset and write its shards + manifest",
                       description="Import one dataset (or several, as a multi-domain mix), encode the item text "
                                   "offline, and write WebDataset shards + manifest.json to a local path or s3:// URL.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--format", action="append", required=True, choices=sorted(FORMATS),
                   help="source format (repeat with --input for a multi-domain mix)")
    b.add_argument("--input", action="append", required=True,
                   help="source directory (amazon2018: the ratings CSV)")
    b.add_argument("--out", required=True, help="output URL: a local path or s3://bucket/prefix")
    b.add_argument("--name", action="append", help="dataset file prefix <name> (default: found in --input)")
    b.add_argument("--domain", action="append", help="domain label (default: the name)")
    b.add_argument("--meta", action="append", help="amazon2018: the meta_<Category>.json.gz file")
    b.add_argument("--k-core", type=int, default=5, help="iterative k-core threshold (default 5; 0 = none)")
    b.add_argument("--max-users", action="append", metavar="N", type=_users,
                   help="keep a uniform random sample of N users of a source (per domain in a mix), drawn before "
                        "the k-core filter (use --k-core 0 to keep every interaction of the drawn users); recorded "
                        "in the manifest. Once: every source; else once per source, '-' = all (default: all users)")
    b.add_argument("--sample-seed", type=int, default=0, help="seed of the --max-users sample (default 0)")
    b.add_argument("--text-encoder", default="all-MiniLM-L6-v2",
                   help="sentence-transformers model (bundled all-MiniLM-L6-v2 or a local directory), or 'none'")
    b.add_argument("--text-cache", default=_default_cache(), help="text-vector cache directory (default: %(default)s)")
    b.add_argument("--encode-batch-size", type=int, default=64)
    b.add_argument("--device", default="cpu", help="device for the text encoder")
    b.add_argument("--text-features", action="append",
                   help="pre-computed text features instead of the encoder: PATH[,dim=N][,ids=FILE][,format=F][,key=K]"
                        "[,encoder=NAME]")
    b.add_argument("--image-features", action="append",
                   help="pre-computed image features: PATH[,dim=N][,ids=FILE][,format=raw|npy|safetensors|pt][,key=K]"
                        "[,encoder=NAME] (encoder: the model that made them, recorded in the manifest)")
    b.add_argument("--shard-size", type=int, default=1000, help="users per sequence shard (default %(default)s)")
    b.add_argument("--items-per-shard", type=int, default=20000, help="items per item-table shard")
    b.add_argument("--seed", type=int, default=0, help="seed of the user-to-shard assignment")
    b.add_argument("--skip-bad", action="store_true",
                   help="skip bad records (reported: how many, where, why) instead of stopping at the first")
    b.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    b.set_defaults(func=_build)

    y = sub.add_parser("synth", help="write a synthetic shard set of any catalog size (item shards streamed)",
                       description="Write a synthetic shard set: random text features (every item, no image) and "
                                   "seeded user sequences skewed towards popular (low) ids. The item shards are "
                                   "generated and written one at a time, so a 10^7-item catalog needs one shard's "
                                   "memory. For scale tests: the data carry no signal beyond popularity.",
                       epilog="example:\n  mmm4rec data synth --items 10000000 --users 2000 --text-dim 384 "
                              "--out runs/catalog1e7/shards", formatter_class=argparse.RawDescriptionHelpFormatter)
    y.add_argument("--out", required=True, help="output URL: a local path or s3://bucket/prefix")
    y.add_argument("--items", type=_positive_int, required=True, help="catalog size |I|")
    y.add_argument("--users", type=_positive_int, required=True, help="number of user sequences")
    y.add_argument("--text-dim", type=_positive_int, default=384, help="text feature width (default %(default)s)")
    y.add_argument("--min-len", type=int, default=5, help="shortest sequence (>= 2; default %(default)s)")
    y.add_argument("--max-len", type=int, default=20, help="longest sequence (default %(default)s)")
    y.add_argument("--skew", type=float, default=1.0,
                   help="popularity skew: item = 1 + floor(|I| * U^(1 + skew)); 0 = uniform (default %(default)s)")
    y.add_argument("--seed", type=int, default=0, help="seed of features, sequences and shard order")
    y.add_argument("--feature-dtype", choices=["float16", "float32"], default="float16",
                   help="stored feature type (default %(default)s: half the disk and start-up reads)")
    y.add_argument("--shard-size", type=int, default=1000, help="users per sequence shard (default %(default)s)")
    y.add_argument("--items-per-shard", type=int, default=20000, help="items per item-table shard")
    y.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    y.set_defaults(func=_synth)

    i = sub.add_parser("inspect", help="print a shard set's summary (and verify its checksums)")
    i.add_argument("url", help="shard set URL")
    i.add_argument("--verify", action="store_true", help="read every shard and check its sha256")
    i.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    i.set_defaults(func=_inspect)


def main(argv: list[str] | None = None) -> int:
    """``python -m data_shards.cli``: the ``mmm4rec data`` commands alone (the error policy
    of ``mmm4rec.errors``)."""
    from mmm4rec.errors import add_traceback_flag, run_command
    from mmm4rec.log import setup_logging

    parser = argparse.ArgumentParser(prog="mmm4rec")
    register(parser.add_subparsers(dest="command", required=True))
    add_traceback_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(f"mmm4rec {args.command}", lambda: args.func(args), args.traceback)


if __name__ == "__main__":
    sys.exit(main())
