"""fsspec access to a shard set: local paths, ``file://`` and ``s3://`` (through s3fs).

S3 endpoint and credentials come from ``storage_options`` (``endpoint_url``, ``key``,
``secret``, ``token``, ``anon``, ``region``), else from the standard AWS variables
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``), which botocore reads itself.

s3fs instances are not fork-safe, so :class:`Store` creates its filesystem lazily and
a forked DataLoader worker builds its own (``skip_instance_cache``).

Faults (docs/reliability.md): every call on a remote filesystem goes through
:class:`RetryingFS`. An endpoint that has answered before and then stops answering
(connection refused/reset, timeouts, 5xx) is retried with backoff for ``retry_seconds``
(default 180), then the run stops with a :class:`~data_shards.errors.StorageError`; the
caller's position is untouched, so a reader continues exactly where it was. An endpoint
that never answered, missing or wrong credentials and a missing bucket are
configuration errors: a ``StorageError`` naming the URL and the cause, at once.
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

from mmm4rec.errors import import_optional

from .errors import ShardError, StorageError

_log = logging.getLogger(__name__)
__all__ = ["Store", "RetryingFS", "storage_options_for", "storage_fault", "probe_bucket", "make_fs", "open_checked",
           "DEFAULT_RETRY_SECONDS"]

#: how long an endpoint that answered before is retried when it stops answering
DEFAULT_RETRY_SECONDS = 180.0
_MAX_BACKOFF = 10.0


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
        # One place retries: RetryingFS (backoff, storage.retry_seconds, a "[storage]" line).
        # botocore's retries and s3fs's (make_fs) would otherwise absorb a short outage silently,
        # for a time that depends on when it hits (seconds, nested), neither logged nor bounded.
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        opts["config_kwargs"] = config
    else:
        for k in ("endpoint_url", "key", "secret", "token", "anon", "region"):
            opts.pop(k, None)
    return opts


# ------------------------------------------------------------------------ faults
def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _client_error(exc: BaseException) -> tuple[str, str] | None:
    """(code, message) of the botocore ClientError behind ``exc`` (s3fs translates them)."""
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            err = resp["Error"]
            return str(err.get("Code", "")), str(err.get("Message", "") or e)
    return None


_AUTH_CODES = {
    "InvalidAccessKeyId": "wrong credentials: the endpoint does not know this access key id",
    "SignatureDoesNotMatch": "wrong credentials: the secret key does not match the access key id",
    "InvalidToken": "wrong credentials: the session token is invalid",
    "ExpiredToken": "the credentials have expired",
    "AccessDenied": "access denied: these credentials may not read/write here",
    "AllAccessDisabled": "access denied: all access to this bucket is disabled",
    "403": "access denied (HTTP 403): wrong credentials or no permission",
}
_CREDENTIALS_HELP = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.anon: true "
                     "for a public bucket")


def storage_fault(exc: BaseException) -> tuple[bool, str] | None:
    """``(transient, cause)`` when ``exc`` is an object-store fault, else None.

    Transient (worth retrying): the endpoint cannot be reached or dropped the connection,
    timeouts, HTTP 5xx. Permanent: no or wrong credentials, access denied, no such bucket.
    A missing key is not a fault (callers report the missing file).
    """
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return False, f"no credentials found ({_CREDENTIALS_HELP})"
    if "ProfileNotFound" in names:
        return False, f"{exc} (AWS_PROFILE names a profile that is not in ~/.aws/credentials)"
    ce = _client_error(exc)
    if ce is not None:
        code, message = ce
        if code in _AUTH_CODES:
            return False, f"{_AUTH_CODES[code]} ({message})" if message and message != code else _AUTH_CODES[code]
        if code in ("NoSuchBucket",):
            return False, f"no such bucket ({message})"
        if code in ("500", "502", "503", "504", "InternalError", "SlowDown", "ServiceUnavailable",
                    "RequestTimeout"):
            return True, f"the endpoint answered {code} ({message})"
        return None
    transient_names = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                       "HTTPClientError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteRead",
                       "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError",
                       "ClientOSError", "ClientPayloadError", "FSTimeoutError", "ProtocolError"}
    for e in _chain(exc):
        if (type(e).__name__ in transient_names or isinstance(e, (ConnectionError, TimeoutError))
                or (isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE,
                                                          errno.ETIMEDOUT, errno.EHOSTUNREACH,
                                                          errno.ENETUNREACH))):
            return True, f"cannot reach the endpoint ({str(exc) or type(exc).__name__})"
    return None


class RetryingFS:
    """An fsspec filesystem whose calls survive outages of an endpoint that has answered.

    Every method call goes through :meth:`call`: a transient fault (:func:`storage_fault`)
    is retried with exponential backoff (0.5 s doubling to 10 s) until ``retry_seconds``
    have passed since the first failure, as long as the endpoint answered once before
    (``answered``; it is carried into DataLoader workers); a permanent fault, or any fault
    before the first answer, raises :class:`StorageError` naming ``url``, the endpoint
    and the cause at once. Other errors (a missing key) pass through unchanged.
    """

    def __init__(self, fs, url: str, endpoint: str | None, retry_seconds: float = DEFAULT_RETRY_SECONDS,
                 answered: bool = False, log: Callable[[str], None] | None = None):
        self.wrapped = fs
        self.url = url
        self.endpoint = endpoint
        self.retry_seconds = float(retry_seconds)
        self.answered = answered
        # every rank's own outage is reported (the message carries its "[storage]" tag)
        self._log = log or (lambda msg: _log.warning(msg, extra={"tag": "", "all_ranks": True}))

    def _where(self, path: str | None) -> str:
        where = self.url if not path else f"{self.url.split('://', 1)[0]}://{str(path).lstrip('/')}"
        return where + (f" (endpoint {self.endpoint})" if self.endpoint else "")

    def call(self, name: str, *args, **kwargs):
        fn = getattr(self.wrapped, name)
        remote = 1 if name in ("put_file", "put") else 0   # put_file(local, remote)
        path = args[remote] if len(args) > remote and isinstance(args[remote], str) else None
        first, delay, last_log = None, 0.5, 0.0
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                if isinstance(e, StorageError):
                    raise
                fault = storage_fault(e)
                if fault is None:
                    raise
                transient, cause = fault
                now = time.monotonic()
                if not transient or not self.answered:
                    raise StorageError(self._where(path), cause) from None
                if first is None:
                    first = now
                waited = now - first
                if waited >= self.retry_seconds:
                    raise StorageError(self._where(path), f"{cause}; still failing after {waited:.0f} s of retries "
                                                          f"(storage.retry_seconds: {self.retry_seconds:g})") from None
                if now - last_log >= 30 or last_log == 0.0:
                    self._log(f"[storage] {self._where(path)}: {cause}; retrying for up to "
                              f"{self.retry_seconds - waited:.0f} s more")
                    last_log = now
                time.sleep(min(delay, max(self.retry_seconds - waited, 0.0) + 0.01))
                delay = min(delay * 2, _MAX_BACKOFF)
                self._invalidate()
                continue
            if first is not None:
                self._log(f"[storage] {self._where(path)}: answers again after {time.monotonic() - first:.0f} s; "
                          f"continuing where it stopped")
            self.answered = True
            return out

    def _invalidate(self) -> None:
        invalidate = getattr(self.wrapped, "invalidate_cache", None)
        if invalidate is not None:
            try:
                invalidate()
            except Exception:  # noqa: BLE001 -- a cache flush must never hide the real fault
                pass

    def __getattr__(self, name: str):
        attr = getattr(self.wrapped, name)
        if not callable(attr) or name.startswith("_"):
            return attr
        return lambda *args, **kwargs: self.call(name, *args, **kwargs)


def endpoint_of(url: str, options: Mapping[str, Any]) -> str | None:
    """The endpoint a URL's requests go to, for messages."""
    if not url.startswith(("s3://", "s3a://")):
        return None
    return options.get("endpoint_url") or "AWS S3 (default endpoint)"


