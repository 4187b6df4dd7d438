"""Serving a trained model: retrieval exports, catalog edits without training, top-K.

* :func:`export_retrieval` / ``mmm4rec retrieval export``: item vectors (fp32 + fp16), FAISS
  indexes (exact inner product, IVF), the user tower and item encoder as ``torch.export``
  programs, a manifest;
* :func:`add_items` / ``remove_items`` / ``update_items`` / ``mmm4rec items``;
* :class:`Retrieval` (``Retrieval.load(path).recommend(histories, k)``) / ``mmm4rec recommend``.

The serving side imports neither DeepSpeed nor torchrec (docs/serving.md).
"""
from .build import export_retrieval
from .items import add_items, remove_items, update_items
from .store import Retrieval

__all__ = ["Retrieval", "add_items", "export_retrieval", "remove_items", "update_items"]
