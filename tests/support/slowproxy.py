"""A proxy for the tests of slow and hanging peers: it sits in front of a real peer (the
registry, the Docker daemon, the broker) and passes bytes through, stalls, or drips.

``SlowProxy`` listens on a TCP port of 127.0.0.1 (``address``) or on a unix socket
(``unix_path``) and connects each client to the upstream TCP address or unix socket.
Modes, switched at any time and applied to open connections too:

- ``passthrough()``: bytes flow both ways as they come;
- ``stall()``: nothing moves in either direction (the peer neither hears the request nor
  answers: a hung daemon, a dead link that has not been reset);
- ``drip(interval_s)``: requests pass, answers trickle one byte every ``interval_s``
  (a slowloris peer: each read gets a byte before any socket timeout);
- ``stall_on(pattern)``: a connection stalls (both ways) from the moment the client sends
  ``pattern``, e.g. ``b"/blobs/"``: a registry that answers the manifest request and
  then hangs in the middle of a pull.

Only the proxy misbehaves; the shared daemon and registry behind it never stall.
``connections`` counts open client connections, ``stalled`` those held by a stall, and
``waiting_calls()`` those on which a client is waiting for the stalled peer right now.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

Mode = Literal["pass", "stall", "drip"]

_CHUNK = 65536
_TICK_S = 0.05


class SlowProxy:
    """A TCP or unix-socket proxy whose answers can be stalled or dripped."""

    def __init__(
        self,
        *,
        upstream: tuple[str, int] | None = None,
        upstream_unix: str | os.PathLike[str] | None = None,
        unix_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if (upstream is None) == (upstream_unix is None):
            raise ValueError("give upstream (host, port) or upstream_unix, not both")
        self._upstream = upstream
        self._upstream_unix = str(upstream_unix) if upstream_unix is not None else None
        self.unix_path = Path(unix_path) if unix_path is not None else None
        self.mode: Mode = "pass"
        self.drip_interval_s = 5.0
        self.stall_pattern: bytes | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._conns: set[_Connection] = set()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(str(self.unix_path))
            os.chmod(self.unix_path, 0o660)
        else:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_TICK_S * 4)
        self._thread = threading.Thread(target=self._accept, name="slowproxy", daemon=True)
        self._thread.start()

    # -- where clients connect ----------------------------------------------------------
    @property
    def port(self) -> int:
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` of a TCP proxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def docker_host(self) -> str:
        """``DOCKER_HOST`` value of a unix-socket proxy."""
        assert self.unix_path is not None, "not a unix-socket proxy"
        return f"unix://{self.unix_path}"

    # -- modes --------------------------------------------------------------------------
    def passthrough(self) -> None:
        """Let everything flow again, on stalled connections too."""
        self.mode, self.stall_pattern = "pass", None
        with self._lock:
            for conn in self._conns:
                conn.stalled = False

    def stall(self) -> None:
        self.mode = "stall"

    def drip(self, interval_s: float = 5.0) -> None:
        self.drip_interval_s = interval_s
        self.mode = "drip"

    def stall_on(self, pattern: bytes) -> None:
        """Stall each connection once its client has sent ``pattern``."""
        self.stall_pattern = pattern
        self.mode = "pass"

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def waiting_calls(self, *, ignore: bytes | None = None) -> int:
        """Connections on which a stall holds back a request or its answer right now: a
        client is waiting for the peer. ``ignore``: leave out connections whose last
        request contains it (e.g. ``b"/events"``, a stream that is always waiting)."""
        with self._lock:
            conns = list(self._conns)
        return sum(1 for c in conns if c.waiting() and not (ignore and ignore in c.request))

    @property
    def stalled(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.stalled or self.mode == "stall")

    # -- plumbing -----------------------------------------------------------------------
    def _connect_upstream(self) -> socket.socket:
        if self._upstream_unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self._upstream_unix)
            return sock
        assert self._upstream is not None
        return socket.create_connection(self._upstream, timeout=5)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = self._connect_upstream()
            except OSError:
                client.close()
                continue
            conn = _Connection(self, client, upstream)
            with self._lock:
                self._conns.add(conn)
            conn.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()
        self._thread.join(2)
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Connection:
    """One client connection and its upstream: a pump thread per direction."""

    def __init__(self, proxy: SlowProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.stalled = False
        self.holding = False  # bytes read from one side, held back by a stall
        self.request = b""  # the start of the client's latest request
        self._closed = threading.Event()
        self._seen = b""

    def start(self) -> None:
        for source, target, name in ((self.client, self.upstream, "request"),
                                     (self.upstream, self.client, "answer")):
            source.settimeout(_TICK_S * 4)
            threading.Thread(target=self._pump, args=(source, target, name == "answer"),
                             name=f"slowproxy-{name}", daemon=True).start()

    def _held(self) -> bool:
        """True while this connection must not move bytes."""
        return self.stalled or self.proxy.mode == "stall"

    def _wait_while_held(self) -> bool:
        """Wait out a stall; False when the connection ended meanwhile (the client hung
        up: seen without reading what it sent, which must stay unforwarded)."""
        while self._held():
            if self._closed.wait(_TICK_S) or self.proxy._closed.is_set():
                return False
            if self._client_hung_up():
                return False
        return True

    def waiting(self) -> bool:
        if self.holding:
            return True
        poller = select.poll()
        try:
            poller.register(self.client, select.POLLIN)
            return bool(poller.poll(0)) and self._held()
        except (OSError, ValueError):
            return False

    def _client_hung_up(self) -> bool:
        poller = select.poll()
        try:
            poller.register(self.client, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # ValueError: already closed here
            return True

    def _pump(self, source: socket.socket, target: socket.socket, answer: bool) -> None:
        try:
            while not self._closed.is_set():
                if not self._wait_while_held():
                    return
                try:
                    data = source.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    return
                if not answer:
                    self._watch_request(data)
                if not self._send(target, data, answer):
                    return
        except OSError:
            return
        finally:
            self.close()

    def _watch_request(self, data: bytes) -> None:
        if data[:8].split(b" ", 1)[0].isalpha():  # looks like the start of a request
            self.request = data[:200]
        pattern = self.proxy.stall_pattern
        if pattern is None:
            return
        # keep a tail so a pattern split over two reads is still seen
        self._seen = (self._seen + data)[-(len(pattern) + _CHUNK):]
        if pattern in self._seen:
            self.stalled = True

    def _send(self, target: socket.socket, data: bytes, answer: bool) -> bool:
        """Forward ``data``, holding it while stalled and dripping answers in drip mode."""
        view = memoryview(data)
        while view:
            self.holding = self._held()
            try:
                if not self._wait_while_held():
                    return False
            finally:
                self.holding = False
            if answer and self.proxy.mode == "drip":
                target.sendall(view[:1])
                view = view[1:]
                deadline = time.monotonic() + self.proxy.drip_interval_s
                while time.monotonic() < deadline and self.proxy.mode == "drip":
                    if self._closed.wait(_TICK_S):
                        return False
                continue
            target.sendall(view)
            return True
        return True

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy._forget(self)