def probe_bucket(fs: RetryingFS, url: str) -> None:
    """Raise :class:`StorageError` when the bucket of an ``s3://`` URL does not exist or
    cannot be reached with these credentials (one HEAD request)."""
    if not url.startswith(("s3://", "s3a://")):
        return
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    try:
        fs.call("call_s3", "head_bucket", Bucket=bucket)
    except StorageError:
        raise
    except Exception as e:  # noqa: BLE001
        ce = _client_error(e)
        if ce is not None and ce[0] in ("404", "NoSuchBucket"):
            raise StorageError(f"{url} (endpoint {fs.endpoint})", f"no such bucket: {bucket!r}") from None
        raise


def make_fs(url: str, options: Mapping[str, Any], retry_seconds: float = DEFAULT_RETRY_SECONDS, *,
            skip_instance_cache: bool = False, answered: bool = False):
    """``(fs, root)`` for ``url``: remote filesystems wrapped in :class:`RetryingFS`."""
    if url.startswith(("s3://", "s3a://")):   # fsspec would say "install s3fs" for a broken one too
        import_optional("s3fs", "s3", f"{url.split('://', 1)[0]}:// storage")
    try:
        fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=skip_instance_cache, **options)
    except Exception as e:  # noqa: BLE001
        fault = storage_fault(e)
        if fault is None:
            raise
        raise StorageError(url, fault[1]) from None
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return fs, root
    if hasattr(fs, "retries"):   # s3fs: one attempt per call; RetryingFS retries (storage_options_for)
        fs.retries = 1
    return RetryingFS(fs, url, endpoint_of(url, options), retry_seconds, answered=answered), root


