"""A slow link to a registry, and an image big enough to take a while through it.

``ThrottledRegistry`` is a plain HTTP proxy on 127.0.0.1 in front of a registry (the
shared one by default). Blob downloads larger than ``min_bytes`` trickle at
``bytes_per_s``; everything else (manifests, small layers) passes at full speed. Docker
treats a loopback registry as insecure, so the daemon pulls through it over HTTP like
from the registry itself: ``<proxy.address>/<path>`` names the same repository.
``aborted`` counts throttled downloads the client gave up on (a cancelled pull).
It also counts what it serves (for the rollout bench): ``requests`` every request with
when it started, ``pull_gets`` the GETs of manifests and blobs (pulls; a digest check is
a HEAD), ``peak_in_flight`` the most of those served at once; ``min_bytes=None`` passes everything at full speed (a counting proxy only).

``publish_padded`` pushes a test image with one extra layer of random bytes.
"""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self

import docker

from tests.support import DEFAULT_REGISTRY
from tests.support.images import build_and_push, full_repo, push_image, remove_repo_images

# Hop-by-hop headers are the proxy's own business.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "proxy-connection"})


class ThrottledRegistry:
    """An HTTP proxy to ``upstream`` that slows large blob downloads."""

    def __init__(self, upstream: str = DEFAULT_REGISTRY, *, bytes_per_s: int = 256 * 1024,
                 min_bytes: int | None = 2 * 1024 * 1024) -> None:
        self.upstream = upstream
        self.bytes_per_s = bytes_per_s
        self.min_bytes = min_bytes
        self.aborted = 0
        self.completed = 0
        self.pull_gets: list[tuple[float, str]] = []  # (time.monotonic() at start, path)
        self.requests: list[tuple[float, str, str]] = []  # (start, method, path)
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def repo(self, repo: str) -> str:
        """``repo`` (on the upstream registry) as seen through the proxy."""
        path = full_repo(repo, self.upstream).removeprefix(f"{self.upstream}/")
        return f"{self.address}/{path}"

    def _count(self, *, aborted: bool) -> None:
        with self._lock:
            if aborted:
                self.aborted += 1
            else:
                self.completed += 1

    def reset_counts(self) -> None:
        """Forget the pulls counted so far (a new measurement starts)."""
        with self._lock:
            self.pull_gets = []
            self.requests = []
            self.peak_in_flight = self.in_flight

    def _seen(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((time.monotonic(), method, path))

    def _pull_started(self, path: str) -> None:
        with self._lock:
            self.pull_gets.append((time.monotonic(), path))
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _pull_ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._forward()

            def do_HEAD(self) -> None:
                self._forward()

            def _forward(self) -> None:
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                pull = self.command == "GET" and ("/manifests/" in self.path
                                                  or "/blobs/" in self.path)
                proxy._seen(self.command, self.path)
                if pull:
                    proxy._pull_started(self.path)
                try:
                    # header by header: Docker sends several Accept headers, and the
                    # registry picks the manifest (and so its digest) from all of them
                    upstream.putrequest(self.command, self.path, skip_accept_encoding=True)
                    for key, value in self.headers.items():
                        if key.lower() not in HOP_HEADERS and key.lower() != "host":
                            upstream.putheader(key, value)
                    upstream.endheaders()
                    response = upstream.getresponse()
                    self.send_response(response.status)
                    for key, value in response.getheaders():
                        if key.lower() not in HOP_HEADERS:
                            self.send_header(key, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    size = int(response.getheader("Content-Length") or 0)
                    slow = ("/blobs/" in self.path and proxy.min_bytes is not None
                            and size > proxy.min_bytes)
                    self._copy(response, slow)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away
                finally:
                    upstream.close()
                    if pull:
                        proxy._pull_ended()

            def _copy(self, response: http.client.HTTPResponse, slow: bool) -> None:
                chunk = max(proxy.bytes_per_s // 10, 1) if slow else 64 * 1024
                try:
                    while data := response.read(chunk):
                        self.wfile.write(data)
                        if slow:
                            self.wfile.flush()
                            time.sleep(0.1)
                except (BrokenPipeError, ConnectionResetError):
                    if slow:
                        proxy._count(aborted=True)
                    raise
                if slow:
                    proxy._count(aborted=False)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the test output shows the agent's log instead

        return Handler

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def publish_padded(repo: str, tag: str, version: str, pad_bytes: int,
                   client: docker.DockerClient | None = None) -> str:
    """Push a test image (kind ``ok``) serving ``version``, with an extra layer of
    ``pad_bytes`` random (incompressible) bytes; local copies are removed afterwards,
    so an agent must pull it. Returns the manifest digest."""
    client = client or docker.from_env(version="auto")
    base = f"{full_repo(repo)}:{tag}-base"
    build_and_push(repo, f"{tag}-base", version, client=client)
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {base}\nCOPY pad /pad\n".encode()),
                           ("pad", os.urandom(pad_bytes))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    ref = f"{full_repo(repo)}:{tag}"
    for chunk in client.api.build(fileobj=context, custom_context=True, tag=ref, rm=True,
                                  forcerm=True, decode=True):
        if "error" in chunk:
            raise RuntimeError(f"docker build {ref}: {chunk['error']}")
    digest = push_image(repo, tag, client=client)
    remove_repo_images(repo, client=client)
    return digest
