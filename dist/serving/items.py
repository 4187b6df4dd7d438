"""``mmm4rec items add | update | remove``: change a retrieval export's catalog without training.

New items are encoded from their content exactly as the model encodes catalog items: text
with the catalog's own offline text encoder (``data_shards.features.TextEncoder``, e.g. the
bundled all-MiniLM-L6-v2) or given as ``text_features``, image features given as
``image_features``; the exported item encoder (the model's adapters, normalisation, fusion
and temperature) turns them into item vectors, which are appended to the vectors and to
both indexes. Trainable per-item rows (the ID term, per-item fusion) of a new item are zero:
with ``use_id`` off that is the model exactly; with it on, a new item has no ID term yet.

A record (one JSON object per line)::

    {"item_id": "B00X", "text": "title, brand, category", "image_features": [0.1, ...]}

``text_features`` may replace ``text``; a missing modality is a False mask and a zero row,
as in the shard sets.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data_shards.errors import DataError

from .store import Retrieval

__all__ = ["add_items", "read_item_records", "read_json_lines", "remove_items", "text_encoder_for", "update_items"]


def read_json_lines(path: str | Path, what: str) -> list[dict]:
    """JSON objects, one a line ('-': stdin), each with ``_where`` = ``file:line``; errors
    name the file and line (``DataError``). ``what`` says what an object should be."""
    import sys

    if path != "-" and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with (sys.stdin if path == "-" else open(path, encoding="utf-8")) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object ({what})")
            rec["_where"] = where
            out.append(rec)
    return out


def read_item_records(path: str | Path) -> list[dict]:
    """JSON lines of items (module docstring); errors name the file, line and field."""
    out = read_json_lines(path, "an item")
    for rec in out:
        if not isinstance(rec.get("item_id"), (str, int)) or str(rec["item_id"]) == "":
            raise DataError(f"{rec['_where']}: field 'item_id' is missing or not a string")
    return out


def text_encoder_for(retrieval: Retrieval, **kwargs):
    """The catalog's text encoder, when it is one that runs offline from a name; it shares
    the project's text-vector cache (``mmm4rec.paths.text_cache_dir``) with ``data build``."""
    from data_shards.features import TextEncoder
    from mmm4rec.paths import text_cache_dir

    kwargs.setdefault("cache_dir", text_cache_dir())
    name = retrieval.manifest["catalog"].get("text_encoder") or ""
    m = re.fullmatch(r"(.+?)(?: \(max_seq_length=(\d+)\))?", name)
    model, max_len = (m.group(1), int(m.group(2)) if m.group(2) else None) if m else (name, None)
    if model.endswith("all-MiniLM-L6-v2") or Path(model).is_dir():
        return TextEncoder(model.split("/")[-1] if model.endswith("all-MiniLM-L6-v2") else model,
                           max_seq_length=max_len, **kwargs)
    return None


def _vector(rec: dict, field: str, dim: int) -> np.ndarray | None:
    v = rec.get(field)
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{rec['_where']}: field {field!r} must be a list of numbers") from None
    if a.shape != (dim,):
        raise DataError(f"{rec['_where']}: field {field!r} has {a.size} values, the catalog's are {dim}-d")
    if not np.isfinite(a).all():
        raise DataError(f"{rec['_where']}: field {field!r} holds NaN or infinite values")
    return a


def _item_rows(retrieval: Retrieval, records: Sequence[dict], text_encoder=None) -> dict[str, np.ndarray]:
    """The table rows of new items: {table name: [n, dim]} (trainable tables zero)."""
    feats = retrieval.features
    n = len(records)
    tables = {t["name"]: t for t in retrieval.manifest["tables"]}
    if not {"text", "image", "modality_mask"} <= set(tables):
        raise DataError(f"a {retrieval.manifest['model']['model_type']} export scores items by their ID only: "
                         "new items need training, not 'items add'")
    out = {name: np.zeros((n, feats[name].shape[1]), np.float32) for name in tables}
    t_dim, i_dim = feats["text"].shape[1], feats["image"].shape[1]
    need_text = []
    for j, rec in enumerate(records):
        tv = _vector(rec, "text_features", t_dim)
        iv = _vector(rec, "image_features", i_dim) if i_dim else None
        if tv is None and rec.get("text") not in (None, ""):
            if not isinstance(rec["text"], str):
                raise DataError(f"{rec['_where']}: field 'text' must be a string")
            need_text.append(j)
        elif tv is not None:
            out["text"][j] = tv
            out["modality_mask"][j, 0] = 1.0
        if iv is not None:
            out["image"][j] = iv
            out["modality_mask"][j, 1] = 1.0
        if tv is None and iv is None and j not in need_text:
            raise DataError(f"{rec['_where']}: item has no content (give 'text', 'text_features' or "
                             "'image_features')")
    if need_text:
        enc = text_encoder if text_encoder is not None else text_encoder_for(retrieval)
        if enc is None:
            raise DataError(f"{records[need_text[0]]['_where']}: the catalog's text features come from "
                             f"{retrieval.manifest['catalog'].get('text_encoder')!r}, which cannot run here; "
                             "give 'text_features' instead of 'text'")
        vecs = enc.encode([records[j]["text"] for j in need_text], desc="encoding new item text")
        if vecs.shape[1] != t_dim:
            raise DataError(f"text encoder {enc.name} gives {vecs.shape[1]}-d vectors, the catalog's are {t_dim}-d")
        for j, v in zip(need_text, vecs):
            out["text"][j] = v
            out["modality_mask"][j, 0] = 1.0
    return out


