"""Interaction data: raw (user, item, time) rows -> filtered, time-sorted user sequences.

The processing every format goes through (:func:`process`):

1. drop interactions with items that have no metadata (where the format has it);
   with ``max_users``, keep a seeded uniform sample of that many users (all of each
   kept user's interactions),
2. per-user stable sort by time (file order breaks ties; with no timestamps the
   file order is the time, and times become positions 1..n: ``time_source="position"``),
3. iterative k-core: drop users and items with fewer than ``k`` interactions until
   none is left (``k <= 1`` keeps everything),
4. remap items to 1..|I| (0 = padding) and users to 0..|U|-1, both in the order of
   the source's own ids (index files, or first appearance).

The leave-one-out split is not materialised: it is a function of the sequence
(:mod:`data_shards.samples`), so one stored sequence serves train, valid and test.
"""
from __future__ import annotations

import collections.abc
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import DataError
from .items import ItemTable

__all__ = [
    "DatasetMeta",
    "InteractionData",
    "RawInteractions",
    "Sequences",
    "UserSequence",
    "combine_domains",
    "process",
]


@dataclasses.dataclass(frozen=True)
class UserSequence:
    """One user's time-ordered interactions.

    ``items`` int64 [n] in 1..|I|; ``times`` float64 [n] (seconds, or positions 1..n).
    """

    user: int
    user_id: str
    items: np.ndarray
    times: np.ndarray
    domain: str


