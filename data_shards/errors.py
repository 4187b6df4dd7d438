"""Errors of the data pipeline and the ``--skip-bad`` bookkeeping.

Every error names *where* (file or shard URL, and the record: line number, user,
item or tar member) and *why*, so that a bad input can be found without a debugger.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from mmm4rec.errors import UserError, one_line

__all__ = ["BadRecord", "BadRecords", "DataError", "ManifestError", "ShardError", "StorageError", "one_line"]


class DataError(UserError, ValueError):
    """An input file is missing or holds a record that cannot be used.

    ``where`` is the file (and record, e.g. ``Scientific.test.inter:17``); ``why`` says
    what is wrong with it.
    """

    def __init__(self, where: str, why: str | None = None):
        # one-argument form: a finished message (how torch re-raises a worker's error)
        self.where = where if why is not None else ""
        self.why = why if why is not None else where
        super().__init__(f"{where}: {why}" if why is not None else where)


class ShardError(DataError):
    """A shard is unreadable, truncated, corrupt or differs from its manifest checksum."""


class ManifestError(DataError):
    """``manifest.json`` is missing, malformed or from a newer schema."""


class StorageError(DataError):
    """The object store cannot be used: endpoint unreachable (at start, or for longer than
    ``retry_seconds`` mid-run), no or wrong credentials, no such bucket. ``where`` is the
    URL, ``why`` the cause (``data_shards.storage``)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
    where: str  #: file and record, e.g. ``ratings.csv:12``
    why: str


class BadRecords:
    """Either raises on the first bad record (default) or, with ``skip=True``, records
    it and lets the caller skip it; :meth:`summary` reports how many, where and why."""

    def __init__(self, skip: bool = False, keep: int = 20):
        self.skip = skip
        self.keep = keep  # how many examples to keep for the report
        self.count = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: list[BadRecord] = []

    def __call__(self, where: str, why: str, reason: str | None = None) -> None:
        """Report a bad record: raise :class:`DataError`, or count it when skipping.

        ``reason`` is a short category for the summary (default: ``why``).
        """
        if not self.skip:
            raise DataError(where, why)
        self.count += 1
        self.by_reason[reason or why] += 1
        if len(self.examples) < self.keep:
            self.examples.append(BadRecord(where, why))

    def summary(self) -> dict:
        """JSON-ready report: ``{"skipped", "by_reason", "examples": [{"where","why"}]}``."""
        return {
            "skipped": self.count,
            "by_reason": dict(self.by_reason),
            "examples": [dataclasses.asdict(e) for e in self.examples],
        }