def _append(retrieval: Retrieval, records: Sequence[dict], rows: dict[str, np.ndarray]) -> None:
    names = retrieval.table_names
    with torch.no_grad():
        V = retrieval.encoder(*[torch.from_numpy(rows[nm]) for nm in names]).float().numpy()
    for nm in names:
        retrieval.features[nm] = np.concatenate([retrieval.features[nm], rows[nm]])
    retrieval.vectors = np.concatenate([retrieval.vectors, V])
    retrieval.item_ids += [str(r["item_id"]) for r in records]
    retrieval.active = np.concatenate([retrieval.active, np.ones(len(records), bool)])
    for index in retrieval.indexes.values():
        index.add(np.ascontiguousarray(V))   # index ids continue from ntotal = rows - 1


def _log(retrieval: Retrieval, op: str, count: int) -> None:
    from .store import now

    retrieval.manifest["catalog"].setdefault("edits", []).append({"op": op, "items": count, "at": now()})
    retrieval.manifest["catalog"]["version"] = int(retrieval.manifest["catalog"].get("version", 0)) + 1


def _check_unique(records: Sequence[dict]) -> None:
    seen: dict[str, str] = {}
    for r in records:
        iid = str(r["item_id"])
        if iid in seen:
            raise DataError(f"{r['_where']}: item_id {iid!r} repeats {seen[iid]}")
        seen[iid] = r["_where"]


def add_items(retrieval: Retrieval, records: Sequence[dict], text_encoder=None) -> int:
    """Append new items (their ids must not be active in the catalog); returns how many."""
    records = [dict(r, _where=r.get("_where", f"item {i}")) for i, r in enumerate(records)]
    _check_unique(records)
    for r in records:
        if str(r["item_id"]) in retrieval.active_row_of:
            raise DataError(f"{r['_where']}: item_id {r['item_id']!r} is already in the catalog "
                             "(use 'mmm4rec items update')")
    if not records:
        return 0
    _append(retrieval, records, _item_rows(retrieval, records, text_encoder))
    _log(retrieval, "add", len(records))
    retrieval._reindex()
    return len(records)


def remove_items(retrieval: Retrieval, item_ids: Sequence[str]) -> int:
    """Take items out of the candidates (histories may still name them); returns how many."""
    rows = []
    for iid in item_ids:
        r = retrieval.active_row_of.get(str(iid))
        if r is None:
            raise DataError(f"item_id {iid!r} is not in the catalog")
        rows.append(r)
    retrieval.active[rows] = False
    _log(retrieval, "remove", len(rows))
    retrieval._reindex()
    return len(rows)


def update_items(retrieval: Retrieval, records: Sequence[dict], text_encoder=None) -> int:
    """Re-encode existing items from new content: the old rows are retired, new ones appended."""
    records = [dict(r, _where=r.get("_where", f"item {i}")) for i, r in enumerate(records)]
    _check_unique(records)
    old = []
    for r in records:
        row = retrieval.active_row_of.get(str(r["item_id"]))
        if row is None:
            raise DataError(f"{r['_where']}: item_id {r['item_id']!r} is not in the catalog (use 'mmm4rec items add')")
        old.append(row)
    if not records:
        return 0
    rows = _item_rows(retrieval, records, text_encoder)
    retrieval.active[old] = False
    _append(retrieval, records, rows)
    _log(retrieval, "update", len(records))
    retrieval._reindex()
    return len(records)
