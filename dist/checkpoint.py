"""Checkpoints: atomic, resumable, on local disk or any fsspec URL, never unpickled blindly.

A checkpoint is a directory ``<root>/<tag>/`` (tag ``step_00001234``)::

    engine/                       DeepSpeed: engine.save_checkpoint(tag="engine")
                                  (module, ZeRO partitions, optimizer, LR schedule)
    ranks/rank_00000.safetensors  this rank's trainable table rows + fused optimizer
                                  state (keyed by first global row), torch RNG state
    ranks/rank_00000.json         table shard index, loader position, python/numpy RNG
    config.yaml                   the resolved experiment config
    model_config.json             {"model_type", "config"}: what an export needs
    checkpoint.json               trainer state (epoch, step, early stopping, history);
                                  written last: its presence marks a complete checkpoint
    <root>/latest                 the tag of the newest complete checkpoint

Atomic commit:

* local path: every rank writes into ``<root>/.tmp-<tag>/`` and fsyncs its files;
  after a barrier rank 0 fsyncs, renames the directory to ``<tag>`` (atomic on POSIX),
  fsyncs the parent, then replaces ``latest`` (write ``latest.tmp``, fsync, rename).
  A crash at any point leaves ``latest`` naming the previous complete checkpoint.
* fsspec URL (``s3://...``): object stores have no rename, so every rank stages its
  files on local disk, uploads them under ``<url>/<tag>/``, and rank 0 writes
  ``checkpoint.json`` and then ``latest`` last: a checkpoint is visible only once
  its pointer is, and a half-uploaded one is never named by ``latest``.

Loading never unpickles arbitrary objects: our own files are safetensors and JSON;
DeepSpeed's ``*.pt`` files are read with :func:`safe_load` (``torch.load(weights_only=True)``
allowlisting exactly the three plain data types DeepSpeed pickles into them): by our
own code, by the engine's checkpoint engine (:func:`use_safe_checkpoint_engine`, set
when the engine is built) and by DeepSpeed's fp32 utility (:func:`safe_zero_to_fp32`).
Nothing patches ``torch.load`` itself.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_shards.errors import DataError

__all__ = ["CheckpointStore", "CheckpointDir", "safe_load", "use_safe_checkpoint_engine", "safe_zero_to_fp32",
           "tag_for_step", "ENGINE_TAG"]

ENGINE_TAG = "engine"
LATEST = "latest"
STATE_FILE = "checkpoint.json"
_TAG_RE = re.compile(r"^step_\d{8,}$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


# ------------------------------------------------------------------------ safe load
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path, map_location=None, **kwargs):
    """``torch.load(weights_only=True)`` allowing only DeepSpeed's ``LossScaler``,
    ``ZeroStageEnum`` and ``fragment_address`` besides tensors and plain data: a
    tampered file raises instead of running code."""
    kwargs.pop("weights_only", None)   # DeepSpeed passes False
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)


def use_safe_checkpoint_engine(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with :func:`safe_load`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location)

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(current).__name__}")
    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


class _SafeTorch:
    """The ``torch`` module as ``deepspeed.utils.zero_to_fp32`` sees it in
    :func:`safe_zero_to_fp32`: everything torch's, ``load`` = :func:`safe_load`."""

    load = staticmethod(safe_load)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def safe_zero_to_fp32() -> Iterator[Any]:
    """``deepspeed.utils.zero_to_fp32`` (which calls ``torch.load(weights_only=False)``)
    reading through :func:`safe_load`: only that module's name ``torch`` is replaced, for
    the block; ``torch.load`` stays as it is for everyone else."""
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    with mock.patch.object(zero_to_fp32, "torch", _SafeTorch()):
        yield zero_to_fp32


