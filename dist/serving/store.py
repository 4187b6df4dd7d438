"""A retrieval export on disk and in memory: :class:`Retrieval`.

Layout of an export directory (docs/serving.md)::

    manifest.json              format, model, catalog, versions, index settings
    items.json                 {"item_ids": [...], "active": [0/1 ...]} per serving row
    item_features.safetensors  the rows the two programs read: {table name: [R, dim]}
    item_vectors.safetensors   {"fp32": [R, N], "fp16": [R, N]}: score = user . item
    index-exact.faiss          IndexFlatIP over rows 1..R-1
    index-approx.faiss         IndexIVFFlat (inner product) over the same rows
    user_tower.pt2             torch.export program: history rows -> user vectors
    item_encoder.pt2           torch.export program: item rows -> item vectors

Serving row 0 is padding; rows are append-only (``items add`` appends, ``remove``
clears ``active``, ``update`` does both), so FAISS id ``j`` is always row ``j + 1``.
Nothing here imports DeepSpeed or torchrec: the programs need only torch.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import torch

from data_shards.errors import DataError
from mmm4rec.config import ConfigError

from . import index as idx
from .tower import load_program

__all__ = ["FORMAT", "FORMAT_VERSION", "Retrieval", "library_versions"]

FORMAT = "mmm4rec-retrieval"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FILES = {"items": "items.json", "features": "item_features.safetensors", "vectors": "item_vectors.safetensors",
         "tower": "user_tower.pt2", "encoder": "item_encoder.pt2"}


def index_file(kind: str) -> str:
    return f"index-{kind}.faiss"


def library_versions() -> dict[str, str]:
    import safetensors

    from mmm4rec import __version__

    out = {"mmm4rec": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
           "numpy": np.__version__}
    try:
        out["faiss"] = idx.faiss().__version__
    except ImportError:
        pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


class HistoryError(DataError):
    """A bad history record: the message names the record and the field."""


class Retrieval:
    """A loaded retrieval export: user vectors, top-K, and catalog edits.

    ``Retrieval.load(path)``; ``recommend(histories, k)``; ``add_items`` / ``remove_items`` /
    ``update_items`` (see :mod:`dist.serving.items`) then ``save(path)``.
    """

    def __init__(self, manifest: dict, item_ids: list[str], active: np.ndarray, features: dict[str, np.ndarray],
                 vectors: np.ndarray, indexes: dict, root: Path | None = None, tower=None, encoder=None):
        self.manifest = manifest
        self.item_ids = list(item_ids)
        self.active = np.asarray(active, dtype=bool)
        self.features = features
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.indexes = indexes
        self.root = root
        self._tower, self._encoder = tower, encoder
        self._reindex()

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> Retrieval:
        from safetensors.numpy import load_file

        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"{root}: not a retrieval export (no {MANIFEST}; "
                                    "make one with 'mmm4rec retrieval export')")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT:
            raise DataError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
            raise DataError(f"{mpath}: format_version {manifest['format_version']} is newer than this "
                             f"mmm4rec reads ({FORMAT_VERSION})")
        for f in [*FILES.values(), *(index_file(k) for k in idx.KINDS)]:
            if not (root / f).is_file():
                raise FileNotFoundError(f"{root}: incomplete retrieval export (missing {f})")
        items = json.loads((root / FILES["items"]).read_text())
        f = idx.faiss()
        indexes = {k: f.read_index(str(root / index_file(k))) for k in idx.KINDS}
        vectors = load_file(str(root / FILES["vectors"]))["fp32"]
        return cls(manifest, items["item_ids"], np.asarray(items["active"], bool),
                   load_file(str(root / FILES["features"])), vectors, indexes, root=root)

    @property
    def tower(self):
        if self._tower is None:
            self._tower = load_program(self.root / FILES["tower"])
        return self._tower

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_program(self.root / FILES["encoder"])
        return self._encoder

    # ---------------------------------------------------------------- bookkeeping
    @property
    def table_names(self) -> list[str]:
        return [t["name"] for t in self.manifest["tables"]]

    @property
    def max_len(self) -> int:
        return int(self.manifest["model"]["max_len"])

    @property
    def num_rows(self) -> int:
        return len(self.item_ids)

    @property
    def num_active(self) -> int:
        return int(self.active.sum())

    def _reindex(self) -> None:
        # history look-ups see every row ever added (the latest row of an id wins): a
        # removed item can still appear in a user's past; candidates are active rows only
        self.row_of = {iid: r for r, iid in enumerate(self.item_ids) if r > 0}
        self.active_row_of = {iid: r for r, iid in enumerate(self.item_ids) if r > 0 and self.active[r]}
        self._removed = np.flatnonzero(~self.active[1:]).astype(np.int64)   # index ids

    # ---------------------------------------------------------------- users
    def _batch(self, histories: Sequence[dict], where: str = "history") -> dict[str, torch.Tensor]:
        b, L = len(histories), self.max_len
        item_seq = np.zeros((b, L), np.int64)
        time_seq = np.zeros((b, L), np.float64)
        lens = np.ones(b, np.int64)
        for i, h in enumerate(histories):
            label = f"{where} {h.get('_where', i)}"
            items = h.get("items")
            if not isinstance(items, list) or not items:
                raise HistoryError(f"{label}: 'items' must be a non-empty list of item ids")
            times = h.get("times")
            if times is None:
                times = list(range(1, len(items) + 1))   # position index, as for datasets without time
            if not isinstance(times, list) or len(times) != len(items):
                raise HistoryError(f"{label}: 'times' must be a list as long as 'items' ({len(items)})")
            rows = []
            for j, iid in enumerate(items[-L:]):
                r = self.row_of.get(str(iid))
                if r is None:
                    raise HistoryError(f"{label}: items[{len(items) - len(items[-L:]) + j}] = {iid!r} is not in "
                                       "the catalog")
                rows.append(r)
            try:
                ts = [float(t) for t in times[-L:]]
            except (TypeError, ValueError):
                raise HistoryError(f"{label}: 'times' must be numbers") from None
            n = len(rows)
            item_seq[i, :n] = rows
            time_seq[i, :n] = ts
            lens[i] = n
        return {"item_seq": torch.from_numpy(item_seq), "time_seq": torch.from_numpy(time_seq),
                "item_seq_len": torch.from_numpy(lens)}

    @torch.no_grad()
    def user_vectors(self, histories: Sequence[dict]) -> np.ndarray:
        """float32 [b, N]: the user tower over ``histories`` (``{"items": [ids], "times": [...]}``;
        the last ``max_len`` items count; without ``times`` positions 1..n stand in)."""
        if not histories:
            return np.zeros((0, self.vectors.shape[1]), np.float32)
        batch = self._batch(histories)
        seq = batch["item_seq"].numpy()
        rows = [torch.from_numpy(np.ascontiguousarray(self.features[n][seq])) for n in self.table_names]
        u = self.tower(*rows, batch["item_seq"], batch["time_seq"], batch["item_seq_len"])
        return u.float().numpy()

    # ---------------------------------------------------------------- top-K
    def search_vectors(self, users: np.ndarray, k: int, index: str = "exact", nprobe: int | None = None,
                       exclude: Sequence[Collection[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows [b, k], scores [b, k]) for user vectors; ``exclude[i]``: serving rows to drop
        for user ``i``. Missing results (catalog smaller than k) are row 0 / -inf."""
        if index not in self.indexes:
            raise ConfigError(f"index must be one of {sorted(self.indexes)}, got {index!r}")
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        scores, ids = idx.search(self.indexes[index], users, k + extra, self._removed, nprobe)
        rows = ids + 1   # -1 (no result) -> row 0
        out_r = np.zeros((len(users), k), np.int64)
        out_s = np.full((len(users), k), -np.inf, np.float32)
        for i in range(len(users)):
            r, s = rows[i], scores[i]
            keep = r > 0
            if exclude is not None and len(exclude[i]):
                keep &= ~np.isin(r, np.fromiter(exclude[i], np.int64))
            r, s = r[keep][:k], s[keep][:k]
            out_r[i, :len(r)], out_s[i, :len(s)] = r, s
        return out_r, out_s

    def recommend(self, histories: Sequence[dict], k: int = 10, exclude_history: bool = False,
                  index: str = "exact", nprobe: int | None = None) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(item_id, score)`` per history, best first (the Python side of
        ``mmm4rec recommend``); ``exclude_history`` drops the items of the history itself."""
        users = self.user_vectors(histories)
        exclude = None
        if exclude_history:
            exclude = [{self.active_row_of[str(i)] for i in h["items"] if str(i) in self.active_row_of}
                       for h in histories]
        rows, scores = self.search_vectors(users, k, index, nprobe, exclude)
        return [[(self.item_ids[r], float(s)) for r, s in zip(rr, ss) if r > 0] for rr, ss in zip(rows, scores)]

    # ---------------------------------------------------------------- writing
    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the export to ``path`` (default: where it was loaded from), atomically:
        a complete copy is written beside it and renamed into place."""
        from safetensors.numpy import save_file

        out = Path(path) if path is not None else self.root
        if out is None:
            raise ValueError("save: no path given and the export was not loaded from disk")
        tmp = out.with_name(f".{out.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for key in ("tower", "encoder"):
            src = self.root / FILES[key] if self.root is not None else None
            if src is not None and src.is_file():
                shutil.copyfile(src, tmp / FILES[key])
            elif not (tmp / FILES[key]).is_file():
                raise FileNotFoundError(f"save: no {FILES[key]} to write")
        save_file({n: np.ascontiguousarray(a) for n, a in self.features.items()}, str(tmp / FILES["features"]))
        save_file({"fp32": self.vectors, "fp16": self.vectors.astype(np.float16)}, str(tmp / FILES["vectors"]))
        (tmp / FILES["items"]).write_text(json.dumps({"item_ids": self.item_ids,
                                                      "active": self.active.astype(int).tolist()}))
        f = idx.faiss()
        for kind, index in self.indexes.items():
            f.write_index(index, str(tmp / index_file(kind)))
        m = self.manifest
        m["catalog"]["rows"] = self.num_rows
        m["catalog"]["active_items"] = self.num_active
        m["versions"] = library_versions()
        (tmp / MANIFEST).write_text(json.dumps(m, indent=1, ensure_ascii=False))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
        self.root = out
        return out
