"""``mmm4rec retrieval export``, ``mmm4rec items add|update|remove``, ``mmm4rec recommend``.

Import-light (``mmm4rec --help`` imports every command module): torch and FAISS are
imported inside the commands. See docs/serving.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["read_histories", "register"]


def read_histories(path: str) -> list[dict]:
    """JSON lines ``{"id": any (optional), "items": [item ids], "times": [numbers] (optional)}``
    ('-' reads stdin); errors name the file, line and field."""
    from .items import read_json_lines

    return read_json_lines(path, "a history with 'items' (and 'times')")


def _retrieval_export(args) -> int:
    from .build import export_from_paths

    storage = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    out = export_from_paths(args.model, args.data, args.out, storage, nlist=args.nlist)
    m = json.loads((Path(out) / "manifest.json").read_text())
    print(f"retrieval export {out}: {m['catalog']['active_items']:,} items, {m['vectors']['dim']}-d vectors "
          f"(fp32 + fp16), indexes exact (IndexFlatIP) + approx (IVF, nlist {m['index']['approx']['nlist']}), "
          "user tower + item encoder (torch.export)")
    return 0


def _items(args) -> int:
    from .items import add_items, read_item_records, remove_items, update_items
    from .store import Retrieval

    ret = Retrieval.load(args.export)
    if args.items_command == "remove":
        ids = list(args.item_ids)
        if args.file:
            ids += [ln.strip() for ln in Path(args.file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not ids:
            from mmm4rec.config import ConfigError

            raise ConfigError("items remove: give item ids or --file")
        n = remove_items(ret, ids)
    else:
        records = read_item_records(args.items)
        n = (add_items if args.items_command == "add" else update_items)(ret, records)
    ret.save(args.export)
    verb = {"add": "added", "update": "updated", "remove": "removed"}[args.items_command]
    print(f"{verb} {n} items: {args.export} now serves {ret.num_active:,} items")
    return 0


def _recommend(args) -> int:
    from tqdm.auto import tqdm

    from .store import Retrieval

    ret = Retrieval.load(args.export)
    histories = read_histories(args.histories)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        bs = args.batch_size
        with tqdm(total=len(histories), desc="recommending", unit="user", file=sys.stderr,
                  disable=len(histories) < bs) as bar:
            for s in range(0, len(histories), bs):
                part = histories[s:s + bs]
                recs = ret.recommend(part, k=args.k, exclude_history=args.exclude_history, index=args.index,
                                     nprobe=args.nprobe)
                for h, r in zip(part, recs):
                    row = {"items": [i for i, _ in r], "scores": [round(sc, 6) for _, sc in r]}
                    if "id" in h:
                        row = {"id": h["id"], **row}
                    out.write(json.dumps(row) + "\n")
                bar.update(len(part))
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def register(subparsers) -> None:
    from dist.cli import arg, command

    p = subparsers.add_parser(
        "retrieval", help="serving artefacts: export item vectors, FAISS indexes and a self-contained user tower",
        description="Retrieval exports for serving (docs/serving.md).")
    sub = p.add_subparsers(dest="retrieval_command", metavar="COMMAND", required=True)
    command(
        sub, "export", _retrieval_export,
        help="item vectors + FAISS indexes + user tower of a model over a shard set's catalog",
        description="Encode every item of a shard set's catalog with a trained model (fusion weights and 1/temperature "
                    "folded in, so score = user vector . item vector) and write: item_vectors.safetensors (fp32 and "
                    "fp16), item_features.safetensors (the rows the user tower gathers for histories), an exact "
                    "(IndexFlatIP) and an approximate (IVF) FAISS index, the user tower and the item encoder as "
                    "torch.export programs that run with torch alone (no DeepSpeed/torchrec), and manifest.json "
                    "naming the model, the catalog and the library versions. OUT is replaced atomically.",
        arguments=[
            arg("model", metavar="MODEL",
                help="export directory (model.safetensors + config.json), checkpoint directory, or a run's "
                     "OUTPUT_DIR (its best checkpoint)"),
            arg("--data", required=True, metavar="URL", help="shard set (local path or s3://) whose items to serve"),
            arg("--out", required=True, metavar="DIR", help="output directory"),
            arg("--nlist", type=int, default=None, metavar="N",
                help="IVF cells of the approximate index (default about sqrt(items))"),
            arg("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)"),
        ])

    p = subparsers.add_parser(
        "items", help="add, update or remove items of a retrieval export (no training)",
        description="Change the catalog of a retrieval export in place (atomically). New and updated items are "
                    "encoded from their content with the export's item encoder: text with the catalog's offline text "
                    "encoder (e.g. all-MiniLM-L6-v2) or given as text_features, image features as image_features. "
                    "ITEMS is JSON lines: {\"item_id\": \"B00X\", \"text\": \"...\", \"image_features\": [...]}. "
                    "Without the ID term (use_id=false) this is exactly how the model scores items it was trained "
                    "with; with it, new items have a zero ID term.")
    sub = p.add_subparsers(dest="items_command", metavar="COMMAND", required=True)
    for name, what in (("add", "append new items"), ("update", "re-encode existing items from new content")):
        command(sub, name, _items, help=what, description=f"{what[0].upper()}{what[1:]} of a retrieval export.",
                arguments=[arg("export", metavar="EXPORT", help="retrieval export directory"),
                           arg("items", metavar="ITEMS", help="JSON lines of items")])
    command(
        sub, "remove", _items,
        help="take items out of the candidates",
        description="Remove items from the candidates of a retrieval export; histories may still "
                    "name them (their features stay for the user tower).",
        arguments=[
            arg("export", metavar="EXPORT", help="retrieval export directory"),
            arg("item_ids", nargs="*", metavar="ITEM_ID", help="original item ids"),
            arg("--file", metavar="PATH", help="file of item ids, one per line"),
        ])

    command(
        subparsers, "recommend", _recommend,
        help="top-K items for histories (JSON lines) from a retrieval export",
        description="Top-K recommendations for each history in HISTORIES: JSON lines "
                    "{\"id\": ..., \"items\": [item ids, oldest first], \"times\": [timestamps]} (without times, "
                    "positions stand in). Writes JSON lines {\"id\", \"items\", \"scores\"}. Python: "
                    "dist.serving.Retrieval.load(EXPORT).recommend(histories, k).",
        arguments=[
            arg("export", metavar="EXPORT", help="retrieval export directory"),
            arg("histories", metavar="HISTORIES", help="JSON lines of histories ('-' for stdin)"),
            arg("-k", type=int, default=10, help="items per history (default 10)"),
            arg("--exclude-history", action="store_true", help="never recommend an item of the history itself"),
            arg("--index", choices=("exact", "approx"), default="exact",
                help="exact inner product (default) or the approximate IVF index"),
            arg("--nprobe", type=int, default=None, help="IVF cells scanned per query (approx; default: "
                                                         "the export's)"),
            arg("--batch-size", type=int, default=256, help="histories per user-tower call"),
            arg("--output", metavar="PATH", help="write here instead of stdout"),
        ])
