"""WebDataset tar shards + ``manifest.json``: writing, reading, verifying.

Layout under the output URL (paths in the manifest are relative to it, so a shard
set can be copied between disk and S3 unchanged)::

    manifest.json
    sequences/seq-00000.tar     one record per user:  <key>.json
    items/items-00000.tar       one record per block of item ids: <key>.{ids,text,text_mask,
                                image,image_mask}.npy + <key>.meta.json

A sequence record is ``{"user", "user_id", "domain", "items": [int], "times": [float]}``:
the whole time-ordered sequence; the leave-one-out split is applied by the reader.
See ``docs/data.md`` for the manifest schema.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .errors import ManifestError, ShardError
from .interactions import DatasetMeta, InteractionData, Sequences
from .items import ItemTable
from .samples import SPLITS, num_samples_array
from .storage import Store

__all__ = [
    "SCHEMA_VERSION",
    "build_shards",
    "check_finite_features",
    "check_item_ids",
    "decode_sequence",
    "iter_sequences",
    "ItemRows",
    "ItemSource",
    "load_item_rows",
    "load_item_table",
    "read_manifest",
    "read_shard_records",
    "write_shard_set",
]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- checks
def check_item_ids(items: np.ndarray, num_items: int, where: str, user=None) -> None:
    """Every id of a sequence in ``1..num_items``; the error names the record, the
    position and the id (an out-of-range id is a device assert or a wrong row on GPU)."""
    if items.size and (items.min() < 1 or items.max() > num_items):
        pos = int(np.flatnonzero((items < 1) | (items > num_items))[0])
        who = f" (user {user})" if user is not None else ""
        raise ShardError(where, f"item id {int(items[pos])} at position {pos}{who} is outside 1..{num_items} "
                                f"(num_items)")


def check_finite_features(features: np.ndarray, modality: str, where: str, ids=None, names=None) -> None:
    """Item feature rows must be finite: a NaN/inf vector makes every loss NaN. The error
    names the item (id and original id) and the feature column."""
    if features is None or not features.size:
        return
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = (int(v) for v in np.argwhere(bad)[0])
        item = int(ids[row]) if ids is not None else row
        name = f" ({names[row]!r})" if names is not None and row < len(names) and names[row] else ""
        n_bad = int(bad.any(axis=1).sum())
        raise ShardError(where, f"{modality} features of item {item}{name} are not finite ({features[row, col]} in "
                                f"column {col}); {n_bad} item(s) affected: fix or drop them before training")


def check_interaction_data(data: InteractionData) -> None:
    """What ``build_shards`` refuses to write: ids outside ``1..num_items``, NaN/inf features."""
    seqs, items = data.sequences, data.items
    n = items.num_items
    if len(seqs.items) and (seqs.items.min() < 1 or seqs.items.max() > n):
        k = int(np.flatnonzero((seqs.items < 1) | (seqs.items > n))[0])
        u = int(np.searchsorted(seqs.offsets, k, side="right") - 1)
        check_item_ids(seqs[u].items, n, f"{data.meta.name}: user {seqs.user_ids[u]!r}")
    check_finite_features(items.text, "text", f"{data.meta.name}: item table", names=items.item_ids)
    if items.image is not None:
        check_finite_features(items.image, "image", f"{data.meta.name}: item table", names=items.item_ids)


def _tar_bytes(records: list[dict[str, bytes]]) -> bytes:
    """Records (``__key__`` + extension -> bytes) as one reproducible tar (mtime 0)."""
    buf = io.BytesIO()
    writer = wds.TarWriter(buf, encoder=False, mtime=0)
    for r in records:
        writer.write(r)
    writer.close()
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _sequence_record(seqs: Sequences, u: int) -> dict[str, bytes]:
    s = seqs[u]
    rec = {"user": s.user, "user_id": s.user_id, "domain": s.domain,
           "items": s.items.tolist(), "times": s.times.tolist()}
    return {"__key__": f"u{u:09d}", "json": json.dumps(rec, separators=(",", ":")).encode()}


def _item_record(block: Mapping[str, Any], lo: int, hi: int, dtype: str = "float32") -> dict[str, bytes]:
    """Items ``lo..hi-1`` (ids, 1-based) as one record; ``block`` holds their rows
    (:func:`_table_block`); features are written as ``dtype``."""
    rec = {
        "__key__": f"i{lo:09d}",
        "ids.npy": _npy(np.arange(lo, hi, dtype=np.int64)),
        "text.npy": _npy(block["text"].astype(dtype, copy=False)),
        "text_mask.npy": _npy(block["text_mask"]),
        "image_mask.npy": _npy(block["image_mask"]),
        "meta.json": json.dumps({"item_ids": list(block["item_ids"]), "item_text": list(block["item_text"]),
                                 "domain": list(block["domain"])}, ensure_ascii=False).encode(),
    }
    if block.get("image") is not None:
        rec["image.npy"] = _npy(block["image"].astype(dtype, copy=False))
    return rec


def _table_block(items: ItemTable, lo: int, hi: int) -> dict[str, Any]:
    """Rows ``lo..hi-1`` of an in-memory :class:`ItemTable` as an item block."""
    return {"text": items.text[lo:hi], "text_mask": items.text_mask[lo:hi],
            "image": None if items.image is None else items.image[lo:hi], "image_mask": items.image_mask[lo:hi],
            "item_ids": items.item_ids[lo:hi], "item_text": items.item_text[lo:hi], "domain": items.domain[lo:hi]}


@dataclasses.dataclass(frozen=True)
class ItemSource:
    """The item table as the shard writer reads it: ``num_items`` rows (ids 1..num_items)
    of ``text_dim`` / ``image_dim`` features (``image_dim`` 0: none), handed out a range
    at a time by ``block(lo, hi)`` -> ``{"text" [hi-lo, text_dim], "text_mask" [hi-lo],
    "image" [hi-lo, image_dim] or None, "image_mask", "item_ids", "item_text", "domain"}``.
    A source need never hold the whole table (``data_shards.synthetic`` generates it)."""

    num_items: int
    text_dim: int
    image_dim: int
    block: Callable[[int, int], Mapping[str, Any]]
    text_encoder: str | None = None
    image_encoder: str | None = None

    @classmethod
    def of_table(cls, items: ItemTable) -> ItemSource:
        return cls(items.num_items, items.text_dim, items.image_dim, lambda lo, hi: _table_block(items, lo, hi),
                   items.text_encoder, items.image_encoder)


def _put(store: Store, rel: str, blob: bytes, **info) -> dict:
    store.write(rel, blob)
    return {"path": rel, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), **info}


FEATURE_DTYPES = ("float32", "float16")


def build_shards(data: InteractionData, out_url: str, shard_size: int = 1000,
                 storage_options: Mapping[str, Any] | None = None, *, items_per_shard: int = 20000,
                 seed: int = 0, shuffle_users: bool = True, extra: Mapping[str, Any] | None = None,
                 progress: bool = True, feature_dtype: str = "float32") -> dict:
    """Write ``data`` as shards + ``manifest.json`` under ``out_url`` (any fsspec URL).

    Args:
        shard_size: users per sequence shard.
        items_per_shard: items per item-table shard.
        seed / shuffle_users: users are spread over shards in a seeded random order, so
            that every shard is a sample of all users (and of all domains of a mix).
        extra: stored as ``manifest["build"]["extra"]`` (e.g. a recipe fingerprint).
        feature_dtype: ``float32`` or ``float16`` (half the item shards; the trainer's
            ``tables.feature_dtype: fp16`` keeps them in 16 bit).

    Returns:
        The manifest (also written, last, so a crashed build leaves no manifest).
    """
    check_interaction_data(data)
    return write_shard_set(data.sequences, data.meta, ItemSource.of_table(data.items), out_url, shard_size,
                           storage_options, items_per_shard=items_per_shard, seed=seed, shuffle_users=shuffle_users,
                           extra=extra, progress=progress, feature_dtype=feature_dtype)


def write_shard_set(seqs: Sequences, meta: DatasetMeta, items: ItemSource, out_url: str, shard_size: int = 1000,
                    storage_options: Mapping[str, Any] | None = None, *, items_per_shard: int = 20000,
                    seed: int = 0, shuffle_users: bool = True, extra: Mapping[str, Any] | None = None,
                    progress: bool = True, feature_dtype: str = "float32") -> dict:
    """:func:`build_shards` from sequences and an :class:`ItemSource`: the item shards are
    written one range of ``items_per_shard`` rows at a time, so memory is one shard's
    rows whatever the catalog's size. The checks of :func:`check_interaction_data` are
    the caller's (``build_shards`` makes them)."""
    if shard_size < 1 or items_per_shard < 1:
        raise ValueError(f"shard_size ({shard_size}) and items_per_shard ({items_per_shard}) must be >= 1")
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype: expected one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    store = Store(out_url, storage_options)
    lengths = seqs.lengths
    order = np.random.default_rng(seed).permutation(len(seqs)) if shuffle_users else np.arange(len(seqs))
    n_seq = -(-len(seqs) // shard_size)
    n_item = -(-items.num_items // items_per_shard)
    seq_shards, item_shards = [], []
    present = {"text": 0, "image": 0}
    with tqdm(total=n_seq + n_item, desc=f"writing shards to {store.url}", unit="shard", disable=not progress) as bar:
        for k in range(n_seq):
            users = order[k * shard_size:(k + 1) * shard_size]
            blob = _tar_bytes([_sequence_record(seqs, int(u)) for u in users])
            seq_shards.append(_put(
                store, f"sequences/seq-{k:05d}.tar", blob, users=len(users),
                interactions=int(lengths[users].sum()),
                samples={s: int(num_samples_array(lengths[users], s).sum()) for s in SPLITS}))
            bar.update()
        for k in range(n_item):
            lo, hi = 1 + k * items_per_shard, 1 + min((k + 1) * items_per_shard, items.num_items)
            block = items.block(lo, hi)
            present["text"] += int(np.count_nonzero(block["text_mask"]))
            present["image"] += int(np.count_nonzero(block["image_mask"]))
            blob = _tar_bytes([_item_record(block, lo, hi, feature_dtype)])
            del block
            item_shards.append(_put(store, f"items/items-{k:05d}.tar", blob, first_item=lo, num_items=hi - lo))
            bar.update()

    def feature(modality: str):
        return {"dim": getattr(items, f"{modality}_dim"), "dtype": feature_dtype,
                "encoder": getattr(items, f"{modality}_encoder"), "present": present[modality]}

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "name": meta.name,
        "num_users": len(seqs),
        "num_items": items.num_items,
        "num_interactions": seqs.num_interactions,
        "time_source": meta.time_source,
        "splits": {"scheme": "leave_one_out",
                   **{s: {"users": int((num_samples_array(lengths, s) > 0).sum()),
                          "samples": sum(sh["samples"][s] for sh in seq_shards)} for s in SPLITS}},
        "features": {"text": feature("text"), "image": feature("image")},
        "dataset": meta.to_dict(),
        "sequences": {"record": "<key>.json: {user, user_id, domain, items: [int 1..num_items], times: [float]}",
                      "shards": seq_shards},
        "items": {"record": "<key>.{ids,text,text_mask,image,image_mask}.npy + <key>.meta.json",
                  "shards": item_shards},
        "build": {"shard_size": shard_size, "items_per_shard": items_per_shard, "seed": seed,
                  "shuffle_users": shuffle_users, "extra": dict(extra or {})},
    }
    store.write(MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    return manifest


# --------------------------------------------------------------------------- reading

def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None, *, store: Store | None = None) -> dict:
    """Load and check ``<url>/manifest.json`` (schema version, required keys)."""
    store = store or Store(url, storage_options)
    where = store.display(MANIFEST)
    try:
        raw = store.read(MANIFEST)
    except ShardError:
        raise ManifestError(where, "missing manifest (not a shard set, or its build did not finish)") from None
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(where, f"not valid JSON: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("schema_version"), int):
        raise ManifestError(where, "no integer 'schema_version'")
    if m["schema_version"] > SCHEMA_VERSION:
        raise ManifestError(where, f"schema_version {m['schema_version']} is newer than this reader supports "
                                   f"({SCHEMA_VERSION}); upgrade data_shards to read it")
    for key in ("num_items", "sequences", "items", "features", "splits"):
        if key not in m:
            raise ManifestError(where, f"missing key {key!r}")
    return m


def read_shard_records(store: Store, entry: Mapping[str, Any], verify: bool = True) -> list[dict[str, bytes]]:
    """All records of one shard (``entry`` from the manifest), checked against it.

    Checks the sha256 (``verify``) and, always, that the tar parses to the end; errors
    name the shard URL and the member.
    """
    where = store.display(entry["path"])
    blob = store.read(entry["path"])
    if verify:
        digest = hashlib.sha256(blob).hexdigest()
        if digest != entry["sha256"]:
            raise ShardError(where, f"checksum mismatch: sha256 {digest} but the manifest says {entry['sha256']} "
                                    f"({len(blob)} bytes, manifest {entry.get('bytes')})")

    def raise_(exn: Exception) -> bool:
        raise ShardError(where, f"truncated or corrupt tar: {exn}") from exn

    try:
        files = (dict(f, __url__=where) for f in tar_file_iterator(io.BytesIO(blob), handler=raise_))
        records = list(group_by_keys(files, handler=raise_))
    except (tarfile.TarError, EOFError, ValueError) as e:
        if isinstance(e, ShardError):
            raise
        raise ShardError(where, f"truncated or corrupt tar: {e}") from None
    expected = entry.get("users")
    if expected is not None and len(records) != expected:
        raise ShardError(where, f"truncated or corrupt shard: {len(records)} records, the manifest says {expected}")
    return records


def decode_sequence(rec: Mapping[str, bytes], where: str, num_items: int | None = None) -> dict:
    """A sequence record -> ``{"user", "user_id", "domain", "items": int64 [n], "times": float64 [n]}``;
    with ``num_items``, every id is checked to be in ``1..num_items``."""
    try:
        d = json.loads(rec["json"])
        d["items"] = np.asarray(d["items"], dtype=np.int64)
        d["times"] = np.asarray(d["times"], dtype=np.float64)
        if d["items"].shape != d["times"].shape or d["items"].ndim != 1:
            raise ValueError(f"items {d['items'].shape} and times {d['times'].shape} differ")
        int(d["user"])
    except (KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{where}:{rec.get('__key__')}", f"bad sequence record: {e!r}") from None
    if num_items is not None:
        check_item_ids(d["items"], num_items, f"{where}:{rec.get('__key__')}", d.get("user_id"))
    return d


def _load_npy(rec: Mapping[str, bytes], key: str, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(rec[key]), allow_pickle=False)
    except (KeyError, ValueError) as e:
        raise ShardError(f"{where}:{rec.get('__key__')}.{key}", f"bad item record: {e!r}") from None


def load_item_table(url: str, storage_options: Mapping[str, Any] | None = None, *, verify: bool = True) -> ItemTable:
    """The whole :class:`ItemTable` of a shard set (checksums verified unless ``verify=False``)."""
    store = Store(url, storage_options)
    m = read_manifest(url, store=store)
    n = m["num_items"]
    feats = m["features"]
    text = np.zeros((n + 1, feats["text"]["dim"]), np.float32)
    image = np.zeros((n + 1, feats["image"]["dim"]), np.float32) if feats["image"]["dim"] else None
    text_mask, image_mask = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    item_ids, item_text, domain = [""] * (n + 1), [""] * (n + 1), [""] * (n + 1)
    seen = np.zeros(n + 1, bool)
    for entry in m["items"]["shards"]:
        where = store.display(entry["path"])
        for rec in read_shard_records(store, entry, verify):
            ids = _load_npy(rec, "ids.npy", where)
            if ids.size and (ids.min() < 1 or ids.max() > n):
                raise ShardError(f"{where}:{rec['__key__']}", f"item ids outside 1..{n}")
            meta = json.loads(rec["meta.json"])
            rec_where = f"{where}:{rec['__key__']}"
            text[ids] = _load_npy(rec, "text.npy", where)
            check_finite_features(text[ids], "text", rec_where, ids, meta["item_ids"])
            text_mask[ids] = _load_npy(rec, "text_mask.npy", where)
            image_mask[ids] = _load_npy(rec, "image_mask.npy", where)
            if image is not None:
                image[ids] = _load_npy(rec, "image.npy", where)
                check_finite_features(image[ids], "image", rec_where, ids, meta["item_ids"])
            for i, a, b, c in zip(ids.tolist(), meta["item_ids"], meta["item_text"], meta["domain"]):
                item_ids[i], item_text[i], domain[i] = a, b, c
            seen[ids] = True
    if not seen[1:].all():
        raise ShardError(store.url, f"item shards miss {int((~seen[1:]).sum())} of {n} items")
    return ItemTable(text=text, text_mask=text_mask, image=image, image_mask=image_mask, item_ids=item_ids,
                     item_text=item_text, domain=domain, text_encoder=feats["text"]["encoder"],
                     image_encoder=feats["image"]["encoder"])


@dataclasses.dataclass(eq=False)
class ItemRows:
    """Feature rows ``lo .. hi - 1`` of a shard set's item table (global item ids; row
    0 is the padding row: zero features, masks False). What one process of a sharded
    job loads: ``text`` / ``image`` [hi - lo, dim] (``image`` None when the set has none)."""

    lo: int
    hi: int
    text: np.ndarray
    text_mask: np.ndarray
    image: np.ndarray | None
    image_mask: np.ndarray


def load_item_rows(url: str, lo: int, hi: int, storage_options: Mapping[str, Any] | None = None, *,
                   verify: bool = True, dtype=np.float32, manifest: Mapping[str, Any] | None = None) -> ItemRows:
    """Feature rows ``lo .. hi - 1`` of a shard set, reading only the item shards that
    hold them (the builder writes items in contiguous id ranges, ``first_item`` /
    ``num_items`` in the manifest), one shard at a time: memory is the rows asked for
    plus one shard, whatever the catalog's size. ``dtype`` (float32 or float16) is the
    type the rows are kept in."""
    store = Store(url, storage_options)
    m = manifest or read_manifest(url, store=store)
    n = int(m["num_items"])
    if not 0 <= lo <= hi <= n + 1:
        raise ValueError(f"load_item_rows: rows {lo}..{hi - 1} outside 0..{n} (num_items {n})")
    feats = m["features"]
    rows = hi - lo
    text = np.zeros((rows, feats["text"]["dim"]), dtype)
    image = np.zeros((rows, feats["image"]["dim"]), dtype) if feats["image"]["dim"] else None
    text_mask, image_mask = np.zeros(rows, bool), np.zeros(rows, bool)
    seen = np.zeros(rows, bool)
    seen[:max(0, 1 - lo)] = True                   # the padding row
    for entry in m["items"]["shards"]:
        first, count = int(entry["first_item"]), int(entry["num_items"])
        if first + count <= lo or first >= hi:
            continue
        where = store.display(entry["path"])
        for rec in read_shard_records(store, entry, verify):
            ids = _load_npy(rec, "ids.npy", where)
            if ids.size and (ids.min() < 1 or ids.max() > n):
                raise ShardError(f"{where}:{rec['__key__']}", f"item ids outside 1..{n}")
            take = (ids >= lo) & (ids < hi)
            if not take.any():
                continue
            at = ids[take] - lo
            part = _load_npy(rec, "text.npy", where)[take]
            check_finite_features(part, "text", f"{where}:{rec['__key__']}", ids[take])
            text[at] = part
            text_mask[at] = _load_npy(rec, "text_mask.npy", where)[take]
            image_mask[at] = _load_npy(rec, "image_mask.npy", where)[take]
            if image is not None:
                part = _load_npy(rec, "image.npy", where)[take]
                check_finite_features(part, "image", f"{where}:{rec['__key__']}", ids[take])
                image[at] = part
            seen[at] = True
    if not seen.all():
        raise ShardError(store.url, f"item shards miss {int((~seen).sum())} of items {lo}..{hi - 1}")
    return ItemRows(lo, hi, text, text_mask, image, image_mask)


def iter_sequences(url: str, storage_options: Mapping[str, Any] | None = None, *,
                   verify: bool = True) -> Iterator[dict]:
    """Every sequence record of a shard set, in shard order (for inspection and tests)."""
    store = Store(url, storage_options)
    manifest = read_manifest(url, store=store)
    for entry in manifest["sequences"]["shards"]:
        where = store.display(entry["path"])
        for rec in read_shard_records(store, entry, verify):
            yield decode_sequence(rec, where, int(manifest["num_items"]))