def open_checked(url: str, options: Mapping[str, Any], retry_seconds: float = DEFAULT_RETRY_SECONDS):
    """``make_fs`` then, for ``s3://``, one HEAD of the bucket: an endpoint that is down, no or
    wrong credentials and a missing bucket fail here, at start, naming the URL and cause."""
    fs, root = make_fs(url, options, retry_seconds)
    if isinstance(fs, RetryingFS):
        probe_bucket(fs, url)
    return fs, root


class Store:
    """A shard-set root on any fsspec URL; members are addressed by relative paths."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.url = str(url).rstrip("/")
        self.options = storage_options_for(self.url, storage_options)
        self.retry_seconds = float(retry_seconds)
        self._answered = False   # the endpoint answered once: later faults are outages, retried
        self._fs = None
        self._root = None
        self._pid = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def _ensure(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = make_fs(self.url, self.options, self.retry_seconds, skip_instance_cache=True,
                                           answered=self._answered)
            self._pid = os.getpid()
        return self._fs

    def _ok(self, value):
        self._answered = True
        return value

    @property
    def fs(self):
        return self._ensure()

    def path(self, rel: str) -> str:
        self._ensure()
        return posixpath.join(str(self._root), rel)

    def display(self, rel: str) -> str:
        """The member's full URL, for messages."""
        return f"{self.url}/{rel}"

    def exists(self, rel: str) -> bool:
        return self._ok(self.fs.exists(self.path(rel)))

    def read(self, rel: str) -> bytes:
        try:
            return self._ok(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            if isinstance(self.fs, RetryingFS):
                probe_bucket(self.fs, self.url)   # a missing bucket is not a missing file
            raise ShardError(self.display(rel), "missing file") from None

    def write(self, rel: str, data: bytes) -> None:
        p = self.path(rel)
        try:
            if self.is_local:
                self.fs.makedirs(posixpath.dirname(p), exist_ok=True)
            self.fs.pipe_file(p, data)
            self._answered = True
        except OSError as e:  # e.g. a full disk (object-store faults are StorageErrors)
            raise ShardError(self.display(rel), f"cannot write: {e}") from e

    def __getstate__(self):  # never pickle a live filesystem into a worker
        state = dict(self.__dict__)
        state["_fs"] = state["_root"] = state["_pid"] = None
        return state
