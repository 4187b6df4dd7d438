"""A real local S3 endpoint for tests and benchmarks: moto's server on a free 127.0.0.1 port.

:func:`moto_server` starts ``moto_server -H 127.0.0.1 -p PORT`` from this interpreter's
environment, waits until it answers, and yields an :class:`S3Server` (endpoint URL, dummy
credentials, ``storage_options`` for fsspec/s3fs, a helper that creates a bucket); a
server that does not come up is an error carrying its log. The server is stopped by its
own pid afterwards. The tests' fixture is ``tests/s3_server.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from dist.cli import free_port

__all__ = ["S3Server", "moto_binary", "moto_server", "moto_server_with_auth"]


def moto_binary() -> str | None:
    """``moto_server`` next to this interpreter, else on PATH, else None."""
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.is_file() else shutil.which("moto_server")


@dataclasses.dataclass
class S3Server:
    endpoint_url: str
    key: str = "testing"
    secret: str = "testing"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret}

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no region: us-east-1 plus a location constraint fails) -> ``s3://name``."""
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)
        fs.mkdir(name)
        return f"s3://{name}"


@contextlib.contextmanager
def moto_server(binary: str, extra_env: dict[str, str] | None = None) -> Iterator[S3Server]:
    """Run ``moto_server`` on a free 127.0.0.1 port until the block exits (stopped by its pid)."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(extra_env or {})
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server on {url} did not come up; log:\n"
                                       + Path(log.name).read_text()[-3000:]) from None
                time.sleep(0.1)
        yield S3Server(url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


@contextlib.contextmanager
def moto_server_with_auth(binary: str) -> Iterator[S3Server]:
    """A moto server that checks credentials like S3 (IAM authentication from its 4th
    request on): the first three create an IAM user, its allow-all policy and its access
    key, which the yielded :class:`S3Server` carries. Unknown keys get InvalidAccessKeyId,
    a wrong secret SignatureDoesNotMatch, no credentials AccessDenied."""
    import json

    import boto3
    from botocore.exceptions import ClientError

    free = 8   # moto counts some requests of its own start-up; the rest are burnt below
    with moto_server(binary, {"INITIAL_NO_AUTH_ACTION_COUNT": str(free)}) as server:
        def client(service, key="bootstrap", secret="bootstrap"):
            return boto3.client(service, endpoint_url=server.endpoint_url, region_name="us-east-1",
                                aws_access_key_id=key, aws_secret_access_key=secret)

        iam = client("iam")
        iam.create_user(UserName="tester")
        iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tester")["AccessKey"]
        anonymous = client("s3", "AKIANOTAKEYNOTAKEY00", "x")
        for _ in range(free):   # until authentication is on: an unknown key is refused
            try:
                anonymous.list_buckets()
            except ClientError:
                break
        else:
            raise RuntimeError("moto did not switch authentication on")
        yield S3Server(server.endpoint_url, key["AccessKeyId"], key["SecretAccessKey"])
