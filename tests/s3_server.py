"""The tests' local S3 endpoint (the server itself: ``scripts/s3_server.py``).

``s3_server`` (session fixture) yields a running :class:`~scripts.s3_server.S3Server`; only
a missing ``moto_server`` binary skips, with the reason shown. Import it into a test
module with ``from s3_server import s3_server  # noqa: F401``.
"""
from __future__ import annotations

import pytest

from scripts.s3_server import S3Server, moto_binary, moto_server, moto_server_with_auth

__all__ = ["S3Server", "moto_binary", "moto_server", "moto_server_with_auth", "require_moto_binary", "s3_server"]


def require_moto_binary() -> str:
    """``moto_server``'s path, or skip the test with the reason shown."""
    binary = moto_binary()
    if binary is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]'): no local S3 endpoint")
    return binary


@pytest.fixture(scope="session")
def s3_server():
    with moto_server(require_moto_binary()) as server:
        yield server