# ------------------------------------------------------------------------ fs helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``.

    Other ranks may be writing into the same staging tree at the same time (their
    temp files are renamed into place under our feet): a file that vanished is skipped,
    since its writer syncs it, and rank 0 syncs the whole tree again after the barrier
    that ends the writes (``CheckpointStore.commit``).
    """
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                _fsync_file(Path(dirpath) / f)
            except FileNotFoundError:
                continue
        _fsync_dir(Path(dirpath))


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def is_url(location: str) -> bool:
    return "://" in str(location)


# ------------------------------------------------------------------------ the store
class CheckpointStore:
    """The checkpoints of one run, under a local directory or an fsspec URL.

    Collective methods (``begin``/``commit``) must be called by every rank.
    """

    def __init__(self, location: str, env, keep_last: int = 2, storage_options: dict | None = None,
                 retry_seconds: float | None = None):
        self.location = str(location).rstrip("/")
        self.env = env
        self.keep_last = int(keep_last)
        self.remote = is_url(self.location)
        self.storage_options = dict(storage_options or {})
        self.retry_seconds = retry_seconds   # outages of a remote store are retried this long (storage.py)
        self._fs = None
        if not self.remote:
            self.root = Path(self.location)

    # --- fsspec
    @property
    def fs(self):
        if self._fs is None:
            from data_shards.storage import DEFAULT_RETRY_SECONDS, open_checked, storage_options_for

            # remote calls retry outages; a bad endpoint, credentials or bucket fails here (StorageError)
            retry = DEFAULT_RETRY_SECONDS if self.retry_seconds is None else self.retry_seconds
            self._fs, self._root = open_checked(self.location, storage_options_for(self.location,
                                                                                   self.storage_options), retry)
        return self._fs

    def _rpath(self, *parts: str) -> str:
        self.fs  # noqa: B018  (resolves _root)
        return "/".join([self._root.rstrip("/"), *parts])

    # --- queries (any rank, no collectives)
    def latest(self) -> str | None:
        """Tag of the newest complete checkpoint, or None."""
        try:
            if self.remote:
                if not self.fs.exists(self._rpath(LATEST)):
                    return None
                tag = self.fs.cat_file(self._rpath(LATEST)).decode().strip()
            else:
                p = self.root / LATEST
                if not p.is_file():
                    return None
                tag = p.read_text().strip()
        except FileNotFoundError:
            return None
        if not _TAG_RE.match(tag):
            raise DataError(f"{self.location}/{LATEST}: does not name a checkpoint ({tag!r})")
        return tag

    def tags(self) -> list[str]:
        if self.remote:
            if not self.fs.exists(self._rpath()):
                return []
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._rpath(), detail=False)]
        else:
            names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        return sorted(n for n in names if _TAG_RE.match(n))

    def has_checkpoints(self) -> bool:
        return self.latest() is not None or bool(self.tags())

    def describe(self, tag: str) -> str:
        return f"{self.location}/{tag}"

    # --- writing (collective)
    def begin(self, tag: str) -> Path:
        """A fresh local directory this rank writes the checkpoint into."""
        env = self.env
        if self.remote:
            stage = Path(tempfile.mkdtemp(prefix=f"mmm4rec-ckpt-{tag}-r{env.rank}-"))
            return stage
        tmp = self.root / f".tmp-{tag}"
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)   # left by a crash mid-write
            tmp.mkdir()
        env.barrier()
        return tmp

    def commit(self, tag: str, staged: Path, state: dict, protect: tuple[str, ...] = ()) -> None:
        """Make the checkpoint visible and the ``latest`` pointer name it; then drop old
        checkpoints beyond ``keep_last`` (never one named in ``protect``)."""
        env = self.env
        if self.remote:
            self._upload(staged, tag)
            env.barrier()
            if env.is_main:
                self.fs.pipe_file(self._rpath(tag, STATE_FILE), json.dumps(state, indent=1).encode())
                self.fs.pipe_file(self._rpath(LATEST), tag.encode())
            shutil.rmtree(staged, ignore_errors=True)
        else:
            fsync_tree(staged)     # what this rank wrote (and any other rank's finished files)
            env.barrier()
            if env.is_main:
                write_atomic(staged / STATE_FILE, json.dumps(state, indent=1).encode())
                fsync_tree(staged)
                final = self.root / tag
                if final.exists():   # e.g. re-saved after a crash between rename and pointer update
                    trash = self.root / f".trash-{tag}-{time.time_ns()}"
                    os.replace(final, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(staged, final)
                _fsync_dir(self.root)
                write_atomic(self.root / LATEST, tag.encode())
        if env.is_main:
            self._retain(tag, protect)
        env.barrier()

    def _upload(self, staged: Path, tag: str) -> None:
        from fsspec.implementations.local import LocalFileSystem

        local = isinstance(self.fs, LocalFileSystem)   # file:// URLs: object stores need no directories
        for dirpath, _, files in os.walk(staged):
            for f in files:
                src = Path(dirpath) / f
                dst = self._rpath(tag, src.relative_to(staged).as_posix())
                if local:
                    self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(src), dst)

    def _retain(self, newest: str, protect: tuple[str, ...]) -> None:
        tags = [t for t in self.tags() if t != newest]
        keep = set(tags[-(self.keep_last - 1):]) if self.keep_last > 1 else set()
        keep |= {t for t in protect if t}
        for t in tags:
            if t in keep:
                continue
            if self.remote:
                with contextlib.suppress(FileNotFoundError):   # a retried delete may find it gone
                    self.fs.rm(self._rpath(t), recursive=True)
            else:
                shutil.rmtree(self.root / t, ignore_errors=True)
        if not self.remote:   # stale temp dirs of crashed writes
            for p in self.root.glob(".tmp-*"):
                if p.name != f".tmp-{newest}":
                    shutil.rmtree(p, ignore_errors=True)

    # --- reading
    @contextlib.contextmanager
    def open(self, tag: str) -> Iterator[CheckpointDir]:
        """A local, readable copy of checkpoint ``tag`` (downloaded for URLs)."""
        if not self.remote:
            path = self.root / tag
            if not (path / STATE_FILE).is_file():
                raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
            yield CheckpointDir(path)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"mmm4rec-ckpt-read-{tag}-"))
        try:
            src = self._rpath(tag)
            if not self.fs.exists(self._rpath(tag, STATE_FILE)):
                raise FileNotFoundError(f"{self.describe(tag)}: not a complete checkpoint (no {STATE_FILE})")
            for path in self.fs.find(src):
                dst = tmp / remote_relpath(src, path, self.describe(tag))
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(path, str(dst))
            yield CheckpointDir(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def remote_relpath(root: str, key: str, where: str) -> str:
    """The local relative path of remote ``key`` under ``root``; refuses keys that would
    land outside the staging folder (``..``, absolute, empty or foreign parts)."""
    if not key.startswith(root.rstrip("/") + "/"):
        raise DataError(f"{where}: key {key!r} is not under {root!r}; refusing to download it")
    rel = key[len(root.rstrip("/")) + 1:]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"{where}: key {key!r} has an unsafe path {rel!r} ('..', '.', empty or absolute parts); "
                         f"refusing to download it")
    return rel


class CheckpointDir:
    """A complete checkpoint on local disk (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{self.path}: not a checkpoint (no {STATE_FILE}; give a checkpoint "
                                    f"directory such as OUTPUT_DIR/checkpoints/step_00000100)")

    @classmethod
    def resolve(cls, path: str | os.PathLike) -> CheckpointDir:
        """A checkpoint directory, or a run's checkpoints root / output dir (-> its best,
        else latest, checkpoint)."""
        p = Path(path)
        if (p / STATE_FILE).is_file():
            return cls(p)
        for root in (p, p / "checkpoints"):
            if (root / LATEST).is_file():
                latest = cls(root / (root / LATEST).read_text().strip())
                best = latest.state.get("best_tag")
                if best and (root / best / STATE_FILE).is_file():
                    return cls(root / best)
                return latest
        return cls(p)   # raises with the message

    @property
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text())

    @property
    def model_config(self) -> dict[str, Any]:
        return json.loads((self.path / "model_config.json").read_text())

    @property
    def engine_dir(self) -> Path:
        return self.path / ENGINE_TAG

    def rank_files(self) -> tuple[list[str], list[dict]]:
        ranks = sorted((self.path / "ranks").glob("rank_*.json"))
        metas = [json.loads(p.read_text()) for p in ranks]
        return [str(p.with_suffix(".safetensors")) for p in ranks], metas

    def rank_state(self, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        base = self.path / "ranks" / f"rank_{rank:05d}"
        if not base.with_suffix(".json").is_file():
            raise FileNotFoundError(f"{self.path}: no state for rank {rank} (written by "
                                    f"{self.state.get('world_size')} processes)")
        meta = json.loads(base.with_suffix(".json").read_text())
        tensors = load_file(str(base.with_suffix(".safetensors")))
        return meta, tensors
