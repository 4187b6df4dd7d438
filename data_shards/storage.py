"""fsspec access to a shard set: local paths, ``file://`` and ``s3://`` (through s3fs).

S3 endpoint and credentials come from ``storage_options`` (``endpoint_url``, ``key``,
``secret``, ``token``, ``anon``, ``region``), else from the standard AWS variables
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``), which botocore reads itself.

s3fs instances are not fork-safe, so :class:`Store` creates its filesystem lazily and
a forked DataLoader worker builds its own (``skip_instance_cache``).
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec

from .errors import ShardError

__all__ = ["Store", "storage_options_for"]


def storage_options_for(url: str, options: Mapping[str, Any] | None) -> dict:
    """fsspec keyword arguments for ``url``: ``options`` plus the S3 endpoint from the environment."""
    opts = {k: v for k, v in dict(options or {}).items() if v is not None}
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in opts:
            opts["endpoint_url"] = endpoint
        region = opts.pop("region", None)
        if region:
            opts.setdefault("client_kwargs", {})["region_name"] = region
        if opts.get("anon") is False:
            opts.pop("anon")
    else:
        for k in ("endpoint_url", "key", "secret", "token", "anon", "region"):
            opts.pop(k, None)
    return opts


class Store:
    """A shard-set root on any fsspec URL; members are addressed by relative paths."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = str(url).rstrip("/")
        self.options = storage_options_for(self.url, storage_options)
        self._fs = None
        self._root = None
        self._pid = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def _ensure(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.options)
            self._pid = os.getpid()
        return self._fs

    @property
    def fs(self):
        return self._ensure()

    def path(self, rel: str) -> str:
        self._ensure()
        return posixpath.join(self._root, rel)

    def display(self, rel: str) -> str:
        """The member's full URL, for messages."""
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read(self, rel: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            raise ShardError(self.display(rel), "missing file") from None

    def write(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        try:
            if self.is_local:
                self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
            self.fs.pipe_file(p, data)
        except OSError as e:  # e.g. a missing bucket, no permission, a full disk
            raise ShardError(self.display(rel), f"cannot write: {e}") from e

    def __getstate__(self):  # never pickle a live filesystem into a worker
        state = dict(self.__dict__)
        state["_fs"] = state["_root"] = state["_pid"] = None
        return state
