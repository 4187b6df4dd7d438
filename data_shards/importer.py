"""``import_dataset``: one call from source files to :class:`InteractionData` with features."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BadRecords
from .features import FeatureFile, TextEncoder, encode_item_text, join_features
from .formats import FORMATS
from .interactions import InteractionData, process

__all__ = ["file_sha256", "import_dataset"]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _source_files(fmt: str, path: Path, name: str, meta_path) -> list[Path]:
    if fmt == "amazon2018":
        return [path, Path(meta_path) if meta_path else path.with_name(f"meta_{name}.json.gz")]
    return sorted(p for p in path.glob(f"{name}.*") if p.is_file())


def import_dataset(fmt: str, path: str | Path, *, name: str | None = None, domain: str | None = None,
                   k_core: int = 5, skip_bad: bool = False,
                   text_encoder: TextEncoder | str | None = None, text_cache_dir: str | Path | None = None,
                   text_features: FeatureFile | None = None, image_features: FeatureFile | None = None,
                   meta: str | Path | None = None, max_users: int | None = None, sample_seed: int = 0,
                   **format_options) -> InteractionData:
    """Import a dataset from its source files (see :mod:`data_shards.formats`).

    Args:
        fmt: ``"unisrec"``, ``"recbole"``, ``"lcrec"`` or ``"amazon2018"``.
        path: the directory holding ``<name>.*`` (the ratings CSV for ``amazon2018``).
        name: the dataset's file prefix ``<name>``; found from the files when unique.
        domain: the label of this domain in mixes and shards (default: ``name``).
        k_core: iterative k-core threshold (users and items); ``<= 1`` keeps everything.
        skip_bad: skip bad records (reported in ``meta.bad_records``) instead of raising.
        text_encoder: encode the item text: a model name / :class:`TextEncoder`, or None
            to leave ``items.text`` empty (``text_dim == 0``).
        text_cache_dir: where a named ``text_encoder`` caches vectors by content hash.
        text_features / image_features: pre-computed features joined by original item id.
        meta: ``amazon2018`` only: the ``meta_<Category>.json.gz`` path.
        max_users / sample_seed: keep a seeded uniform sample of this many users (before
            the k-core filter), recorded in ``meta.sample``; None keeps all.
        **format_options: passed to the format reader (e.g. RecBole ``time_field=``).

    Returns:
        :class:`InteractionData`; ``meta.counts_raw`` before filtering, ``meta.counts`` after.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    bad = BadRecords(skip=skip_bad)
    reader = FORMATS[fmt]
    if fmt == "amazon2018":
        raw, native_index, name = reader(path, meta=meta, name=name, bad=bad, **format_options)
    else:
        raw, native_index, name = reader(path, name=name, bad=bad, **format_options)
    files = _source_files(fmt, Path(path), name, meta) + [
        Path(f.path) for f in (text_features, image_features) if f is not None]
    source = {"format": fmt, "files": {p.name: file_sha256(p) for p in files if p.is_file()}}
    data = process(raw, name=domain or name, fmt=fmt, k_core=k_core,
                   bad_records=bad.summary() if skip_bad else None, source=source,
                   max_users=max_users, sample_seed=sample_seed)
    items = data.items
    if text_features is not None:
        items = join_features(items, "text", text_features, native_index)
    elif text_encoder is not None:
        if isinstance(text_encoder, str):
            text_encoder = TextEncoder(text_encoder, cache_dir=text_cache_dir)
        items = encode_item_text(items, text_encoder)
    if image_features is not None:
        items = join_features(items, "image", image_features, native_index)
    data.items = items
    return data

