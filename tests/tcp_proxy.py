"""A real TCP proxy on 127.0.0.1 that can take its upstream "down": for a fault test,
every connection through it (open ones and new ones) is dropped for N seconds.

    with TcpProxy(("127.0.0.1", moto_port)) as proxy:
        url = proxy.url                # point the client here
        proxy.outage(15)               # from now: 15 s of dropped connections (non-blocking)

During an outage, open connections are reset and new ones are accepted and closed at
once (the client sees a reset/closed connection, as when an endpoint's load balancer
loses its backends); afterwards it forwards bytes again. Threads only, no stand-ins:
the client talks HTTP to the real server through it.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stop = False
        self.dropped = 0           # connections dropped by outages
        self.forwarded = 0         # connections forwarded
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def outage(self, seconds: float) -> None:
        """Drop every connection for ``seconds`` from now (returns at once)."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            for s in list(self._open):
                self._reset(s)
            self._open.clear()

    @staticmethod
    def _reset(s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # RST, not FIN
        with contextlib.suppress(OSError):
            s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                self.dropped += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self._reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            self.forwarded += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or self.down:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                for s in (src, dst):
                    if s in self._open:
                        self._open.discard(s)
                        if self.down:
                            self._reset(s)
                        else:
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                            s.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in list(self._open):
                self._reset(s)
            self._open.clear()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