class Sequences(collections.abc.Sequence):
    """All user sequences in CSR form: user ``u`` owns ``items[offsets[u]:offsets[u+1]]``.

    Indexing gives a :class:`UserSequence` (array views, no copy).
    """

    def __init__(self, offsets: np.ndarray, items: np.ndarray, times: np.ndarray,
                 user_ids: Sequence[str], domains: Sequence[str]):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.items = np.asarray(items, dtype=np.int64)
        self.times = np.asarray(times, dtype=np.float64)
        self.user_ids = np.asarray(user_ids, dtype=object)
        self.domains = np.asarray(domains, dtype=object)
        n = len(self.offsets) - 1
        if len(self.user_ids) != n or len(self.domains) != n:
            raise ValueError(f"Sequences: {n} users but {len(self.user_ids)} ids and {len(self.domains)} domains")
        if self.offsets[-1] != len(self.items) or len(self.items) != len(self.times):
            raise ValueError("Sequences: offsets, items and times disagree in length")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u):
        if isinstance(u, slice):
            return [self[i] for i in range(*u.indices(len(self)))]
        u = int(u)
        if u < 0:
            u += len(self)
        if not 0 <= u < len(self):
            raise IndexError(f"user index {u} out of range (0..{len(self) - 1})")
        lo, hi = self.offsets[u], self.offsets[u + 1]
        return UserSequence(u, str(self.user_ids[u]), self.items[lo:hi], self.times[lo:hi], str(self.domains[u]))

    def __iter__(self) -> Iterator[UserSequence]:
        return (self[u] for u in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """int64 [num_users]: interactions per user."""
        return np.diff(self.offsets)

    @property
    def num_interactions(self) -> int:
        return int(self.offsets[-1])


@dataclasses.dataclass
class DatasetMeta:
    """What was imported and how.

    ``counts_raw`` are counted before any filtering (as the dataset's own README
    reports them), ``counts`` after it; both ``{"users", "items", "interactions"}``.
    ``time_source`` is ``"timestamp"``, ``"position"`` or, in a mix whose domains
    differ, ``"mixed"`` (see ``domains``).
    """

    name: str
    format: str
    time_source: str
    k_core: int
    counts_raw: dict
    counts: dict
    dropped: dict = dataclasses.field(default_factory=dict)
    bad_records: dict | None = None
    source: dict = dataclasses.field(default_factory=dict)
    domains: list = dataclasses.field(default_factory=list)
    sample: dict | None = None     # {"max_users", "seed", "users_before"} of a user subsample

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class InteractionData:
    """An imported dataset: sequences, item table and metadata."""

    sequences: Sequences
    items: ItemTable
    meta: DatasetMeta

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    @property
    def num_items(self) -> int:
        return self.items.num_items

    def __repr__(self) -> str:
        return (f"InteractionData({self.meta.name!r}: {self.num_users} users, {self.num_items} items, "
                f"{self.sequences.num_interactions} interactions, time={self.meta.time_source}, {self.items})")


@dataclasses.dataclass
class RawInteractions:
    """Interactions as a format reader produces them, ids coded in source order.

    ``user`` / ``item`` int64 [N] index ``user_ids`` / ``item_ids``; ``time`` float64 [N]
    or None (file order is the time). Per item code: ``item_text`` (str) and
    ``has_meta`` (bool; interactions with items without metadata are dropped).
    """

    user: np.ndarray
    item: np.ndarray
    time: np.ndarray | None
    user_ids: list[str]
    item_ids: list[str]
    item_text: list[str]
    has_meta: np.ndarray


def _counts(user: np.ndarray, item: np.ndarray) -> dict:
    return {"users": len(np.unique(user)), "items": len(np.unique(item)), "interactions": len(user)}


def _k_core(user: np.ndarray, item: np.ndarray, k: int, n_users: int, n_items: int) -> np.ndarray:
    """Boolean keep-mask [N] of the iterative k-core (users and items with >= k rows)."""
    keep = np.ones(len(user), dtype=bool)
    if k <= 1:
        return keep
    while True:
        u_ok = np.bincount(user[keep], minlength=n_users) >= k
        i_ok = np.bincount(item[keep], minlength=n_items) >= k
        new = keep & u_ok[user] & i_ok[item]
        if new.sum() == keep.sum():
            return new
        keep = new


def _sample_users(user: np.ndarray, max_users: int, seed: int) -> tuple[np.ndarray, int]:
    """Keep-mask [N] of the rows of ``max_users`` users drawn uniformly (without
    replacement) with ``seed`` from the users present; and how many were present.
    The first ``max_users`` of one seeded permutation: with the same seed, a smaller
    sample is contained in a larger one (and reuses its cached text vectors)."""
    present = np.unique(user)
    if max_users >= len(present):
        return np.ones(len(user), dtype=bool), len(present)
    chosen = np.random.default_rng(seed).permutation(present)[:max_users]
    return np.isin(user, chosen), len(present)


def process(raw: RawInteractions, *, name: str, fmt: str, k_core: int = 5,
            bad_records: dict | None = None, source: dict | None = None,
            max_users: int | None = None, sample_seed: int = 0) -> InteractionData:
    """Filter, sort and remap ``raw`` (see the module docstring) into :class:`InteractionData`.

    ``max_users``: keep a uniform sample of this many users, drawn with ``sample_seed``
    before the k-core filter (which may then drop some more); None keeps all.
    The item table has the item text but no text vectors yet (``text_dim == 0``).
    """
    if max_users is not None and max_users < 1:
        raise ValueError(f"{name}: max_users must be >= 1, got {max_users}")
    user = np.asarray(raw.user, dtype=np.int64)
    item = np.asarray(raw.item, dtype=np.int64)
    n_users, n_items = len(raw.user_ids), len(raw.item_ids)
    counts_raw = _counts(user, item)
    dropped = {}

    pos = np.arange(len(user), dtype=np.int64)
    has_meta = np.asarray(raw.has_meta, dtype=bool)
    meta_ok = has_meta[item]
    if not meta_ok.all():
        dropped["interactions_without_item_metadata"] = int((~meta_ok).sum())
    user, item, pos = user[meta_ok], item[meta_ok], pos[meta_ok]
    sample = None
    if max_users is not None:
        picked, users_before = _sample_users(user, max_users, sample_seed)
        if not picked.all():
            dropped["interactions_of_unsampled_users"] = int((~picked).sum())
        user, item, pos = user[picked], item[picked], pos[picked]
        sample = {"max_users": int(max_users), "seed": int(sample_seed), "users_before": int(users_before)}
    time = None if raw.time is None else np.asarray(raw.time, dtype=np.float64)[pos]
    core = _k_core(user, item, k_core, n_users, n_items)
    if not core.all():
        dropped["interactions_below_k_core"] = int((~core).sum())
    user, item, pos = user[core], item[core], pos[core]
    if time is not None:
        time = time[core]
    if len(user) == 0:
        raise DataError(f"{name}: no interaction survives the {k_core}-core filter")

    order = np.lexsort((pos, user)) if time is None else np.lexsort((pos, time, user))
    user, item = user[order], item[order]
    # Remap in source-id order: codes are already in that order.
    kept_items = np.unique(item)  # sorted codes
    new_item = np.zeros(n_items, dtype=np.int64)
    new_item[kept_items] = np.arange(1, len(kept_items) + 1)
    kept_users = np.unique(user)
    new_user = np.zeros(n_users, dtype=np.int64)
    new_user[kept_users] = np.arange(len(kept_users))
    u = new_user[user]
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=len(kept_users)), out=offsets[1:])
    if time is None:
        times = (np.arange(len(u)) - offsets[u] + 1).astype(np.float64)
        time_source = "position"
    else:
        times = time[order]
        time_source = "timestamp"
    sequences = Sequences(offsets, new_item[item], times,
                          [raw.user_ids[c] for c in kept_users], [name] * len(kept_users))
    r = len(kept_items) + 1
    items = ItemTable(
        text=np.zeros((r, 0), dtype=np.float32),
        text_mask=np.zeros(r, dtype=bool),
        item_ids=[""] + [raw.item_ids[c] for c in kept_items],
        item_text=[""] + [raw.item_text[c] for c in kept_items],
        domain=[""] + [name] * len(kept_items),
    )
    meta = DatasetMeta(
        name=name, format=fmt, time_source=time_source, k_core=k_core, counts_raw=counts_raw,
        counts={"users": len(kept_users), "items": len(kept_items), "interactions": len(u)},
        dropped=dropped, bad_records=bad_records, source=source or {}, sample=sample,
    )
    return InteractionData(sequences, items, meta)


