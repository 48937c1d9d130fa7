"""A pull slow enough to watch: a throttling TCP proxy in front of a registry, and a
test image with a large incompressible layer.

Docker talks plain HTTP to any registry on 127.0.0.0/8, so an agent given
``<proxy.address>/<path>`` pulls through the proxy from the registry behind it (same
storage, same digests). Only the registry -> Docker direction is throttled.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import docker

from tests.support.images import _consume, _context, dockerfile_for, push_image

__all__ = ["ThrottledProxy", "push_large_image"]

CHUNK = 16 * 1024


class ThrottledProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``, answers at most ``rate`` bytes/s per
    connection. ``close()`` ends every connection and the listener."""

    def __init__(self, upstream: str, rate: int) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., object], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server, None)
            self._spawn(self._pump, server, client, self.rate)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: int | None) -> None:
        started, sent = time.monotonic(), 0
        try:
            while not self._closed.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
                sent += len(data)
                if rate:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def push_large_image(repo: str, tag: str, version: str, size: int, *,
                     client: docker.DockerClient) -> str:
    """The ``ok`` test image of ``version`` with a first layer of ``size`` random bytes,
    pushed as ``repo:tag`` (``repo`` names its registry); returns the manifest digest.

    The large layer comes first so that no layer of the image exists locally already
    (Docker finds existing layers by their chain, which starts at the first layer):
    the agent's pull percentage counts a reused base layer as done the moment Docker
    announces it, before it has heard of the others (see the report of issue 11)."""
    registry, _, _ = repo.partition("/")
    dockerfile = dockerfile_for("ok", version).replace(
        "FROM scratch\n", "FROM scratch\nCOPY blob /blob\n", 1)
    buf = io.BytesIO()
    with (tarfile.open(fileobj=_context("ok", version, repo.partition("/")[2])) as source,
          tarfile.open(fileobj=buf, mode="w") as tar):
        for member in source.getmembers():
            if member.name != "Dockerfile":
                tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        for name, data in (("Dockerfile", dockerfile.encode()), ("blob", os.urandom(size))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    stream = client.api.build(fileobj=buf, custom_context=True, tag=f"{repo}:{tag}", rm=True,
                              forcerm=True, decode=True)
    _consume(stream, f"docker build {repo}:{tag} (large)")
    return push_image(repo, tag, registry=registry, client=client)
