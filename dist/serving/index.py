"""FAISS indexes over the item vectors (inner product, so score = user . item).

Index id ``j`` is serving row ``j + 1`` (row 0 is padding and never indexed); rows are
append-only, so ids stay in step with the rows through ``items add``. Removed or replaced
rows stay in the index and are filtered at search time with an ``IDSelector``.

* ``exact``: ``IndexFlatIP``, brute force, the reference.
* ``approx``: ``IndexIVFFlat`` (inner product), ``nlist`` (default ~sqrt(n)) k-means cells of which
  ``nprobe`` are scanned per query.
"""
from __future__ import annotations

import math

import numpy as np

from mmm4rec.errors import import_optional

__all__ = ["KINDS", "build_index", "default_nlist", "default_nprobe", "faiss", "search"]

KINDS = ("exact", "approx")


def faiss():
    """The ``faiss`` module (the ``[serve]`` extra); an :class:`OptionalDependencyError` (an
    ``ImportError``, exit 2 at the CLI) names the extra when it is missing, or the real cause."""
    return import_optional("faiss", "serve", "serving (retrieval indexes)")


def default_nlist(n: int) -> int:
    """About sqrt(n) cells (k-means stays cheap on a CPU at 10^6 items), with at least 39
    training points per cell (FAISS's minimum)."""
    return max(1, min(int(math.sqrt(max(n, 1))), n // 39))


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, nlist // 16 if nlist >= 256 else nlist // 4))


def build_index(kind: str, vectors: np.ndarray, nlist: int | None = None, seed: int = 0):
    """An index over ``vectors`` (float32 [n, N], rows 1..n of the serving table)."""
    f = faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = x.shape
    if kind == "exact":
        index = f.IndexFlatIP(d)
    elif kind == "approx":
        nlist = nlist or default_nlist(n)
        quantizer = f.IndexFlatIP(d)
        index = f.IndexIVFFlat(quantizer, d, nlist, f.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        # k-means on a seeded sample of at most 64 points per cell
        rng = np.random.default_rng(seed)
        train = x if n <= 64 * nlist else x[np.sort(rng.choice(n, 64 * nlist, replace=False))]
        index.train(train)
        index.nprobe = default_nprobe(nlist)
    else:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    if n:
        index.add(x)
    return index


def search(index, queries: np.ndarray, k: int, removed: np.ndarray | None = None, nprobe: int | None = None):
    """(scores [b, k], ids [b, k]) of the top ``k`` index ids; ``removed``: index ids to skip.
    Missing results (fewer than ``k`` candidates) have id -1."""
    f = faiss()
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    is_ivf = hasattr(index, "nprobe")
    params = inner = outer = None   # the selectors must outlive the search (FAISS keeps pointers)
    has_removed = removed is not None and len(removed) > 0
    if has_removed or (is_ivf and nprobe):
        params = f.SearchParametersIVF() if is_ivf else f.SearchParameters()
        if has_removed:
            inner = f.IDSelectorBatch(np.ascontiguousarray(removed, dtype=np.int64))
            outer = f.IDSelectorNot(inner)
            params.sel = outer
        if is_ivf:
            params.nprobe = int(nprobe or index.nprobe)
    if params is None:
        return index.search(q, k)
    out = index.search(q, k, params=params)
    del inner, outer
    return out
