"""The bundled sample datasets (``data/samples/``) and their shard recipes.

All share one feature layout so that a model pre-trained on one fine-tunes on
another: text = offline all-MiniLM-L6-v2 (384-d), image = 512-d (CLIP ViT-B/32 image
features for ``scientific_mm``; ``office`` and ``amazon_mix`` have no images: zero
rows, mask False). ``amazon_mix`` is a multi-domain mix (one RecBole folder per
domain, combined by :func:`data_shards.combine_domains` as ``mmm4rec data build`` does
for several ``--input`` sources); its provenance is in ``data/samples/PROVENANCE.md``.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mmm4rec.paths import REPO_ROOT, text_cache_dir

from .errors import DataError, ManifestError
from .features import DEFAULT_TEXT_ENCODER, FeatureFile, TextEncoder
from .importer import file_sha256, import_dataset
from .interactions import combine_domains
from .shards import build_shards, read_manifest

__all__ = ["SAMPLES_DIR", "SAMPLE_DATASETS", "ensure_sample_shards"]

SAMPLES_DIR = REPO_ROOT / "data" / "samples"
IMAGE_DIM = 512

#: name -> recipe (format, directory under data/samples, import and shard options).
SAMPLE_DATASETS: dict[str, dict] = {
    "office": {"format": "lcrec", "dir": "office", "name": "Office", "k_core": 5, "image": None,
               "shard_size": 250, "items_per_shard": 1000},
    "scientific_mm": {"format": "unisrec", "dir": "scientific_mm", "name": "Scientific", "k_core": 5,
                      "image": {"file": "Scientific.feat3CLS", "dim": IMAGE_DIM,
                                "encoder": "CLIP ViT-B/32 image (MISSRec .feat3CLS)"},
                      "shard_size": 250, "items_per_shard": 1000},
    # Beauty, Toys, Health (Amazon 2014) and Games (Amazon 2018): titles, real timestamps.
    # The folders are already 5-core samples (derive.py); k_core 0 keeps them as they are.
    "amazon_mix": {"format": "recbole", "dir": "amazon_mix", "k_core": 0, "image": None,
                   "domains": ["amazon2014-beauty", "amazon2014-toy", "amazon2014-health", "amazon2018-game"],
                   "shard_size": 250, "items_per_shard": 1000},
}
_RECIPE_VERSION = 1


def _fingerprint(name: str, recipe: dict) -> str:
    src = SAMPLES_DIR / recipe["dir"]
    files = {str(p.relative_to(src)): file_sha256(p) for p in sorted(src.rglob("*")) if p.is_file()}
    key = {"version": _RECIPE_VERSION, "name": name, "recipe": recipe, "files": files,
           "text_encoder": DEFAULT_TEXT_ENCODER}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def ensure_sample_shards(name: str, out_dir: str | Path, *, cache_dir: str | Path | None = None,
                         force: bool = False, progress: bool = True) -> str:
    """Build (unless already built from the same files) the shards of sample ``name``.

    Args:
        name: a key of :data:`SAMPLE_DATASETS` (``"office"``, ``"scientific_mm"``, ``"amazon_mix"``).
        out_dir: the shards go to ``<out_dir>/<name>``.
        cache_dir: text-vector cache (default ``mmm4rec.paths.text_cache_dir()``, shared by
            every build on the machine); a rebuild reuses it.
        force: rebuild even if an up-to-date manifest exists.

    Returns:
        The shard set's URL (a local path).
    """
    if name not in SAMPLE_DATASETS:
        raise ValueError(f"unknown sample dataset {name!r}; expected one of {sorted(SAMPLE_DATASETS)}")
    recipe = SAMPLE_DATASETS[name]
    if not (SAMPLES_DIR / recipe["dir"]).is_dir():
        raise DataError(str(SAMPLES_DIR / recipe["dir"]),
                        f"the bundled sample {name!r} ships with a checkout of the repository, not with the "
                        "installed package; use a checkout, or give your own shards as data.url")
    out = Path(out_dir) / name
    fingerprint = _fingerprint(name, recipe)
    if not force and (out / "manifest.json").is_file() and _is_current(out, fingerprint):
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = SAMPLES_DIR / recipe["dir"]
    image = recipe["image"]
    encoder = TextEncoder(DEFAULT_TEXT_ENCODER, cache_dir=cache_dir or text_cache_dir(),
                          progress=progress)
    if "domains" in recipe:   # a multi-domain mix: one source folder per domain
        data = combine_domains([import_dataset(recipe["format"], src / d, domain=d, k_core=recipe["k_core"],
                                               text_encoder=encoder) for d in recipe["domains"]])
    else:
        data = import_dataset(
            recipe["format"], src, name=recipe["name"], domain=name, k_core=recipe["k_core"], text_encoder=encoder,
            image_features=None if image is None else FeatureFile(str(src / image["file"]), format="raw",
                                                                  dim=image["dim"], encoder=image["encoder"]))
    if data.items.image is None:
        n = data.items.num_items + 1
        data.items = data.items.with_features(image=np.zeros((n, IMAGE_DIM), np.float32),
                                              image_mask=np.zeros(n, bool), image_encoder=None)
    # Build into a private directory and rename it into place: several processes (ranks,
    # test sessions, Slurm jobs) may ask for the same sample at once, and a reader must
    # never see a half-written shard set.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        build_shards(data, str(tmp), shard_size=recipe["shard_size"], items_per_shard=recipe["items_per_shard"],
                     extra={"sample": name, "fingerprint": fingerprint}, progress=progress)
        if out.exists():   # stale (or a concurrent builder won): replace only if not current
            if _is_current(out, fingerprint) and not force:
                return str(out)
            shutil.rmtree(out, ignore_errors=True)
        try:
            tmp.rename(out)
        except OSError:    # a concurrent builder renamed first
            if not _is_current(out, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _is_current(out: Path, fingerprint: str) -> bool:
    try:
        return read_manifest(str(out))["build"]["extra"].get("fingerprint") == fingerprint
    except (ManifestError, KeyError, FileNotFoundError):
        return False
