"""``SequenceLoader``: shards on any fsspec URL -> training / evaluation batches.

How an epoch is cut (a pure function of the manifest, the loader's arguments and
the epoch, so every rank and worker computes the same plan without talking):

1. The split's samples are enumerated shard by shard, each shard's users in stored
   order and each user's targets in order (``samples.sample_index``). With
   ``shuffle``, the shard order is a permutation drawn from ``(seed, epoch)``.
2. That stream of ``T`` samples is cut into ``world_size`` contiguous ranges whose
   sizes differ by at most one, and each rank's range into ``max(num_workers, 1)``
   worker *slots* the same way. Every sample of the epoch is in exactly one slot.
   A slot reads only the shards its range touches.
3. A slot groups its shard pieces into chunks of at least ``shuffle_buffer`` samples
   and (with ``shuffle``) permutes each chunk with a generator seeded by
   ``(seed, epoch, rank, slot, chunk)``; histories are cut on the fly (last
   ``max_len`` items before the target) and batched to ``batch_size`` rows.
4. Every rank yields the same number of batches: a slot's last partial batch is
   filled with weight-0 rows, and a slot that has fewer batches than the same slot
   of another rank appends all-padding batches (``len(loader)`` is that count, and it
   does not change between epochs). With ``drop_last`` every slot instead stops
   after the smallest full-batch count of that slot over the ranks.

With ``train_targets: all`` (``ShardsConfig``) the split's samples are those of
``samples.sample_index(..., "all", monitor_mask(users, monitor_users))``; the per-shard
counts the plan needs are then computed from the shards (one read of each when
``monitor_users > 0``, once per process) instead of taken from the manifest, whose
counts are leave-one-out's. Everything else above holds unchanged.

Resuming on another world size (same global batch): the epoch in progress keeps the
layout it began with; each new rank reads the old ranks' batches its rows come from and
takes its rows of the global batch (``_load_resharded``), so that the rest of the epoch
is the same global batches, every sample exactly once. The next epoch uses the new layout.

Resuming: the loader counts, per slot, the batches it has handed out.
``state_dict()`` saves them; after ``load_state_dict()`` each slot skips its first
``k * batch_size`` samples (whole chunks are skipped without being read), so the rest of
the epoch is delivered exactly once, and the workers' slots are rotated so that the
DataLoader's round-robin (which restarts at worker 0) continues the uninterrupted
run's batch order exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmm4rec.config import ConfigError
from mmm4rec.contract import Batch

from .config import ShardsConfig
from .errors import ShardError
from .samples import SPLITS, collate_index, monitor_mask, num_samples_array, sample_index
from .shards import decode_sequence, read_manifest, read_shard_records
from .storage import Store

__all__ = ["SequenceLoader"]

_DEFAULTS = ShardsConfig(url="-")

#: per-shard sample counts under ``train_targets: all`` with monitor users, by
#: (shard sha256, monitor fraction): {split: samples}; one read of a shard per process
_ALL_COUNTS: dict[tuple[str, float], dict[str, int]] = {}


def _ranges(total: int, parts: int) -> np.ndarray:
    """int64 [parts+1] boundaries of ``parts`` contiguous ranges of ``total`` (sizes differ by <= 1)."""
    return np.array([(p * total) // parts for p in range(parts + 1)], dtype=np.int64)


class _Chunk:
    """Samples over CSR sequences: ``items``/``times`` [N], ``offsets`` [U+1], ``users`` [U];
    sample ``r`` is target index ``target[r]`` of sequence ``seq[r]``."""

    __slots__ = ("items", "offsets", "seq", "target", "times", "users")

    def __init__(self, items, times, offsets, users, seq, target):
        self.items, self.times, self.offsets, self.users = items, times, offsets, users
        self.seq, self.target = seq, target

    def __len__(self) -> int:
        return len(self.seq)

    def take(self, sel) -> _Chunk:
        return _Chunk(self.items, self.times, self.offsets, self.users, self.seq[sel], self.target[sel])

    @staticmethod
    def concat(parts: list[_Chunk]) -> _Chunk:
        if len(parts) == 1:
            return parts[0]
        base_items = np.cumsum([0] + [len(p.items) for p in parts[:-1]])
        base_users = np.cumsum([0] + [len(p.users) for p in parts[:-1]])
        return _Chunk(
            np.concatenate([p.items for p in parts]),
            np.concatenate([p.times for p in parts]),
            np.concatenate([np.zeros(1, np.int64)] + [p.offsets[1:] + b for p, b in zip(parts, base_items)]),
            np.concatenate([p.users for p in parts]),
            np.concatenate([p.seq + b for p, b in zip(parts, base_users)]),
            np.concatenate([p.target for p in parts]),
        )


def _next_slot(consumed: list[int]) -> int:
    """The slot a round-robin over slots serves next, given the batches each has served:
    the first slot that is one batch behind slot 0 (0 when all are level)."""
    for slot, count in enumerate(consumed):
        if count < consumed[0]:
            return slot
    return 0


class _SlotStream(IterableDataset):
    """What one DataLoader worker runs: the batches of its slot, tagged ``(slot, batch)``.

    Worker ``w`` serves slot ``(w + rotation) % num_slots``: the DataLoader always starts
    its round-robin at worker 0, so a resumed epoch rotates the slots to continue the
    uninterrupted run's order exactly.
    """

    def __init__(self, loader: SequenceLoader, epoch: int, skip: list[int], rotation: int = 0):
        self.loader = loader
        self.epoch = epoch
        self.skip = skip
        self.rotation = rotation

    def __iter__(self):
        info = get_worker_info()
        slot = 0 if info is None else (info.id + self.rotation) % self.loader.num_slots
        for batch in self.loader._slot_batches(self.epoch, slot, self.skip[slot]):
            yield slot, batch


class _ReshardedEpoch:
    """The rest of an epoch begun by another layout: this rank's rows ``[offset, offset +
    rows)`` of the concatenated batches of ``views`` (consecutive old ranks, in lockstep)."""

    def __init__(self, views: list[SequenceLoader], offset: int, rows: int):
        self.views, self.offset, self.rows = views, offset, rows

    def __iter__(self) -> Iterator[Batch]:
        for parts in zip(*self.views):
            yield Batch(**{k: torch.cat([p[k] for p in parts])[self.offset:self.offset + self.rows]
                           for k in parts[0]})


class SequenceLoader:
    """Iterable of batches (``mmm4rec.contract.Batch``, docs/architecture.md) streamed from a shard set.

    Args:
        cfg: a :class:`ShardsConfig` (the ``data:`` section), or the shard set's URL (with
            ``ShardsConfig``'s defaults).
        split: ``"train"`` (every prefix of every user), ``"valid"`` / ``"test"`` (one
            sample per user, each user on exactly one rank); which prefixes and users,
            per the config's ``train_targets`` / ``monitor_users``.
        rank / world_size: this process's place in the job.
        storage_options: fsspec options (S3 endpoint/credentials), else the config's.
        verify: check each shard's sha256 against the manifest when read (else the
            config's ``verify_checksums``).
        **overrides: fields of :class:`ShardsConfig` for this loader (``batch_size``,
            ``max_len``, ``num_workers``, ``seed``, ``shuffle``, ``drop_last``,
            ``shuffle_buffer``, ...). Not overridden: valid/test read ``eval_batch_size``
            when set, and are never shuffled nor cut (``shuffle``/``drop_last`` apply to
            train).

    The epoch is set with :meth:`set_epoch`; ``len(loader)`` is the number of batches
    every rank yields per epoch.
    """

    def __init__(self, cfg: ShardsConfig | str, split: str = "train", *, rank: int = 0, world_size: int = 1,
                 storage_options: Mapping[str, Any] | None = None, verify: bool | None = None, **overrides: Any):
        given = cfg if isinstance(cfg, ShardsConfig) else dataclasses.replace(_DEFAULTS, url=str(cfg))
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ShardsConfig)})
        if unknown:
            raise TypeError(f"SequenceLoader: {unknown} are not ShardsConfig fields")
        conf = dataclasses.replace(given, **overrides)
        url = conf.url
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
        self.split = split
        eval_bs = conf.eval_batch_size if split != "train" and "batch_size" not in overrides else None
        self.batch_size = int(eval_bs or conf.batch_size)
        self.max_len = int(conf.max_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(conf.num_workers)
        self.seed = int(conf.seed)
        self.shuffle = bool(conf.shuffle if "shuffle" in overrides else conf.shuffle and split == "train")
        self.drop_last = bool(conf.drop_last if "drop_last" in overrides else conf.drop_last and split == "train")
        self.shuffle_buffer = int(conf.shuffle_buffer)
        self.verify = bool(conf.verify_checksums if verify is None else verify)
        if min(self.batch_size, self.max_len, self.shuffle_buffer) < 1 or min(self.num_workers, self.seed) < 0:
            raise ValueError("batch_size, max_len and shuffle_buffer must be >= 1, num_workers and seed >= 0")
        if storage_options is None and isinstance(cfg, ShardsConfig):
            storage_options = conf.storage.to_options()
        self.store = Store(url, storage_options, retry_seconds=conf.storage.retry_seconds)   # outages: retried
        self.manifest = read_manifest(url, store=self.store)
        self._shards = self.manifest["sequences"]["shards"]
        self.train_targets = str(conf.train_targets)
        self.monitor_users = float(conf.monitor_users)
        if self.train_targets not in ("loo", "all") or not 0.0 <= self.monitor_users < 1.0:
            raise ValueError(f"train_targets must be 'loo' or 'all' (got {self.train_targets!r}) and monitor_users "
                             f"in [0, 1) (got {self.monitor_users})")
        if self.train_targets == "all" and split != "train" and self.monitor_users == 0:
            raise ConfigError(f"data.train_targets: all trains on every prefix of every user, so with "
                              f"data.monitor_users: 0 no {split} sample is left that was not trained on; set "
                              f"data.monitor_users (e.g. 0.02: that fraction of the users is held out for "
                              f"valid/test) or use train_targets: loo")
        self._counts = self._shard_counts(split)
        self.num_samples = int(self._counts.sum())
        self.num_slots = max(self.num_workers, 1)
        self._set_layout(self.rank, self.world_size, self.batch_size)
        self._epoch = 0
        self._consumed = [0] * self.num_slots
        self._resumed = False
        self._resharded: _ReshardedEpoch | None = None

    def _shard_counts(self, split: str) -> np.ndarray:
        """int64 [shards]: the split's samples in every shard (``train_targets`` applied)."""
        if self.train_targets == "loo":
            return np.array([s["samples"][split] for s in self._shards], dtype=np.int64)
        if self.monitor_users == 0:   # train only (valid/test are refused): n - 1 per user
            return np.array([s["interactions"] - s["users"] for s in self._shards], dtype=np.int64)
        counts = []
        for k, entry in enumerate(self._shards):
            key = (str(entry["sha256"]), self.monitor_users)
            if key not in _ALL_COUNTS:
                lengths, users = self._read_shard(k)[1:3]
                mon = monitor_mask(users, self.monitor_users)
                _ALL_COUNTS[key] = {s: int(num_samples_array(lengths, s, "all", mon).sum()) for s in SPLITS}
            counts.append(_ALL_COUNTS[key][split])
        return np.array(counts, dtype=np.int64)

    def _set_layout(self, rank: int, world_size: int, batch_size: int) -> None:
        """Place this loader at ``rank`` of ``world_size`` with ``batch_size`` rows per batch."""
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        # [world_size, num_slots] samples of every slot of every rank (epoch-independent).
        rank_bounds = _ranges(self.num_samples, self.world_size)
        self._slot_samples = np.array([np.diff(_ranges(int(n), self.num_slots)) for n in np.diff(rank_bounds)])
        per_slot = self._slot_samples
        if self.drop_last:
            self._slot_batches_target = (per_slot // self.batch_size).min(axis=0)
        else:
            self._slot_batches_target = (-(-per_slot // self.batch_size)).max(axis=0)

    def _view(self, rank: int, world_size: int, batch_size: int) -> SequenceLoader:
        """The same loader (shards, settings, epoch) as rank ``rank`` of another layout."""
        view = copy.copy(self)
        view._set_layout(rank, world_size, batch_size)
        view._consumed = [0] * view.num_slots
        view._resumed = False
        view._resharded = None
        return view

    # ------------------------------------------------------------------ public
    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def url(self) -> str:
        return self.store.url

    def __len__(self) -> int:
        """Batches per epoch; while finishing an epoch begun by another layout, that layout's."""
        if self._resharded is not None:
            return len(self._resharded.views[0])
        return int(self._slot_batches_target.sum())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (order). Moving to another epoch starts it from its beginning."""
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._consumed = [0] * self.num_slots
            self._resumed = False
            self._resharded = None

    def _fingerprint(self) -> str:
        key = {"shards": [s["sha256"] for s in self._shards], "split": self.split, "batch_size": self.batch_size,
               "max_len": self.max_len, "rank": self.rank, "world_size": self.world_size,
               "slots": self.num_slots, "seed": self.seed, "shuffle": self.shuffle,
               "shuffle_buffer": self.shuffle_buffer, "drop_last": self.drop_last}
        if self.train_targets != "loo":   # (absent at the default: older states still resume)
            key.update(train_targets=self.train_targets, monitor_users=self.monitor_users)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """``{"epoch", "batches": [per slot], "fingerprint", "rank", "world_size", "batch_size"}``:
        where this rank is in the epoch, and the layout (ranks x batch size) the epoch runs in."""
        if self._resharded is not None:
            return self._resharded.views[0].state_dict()
        return {"epoch": self._epoch, "batches": list(self._consumed), "fingerprint": self._fingerprint(),
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; the next iteration yields exactly the rest of that epoch.

        ``state`` may come from another layout (world size and per-rank batch size) with
        the same global batch: see :meth:`_load_resharded`.
        """
        layout = (int(state.get("world_size", self.world_size)), int(state.get("batch_size", self.batch_size)))
        if layout != (self.world_size, self.batch_size):
            self._load_resharded(state, *layout)
            return
        # Ranks step in lockstep (every rank yields the same batches per slot), so another
        # rank's state of the same layout places this rank too.
        saved_rank = int(state.get("rank", self.rank))
        ref = self if saved_rank == self.rank else self._view(saved_rank, self.world_size, self.batch_size)
        if not 0 <= saved_rank < self.world_size or state.get("fingerprint") != ref._fingerprint():
            raise ValueError("loader state was saved with different shards or loader settings (split, batch size, "
                             "max_len, rank, world size, workers, seed, shuffle); it cannot be resumed exactly")
        batches = [int(b) for b in state["batches"]]
        if any(b < 0 or b > t for b, t in zip(batches, self._slot_batches_target)):
            raise ValueError(f"loader state batches {batches} exceed the epoch's {self._slot_batches_target.tolist()}")
        self._epoch = int(state["epoch"])
        self._consumed = batches
        self._resumed = True
        self._resharded = None

    def _load_resharded(self, state: Mapping[str, Any], world_size: int, batch_size: int) -> None:
        """Finish an epoch that ``world_size`` ranks of ``batch_size`` rows began.

        The epoch keeps the layout it began with, so that no sample is lost or repeated:
        its global batch ``s`` is the concatenation of every old rank's batch ``s``
        (``G = world_size * batch_size`` rows). Ranks step in lockstep, so one rank's
        per-slot position is every rank's. This rank (of the new layout) takes rows
        ``[rank * B, (rank + 1) * B)`` of each remaining global batch (``B`` its batch
        size; ``G`` must equal ``world_size * B``), read through views of the old ranks
        those rows come from. The next epoch uses this loader's own layout.
        """
        global_batch = world_size * batch_size
        if global_batch != self.world_size * self.batch_size:
            raise ValueError(f"loader state was saved by {world_size} ranks x {batch_size} rows (global batch "
                             f"{global_batch}); this loader has {self.world_size} x {self.batch_size} = "
                             f"{self.world_size * self.batch_size}: the global batch must stay the same to continue "
                             f"the epoch (batch size {global_batch // self.world_size} per rank"
                             + (")" if global_batch % self.world_size == 0 else
                                f", which is not a whole number: {global_batch} rows cannot be split "
                                f"over {self.world_size} ranks)"))
        if "rank" not in state:
            raise ValueError("loader state names no rank: it predates resuming on another world size")
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        views = []
        for v in range(lo // batch_size, (hi - 1) // batch_size + 1):
            view = self._view(v, world_size, batch_size)
            view.load_state_dict(state)     # checks the settings; any old rank's position is every rank's
            views.append(view)
        self._resharded = _ReshardedEpoch(views, lo - views[0].rank * batch_size, self.batch_size)
        self._epoch = int(state["epoch"])

    def __iter__(self) -> Iterator[Batch]:
        if self._resharded is not None:
            yield from self._resharded
            return
        done = all(c >= t for c, t in zip(self._consumed, self._slot_batches_target))
        if done and not self._resumed:  # a finished epoch starts over
            self._consumed = [0] * self.num_slots
        self._resumed = False
        stream = _SlotStream(self, self._epoch, list(self._consumed), _next_slot(self._consumed))
        if self.num_workers == 0:
            for slot, batch in stream:
                self._consumed[slot] += 1
                yield batch
            return
        # the generator only seeds the workers' base seed; it keeps the DataLoader from
        # drawing it from (and so shifting) the global RNG that training uses
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self._epoch)
        batches = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=generator))
        try:
            for slot, batch in batches:
                self._consumed[slot] += 1
                yield Batch.of(batch)   # the DataLoader hands a Batch over as a plain dict
        finally:
            # Stop the workers now, also when the caller stops early or an error surfaces;
            # left to garbage collection, their shutdown can stall for seconds.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # ------------------------------------------------------------------ plan
    def _slot_pieces(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """``(shard, lo, hi)``: the slot's sample ranges within shards, in stream order."""
        order = (np.random.default_rng([self.seed, epoch]).permutation(len(self._shards)) if self.shuffle
                 else np.arange(len(self._shards)))
        rank_start = int(self._slot_samples[:self.rank].sum())
        a = rank_start + int(self._slot_samples[self.rank, :slot].sum())
        b = a + int(self._slot_samples[self.rank, slot])
        pieces, pos = [], 0
        for s in order:
            c = int(self._counts[s])
            lo, hi = max(a, pos), min(b, pos + c)
            if lo < hi:
                pieces.append((int(s), lo - pos, hi - pos))
            pos += c
            if pos >= b:
                break
        return pieces

    def _chunks(self, pieces):
        """Group pieces into chunks of >= shuffle_buffer samples (one piece each without shuffle)."""
        chunks, cur, n = [], [], 0
        for p in pieces:
            cur.append(p)
            n += p[2] - p[1]
            if not self.shuffle or n >= self.shuffle_buffer:
                chunks.append(cur)
                cur, n = [], 0
        if cur:
            chunks.append(cur)
        return chunks

    def _read_shard(self, shard: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
        """(records, lengths int64 [U], user indices int64 [U]) of a sequence shard."""
        entry = self._shards[shard]
        where = self.store.display(entry["path"])
        recs = [decode_sequence(r, where, self.num_items) for r in read_shard_records(self.store, entry, self.verify)]
        return (recs, np.array([len(r["items"]) for r in recs], dtype=np.int64),
                np.array([int(r["user"]) for r in recs], dtype=np.int64))

    def _read_piece(self, shard: int, lo: int, hi: int) -> _Chunk:
        entry = self._shards[shard]
        recs, lengths, users = self._read_shard(shard)
        mon = monitor_mask(users, self.monitor_users) if self.train_targets == "all" else None
        seq, target = sample_index(lengths, self.split, self.train_targets, mon)
        if len(seq) != self._counts[shard]:
            raise ShardError(self.store.display(entry["path"]),
                             f"holds {len(seq)} {self.split} samples ({self.train_targets}), the manifest says "
                             f"{self._counts[shard]}")
        offsets = np.zeros(len(recs) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return _Chunk(
            np.concatenate([r["items"] for r in recs]) if recs else np.zeros(0, np.int64),
            np.concatenate([r["times"] for r in recs]) if recs else np.zeros(0, np.float64),
            offsets, users, seq[lo:hi], target[lo:hi])

    def _slot_batches(self, epoch: int, slot: int, skip_batches: int) -> Iterator[Batch]:
        """The batches of one slot, starting after its first ``skip_batches``."""
        B, target_batches = self.batch_size, int(self._slot_batches_target[slot])
        emitted = skip_batches
        skip = skip_batches * B
        pending: _Chunk | None = None
        pos = 0  # first sample of the current chunk within the slot's stream
        for c, group in enumerate(self._chunks(self._slot_pieces(epoch, slot))):
            size = sum(hi - lo for _, lo, hi in group)
            if pos + size <= skip:  # resume: skipped without reading
                pos += size
                continue
            chunk = _Chunk.concat([self._read_piece(*p) for p in group])
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, self.rank, slot, c])
                chunk = chunk.take(rng.permutation(len(chunk)))
            if skip > pos:
                chunk = chunk.take(slice(skip - pos, None))
            pos += size
            if pending is not None:
                chunk = _Chunk.concat([pending, chunk])
            full = len(chunk) // B
            for i in range(full):
                if emitted >= target_batches:
                    return
                yield self._collate(chunk.take(slice(i * B, (i + 1) * B)))
                emitted += 1
            pending = chunk.take(slice(full * B, None)) if len(chunk) % B else None
        if pending is not None and emitted < target_batches and not self.drop_last:
            yield self._collate(pending)
            emitted += 1
        empty = _Chunk(np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(1, np.int64),
                       np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        while emitted < target_batches:  # keep ranks in step
            yield self._collate(empty)
            emitted += 1

    def _collate(self, chunk: _Chunk) -> Batch:
        return collate_index(chunk.items, chunk.times, chunk.offsets, chunk.users, chunk.seq, chunk.target,
                             self.max_len, pad_to=self.batch_size)

    def __repr__(self) -> str:
        return (f"SequenceLoader({self.url!r}, split={self.split}, {self.num_samples} samples, "
                f"rank {self.rank}/{self.world_size}, {self.num_slots} slot(s), batch {self.batch_size}, "
                f"{len(self)} batches/epoch)")
