"""The item table: per-item modality features, presence masks and original ids.

Row ``i`` is item id ``i`` (1..num_items); row 0 is padding (zero features, masks
False, empty id/text). A missing modality is a False mask with a zero row, never a
fake vector.
"""
from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ItemTable"]


def _str_array(values, n: int, what: str) -> np.ndarray:
    arr = np.empty(n, dtype=object)
    if values is None:
        arr[:] = ""
        return arr
    values = list(values)
    if len(values) != n:
        raise ValueError(f"ItemTable.{what}: expected {n} rows, got {len(values)}")
    arr[:] = values
    return arr


@dataclasses.dataclass(eq=False)
class ItemTable:
    """Item features for ``num_items`` items plus the padding row 0.

    Attributes (``R = num_items + 1`` rows):
        text: float32 [R, text_dim]; ``text_dim`` is 0 before the text is encoded.
        text_mask: bool [R]; True where the item has a text vector.
        image: float32 [R, image_dim], or None when no item has an image.
        image_mask: bool [R]; True where the item has an image vector.
        item_ids: object [R] of str, the dataset's original item id ("" in row 0);
            domain-prefixed (``"office:123"``) in multi-domain mixes.
        item_text: object [R] of str, the text the text features were computed from.
        domain: object [R] of str, the source domain of each item ("" in row 0).
        text_encoder / image_encoder: where the features came from (for the manifest).
    """

    text: np.ndarray
    text_mask: np.ndarray
    image: np.ndarray | None = None
    image_mask: np.ndarray | None = None
    item_ids: np.ndarray | None = None
    item_text: np.ndarray | None = None
    domain: np.ndarray | None = None
    text_encoder: str | None = None
    image_encoder: str | None = None

    def __post_init__(self) -> None:
        self.text = np.ascontiguousarray(self.text, dtype=np.float32)
        if self.text.ndim != 2:
            raise ValueError(f"ItemTable.text: expected [num_items+1, dim], got shape {self.text.shape}")
        r = self.text.shape[0]
        if r < 1:
            raise ValueError("ItemTable.text: needs at least the padding row 0")
        self.text_mask = np.asarray(self.text_mask, dtype=bool)
        if self.image is not None:
            self.image = np.ascontiguousarray(self.image, dtype=np.float32)
            if self.image.ndim != 2 or self.image.shape[0] != r:
                raise ValueError(f"ItemTable.image: expected [{r}, dim], got shape {self.image.shape}")
        self.image_mask = (np.zeros(r, dtype=bool) if self.image_mask is None
                           else np.asarray(self.image_mask, dtype=bool))
        for name in ("text_mask", "image_mask"):
            m = getattr(self, name)
            if m.shape != (r,):
                raise ValueError(f"ItemTable.{name}: expected shape ({r},), got {m.shape}")
            if m[0]:
                raise ValueError(f"ItemTable.{name}: row 0 is padding and must be False")
        if self.image is None and self.image_mask.any():
            raise ValueError("ItemTable.image_mask has True rows but there is no image array")
        self.item_ids = _str_array(self.item_ids, r, "item_ids")
        self.item_text = _str_array(self.item_text, r, "item_text")
        self.domain = _str_array(self.domain, r, "domain")

    @property
    def num_items(self) -> int:
        return self.text.shape[0] - 1

    @property
    def text_dim(self) -> int:
        return self.text.shape[1]

    @property
    def image_dim(self) -> int:
        return 0 if self.image is None else self.image.shape[1]

    def with_features(self, *, text: np.ndarray | None = None, text_mask: np.ndarray | None = None,
                      text_encoder: str | None = None, image: np.ndarray | None = None,
                      image_mask: np.ndarray | None = None, image_encoder: str | None = None) -> ItemTable:
        """A copy with the given modality replaced (arrays of ``num_items + 1`` rows)."""
        return dataclasses.replace(
            self,
            text=self.text if text is None else text,
            text_mask=self.text_mask if text_mask is None else text_mask,
            text_encoder=self.text_encoder if text is None else text_encoder,
            image=self.image if image is None else image,
            image_mask=self.image_mask if image_mask is None else image_mask,
            image_encoder=self.image_encoder if image is None else image_encoder,
        )

    def __repr__(self) -> str:
        return (f"ItemTable(num_items={self.num_items}, text_dim={self.text_dim} "
                f"({int(self.text_mask.sum())} present), image_dim={self.image_dim} "
                f"({int(self.image_mask.sum())} present))")
