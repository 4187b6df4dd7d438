"""``ShardsConfig``: the ``data:`` section of an experiment YAML (see ``mmm4rec/config.py``)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from mmm4rec.config import REDACTED, ConfigError

__all__ = ["ShardsConfig", "StorageConfig"]


@dataclasses.dataclass
class StorageConfig:
    """Object-store access. Unset fields fall back to botocore's standard chain: the
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` variables,
    ``AWS_PROFILE`` in ``~/.aws/credentials``, then instance/container roles; the endpoint
    from ``AWS_ENDPOINT_URL[_S3]``. Prefer that chain for credentials: ``key``, ``secret``
    and ``token`` are never written to a saved config (``***``, see
    ``mmm4rec.config.redact_secrets``), and a redacted value read back counts as unset.

    ``retry_seconds``: how long an endpoint that has answered before is retried (with
    backoff) when it stops answering mid-run, before the run gives up (docs/reliability.md).
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    region: str | None = None
    anon: bool = False
    retry_seconds: float = 180.0

    def validate(self) -> None:
        if self.retry_seconds < 0:
            raise ConfigError(f"retry_seconds: must be >= 0, got {self.retry_seconds}")

    def to_options(self) -> dict:
        """fsspec ``storage_options`` (only the fields that are set; ``retry_seconds`` is ours)."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v not in (None, False, REDACTED) and k != "retry_seconds"}


@dataclasses.dataclass
class ShardsConfig:
    """Where the shards are and how :class:`~data_shards.SequenceLoader` streams them.

    ``batch_size`` is per rank; ``eval_batch_size`` (default: ``batch_size``) is used for
    valid/test. ``shuffle`` and ``drop_last`` apply to the train split only (valid/test
    are read in order and in full). ``shuffle_buffer`` is in samples (per loader worker);
    ``num_workers`` 0 reads in the training process. ``verify_checksums`` hashes every
    shard on read.

    ``train_targets``: which samples each split holds (``data_shards.samples``).
    ``loo`` (default): leave-one-out, every user's last two targets are its valid and
    test samples and the train split has the prefixes before them. ``all`` (the
    release's pretraining): every prefix of every user is trained (targets at positions
    2..n), except for the *monitor* users, a deterministic ``monitor_users`` fraction
    chosen by a hash of the user index (``samples.monitor_mask``), who give the valid and
    test samples and nothing to train. With ``all`` and ``monitor_users: 0`` there is
    nothing left to evaluate on that was not trained on: a valid/test loader is refused
    (a ``ConfigError``), so such a config is for training without evaluation only.
    ``monitor_users`` has no effect under ``loo``. With ``all`` and ``monitor_users > 0``
    the loader reads every sequence shard once when it is built, to count the samples.
    """

    url: str = ""
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    batch_size: int = 256
    eval_batch_size: int | None = None
    max_len: int = 20
    num_workers: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 20000
    seed: int = 0
    drop_last: bool = False
    verify_checksums: bool = True
    train_targets: Literal["loo", "all"] = "loo"
    monitor_users: float = 0.0

    def validate(self) -> None:
        if not self.url:
            raise ConfigError("url: required (a local path or an fsspec URL such as s3://bucket/prefix)")
        for name in ("batch_size", "max_len", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size: must be >= 1, got {self.eval_batch_size}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.train_targets not in ("loo", "all"):
            raise ConfigError(f"train_targets: must be one of ['loo', 'all'], got {self.train_targets!r}")
        if not 0.0 <= self.monitor_users < 1.0:
            raise ConfigError(f"monitor_users: must be in [0, 1), got {self.monitor_users}")
