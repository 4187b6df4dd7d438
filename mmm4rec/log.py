"""Logging of the project: modules log with ``logging.getLogger(__name__)``; an entry point
calls :func:`setup_logging` once.

* Records go to **stderr** as ``[mmm4rec] message`` (``extra={"tag": "storage"}`` changes
  the tag; ``tag=""`` prints the message alone), through ``tqdm.write`` so that a progress
  bar stays intact. Stdout is left to what a command produces (tables, JSON, YAML).
* :class:`RankZeroFilter`: in a distributed run only rank 0 speaks (``RANK`` from the
  launcher), except records logged with ``extra={"all_ranks": True}`` (a rank's own
  storage outage, say).

Without :func:`setup_logging` (the packages used as a library), records follow the
application's own logging configuration. A light leaf module: it imports nothing of the
project.
"""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["PACKAGES", "RankZeroFilter", "process_rank", "setup_logging"]

#: the loggers :func:`setup_logging` configures (the project's top-level packages)
PACKAGES = ("mmm4rec", "data_shards", "dist")


def process_rank() -> int:
    """This process's rank in a distributed run (``RANK``; 0 outside one)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Passes the records of rank 0, and of any rank those marked ``all_ranks``."""

    def __init__(self, rank: int | None = None):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank() if self.rank is None else self.rank
        return rank == 0 or bool(getattr(record, "all_ranks", False))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = getattr(record, "tag", "mmm4rec")
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"[{tag}] {text}" if tag else text


class _Handler(logging.Handler):
    """stderr as it is at each record (pytest's capture swaps it), through tqdm.write."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=stream)
            except ImportError:
                stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- logging must never raise
            self.handleError(record)


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Configure the project's loggers (idempotent): stderr, ``[tag] message``, rank 0 only
    (``rank``: this process's, default ``RANK`` at each record)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for h in [h for h in logger.handlers if isinstance(h, _Handler)]:
            logger.removeHandler(h)
        handler = _Handler()
        handler.setFormatter(_Formatter())
        handler.addFilter(RankZeroFilter(rank))
        logger.addHandler(handler)
        logger.propagate = False