def combine_domains(datasets: Sequence[InteractionData], names: Sequence[str] | None = None) -> InteractionData:
    """Mix several domains into one dataset, as multi-domain pre-training does.

    Users and items of each domain stay distinct: ids are prefixed with the domain
    name (``"office:123"``), item ids are offset so that domain ``d``'s items follow
    domain ``d-1``'s, users are numbered on in order. Text dims must agree; a domain
    without images gets zero rows with a False mask (image dims, where present, must
    agree).
    """
    if not datasets:
        raise DataError("combine_domains: no datasets given")
    names = list(names) if names is not None else [d.meta.name for d in datasets]
    if len(names) != len(datasets) or len(set(names)) != len(names):
        raise DataError(f"combine_domains: need one distinct name per dataset, got {names}")
    text_dims = {d.items.text_dim for d in datasets}
    if len(text_dims) != 1:
        raise DataError("combine_domains: text dims differ: "
                         + ", ".join(f"{n}={d.items.text_dim}" for n, d in zip(names, datasets)))
    image_dims = {d.items.image_dim for d in datasets if d.items.image is not None}
    if len(image_dims) > 1:
        raise DataError("combine_domains: image dims differ: "
                         + ", ".join(f"{n}={d.items.image_dim}" for n, d in zip(names, datasets)))
    image_dim = image_dims.pop() if image_dims else None

    offsets, items, times, user_ids, domains = [np.zeros(1, dtype=np.int64)], [], [], [], []
    text, text_mask = [datasets[0].items.text[:1]], [np.zeros(1, dtype=bool)]
    image, image_mask = [], [np.zeros(1, dtype=bool)]
    item_ids, item_text, item_domain = [""], [""], [""]
    encoders: dict[str, set] = {"text": set(), "image": set()}
    item_base = 0
    for name, d in zip(names, datasets):
        s, t = d.sequences, d.items
        offsets.append(s.offsets[1:] + offsets[-1][-1])
        items.append(s.items + item_base)
        times.append(s.times)
        user_ids += [f"{name}:{x}" for x in s.user_ids]
        domains += [name] * len(s)
        text.append(t.text[1:])
        text_mask.append(t.text_mask[1:])
        image_mask.append(t.image_mask[1:])
        if image_dim is not None:
            image.append(t.image[1:] if t.image is not None else np.zeros((t.num_items, image_dim), np.float32))
        item_ids += [f"{name}:{x}" for x in t.item_ids[1:]]
        item_text += list(t.item_text[1:])
        item_domain += [name] * t.num_items
        for m, seen in encoders.items():
            enc = getattr(t, f"{m}_encoder")
            if enc:
                seen.add(enc)
        item_base += t.num_items

    if image_dim is not None:
        image.insert(0, np.zeros((1, image_dim), np.float32))
    table = ItemTable(
        text=np.concatenate(text), text_mask=np.concatenate(text_mask),
        image=np.concatenate(image) if image_dim is not None else None,
        image_mask=np.concatenate(image_mask),
        item_ids=item_ids, item_text=item_text, domain=item_domain,
        text_encoder=" + ".join(sorted(encoders["text"])) or None,
        image_encoder=" + ".join(sorted(encoders["image"])) or None,
    )
    seqs = Sequences(np.concatenate(offsets), np.concatenate(items), np.concatenate(times), user_ids, domains)
    sources = {d.meta.time_source for d in datasets}
    total = lambda key, attr: sum(getattr(d.meta, attr)[key] for d in datasets)
    meta = DatasetMeta(
        name="+".join(names), format="mix",
        time_source=sources.pop() if len(sources) == 1 else "mixed",
        k_core=min(d.meta.k_core for d in datasets),
        counts_raw={k: total(k, "counts_raw") for k in ("users", "items", "interactions")},
        counts={"users": len(seqs), "items": table.num_items, "interactions": seqs.num_interactions},
        domains=[dict(d.meta.to_dict(), name=n) for n, d in zip(names, datasets)],
    )
    return InteractionData(seqs, table, meta)
