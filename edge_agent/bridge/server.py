"""The bridge's HTTP server: strict framing, deadlines, bounded connections, JSON errors.

Standard library only (the device image stays small). One thread per connection: a
request waiting for a slow device holds only its own thread. Requests are read by
``wire.parse_head`` and answered by ``Api.handle``.

What a client cannot do:

- hold a connection without sending a whole request head: the head must arrive within
  ``head_deadline_s`` in total (not per read), the next one on a kept-alive connection
  within ``idle_s`` plus that; a body within ``body_deadline_s``; an answer must be
  read within ``write_deadline_s``;
- take more than ``max_client_connections`` connections from one address (an IPv6 /64);
- take the last of ``max_connections``: when all are in use, the oldest connection that
  is idle, still sending its head, or not authenticated is closed for the new one;
  only when every connection is busy with an authenticated request is the answer 503;
- send a body to an /api route or /metrics without the token: 401 before the body is
  read;
- hold more than ``max_streams`` event streams (``GET /api/v1/stream``) at once: a
  stream has no read deadline (it is the bridge that talks), but each write has the
  write deadline, a comment goes out every ``heartbeat_s`` so a vanished client is
  noticed, and the streams end when the server stops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from edge_agent.bridge.api import (
    SECURITY_HEADERS,
    Api,
    Request,
    Response,
    StreamResponse,
    error_response,
    max_body_bytes,
)
from edge_agent.bridge.fleet import Fleet
from edge_agent.bridge.link import BridgeLink
from edge_agent.bridge.settings import DEFAULT_CLIENT_CONNECTIONS, MAX_CONNECTIONS, BridgeSettings
from edge_agent.bridge.wire import MAX_HEAD_BYTES, BadRequest, RequestHead, parse_head
from edge_agent.protocol.topics import Topics
from edge_agent.rollout.controller import RolloutController

log = logging.getLogger(__name__)

SERVER_NAME = "edge-bridge"
MAX_LEADING_EMPTY_LINES = 4  # tolerated before a request line (RFC 9112 section 2.2)
FLUSH_INTERVAL_S = 0.25


@dataclass(frozen=True)
class ServerLimits:
    """How many connections, and how long a client may take."""

    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = DEFAULT_CLIENT_CONNECTIONS
    head_deadline_s: float = 10.0
    idle_s: float = 15.0
    body_deadline_s: float = 10.0
    write_deadline_s: float = 60.0
    max_streams: int = 64
    heartbeat_s: float = 15.0


def client_key(host: str) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one host
    usually has a whole /64)."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(eq=False)
class Slot:
    """One accepted connection, as the server accounts for it."""

    sock: socket.socket
    address: Any
    key: str
    accepted: float
    evictable: bool = True  # idle, reading a head, or not authenticated
    since: float = 0.0  # when it last became evictable
    closed: bool = False


class ClientTimeout(Exception):
    """The client did not send what it had to within its deadline."""


class Connection:
    """Reads requests off one socket and answers them, until either side closes."""

    def __init__(self, server: BridgeServer, slot: Slot) -> None:
        self.server = server
        self.slot = slot
        self.sock = slot.sock
        self.limits = server.limits
        self.buffer = bytearray()

    def serve(self) -> None:
        first = True
        while True:
            try:
                head = self._read_head(first)
            except ClientTimeout:
                if self.buffer:  # a request had begun
                    self._refuse(408, "request head not received in time")
                return
            except BadRequest as exc:
                self._refuse(exc.status, exc.message)
                return
            if head is None:
                return
            first = False
            if not self._answer(head) or not self.server.set_evictable(self.slot, True):
                return

    # -- one request ------------------------------------------------------------------
    def _answer(self, head: RequestHead) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        api = self.server.api
        body_unread = head.content_length > 0
        if Api.needs_token(head.target) and not api.authorized(head.headers, head.target):
            # answered without reading the body: a client without the token cannot
            # make the bridge wait for one
            response = api.handle(Request(head.method, head.target, head.headers, b""))
            self._send(head, response, close=body_unread or not head.keep_alive)
            return head.keep_alive and not body_unread
        if Api.needs_token(head.target) and not self.server.set_evictable(self.slot, False):
            return False  # closed for a newer client meanwhile
        limit = max_body_bytes(head.target)
        if head.content_length > limit:
            self._send(head, error_response(413, f"body larger than {limit} "
                                                 "bytes"), close=True)
            return False
        if head.expect_continue and body_unread and len(self.buffer) < head.content_length:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = self._read_exact(head.content_length)
        except ClientTimeout:
            self._refuse(408, "request body not received in time")
            return False
        if body is None:
            return False
        request = Request(head.method, head.target, head.headers, body)
        try:
            response = api.handle(request)
        except Exception:
            log.exception("unhandled error for %s %s", head.method, head.target[:200])
            response = error_response(500, "internal error; see the bridge's log")
        log.debug("%s %s %s -> %d", self.slot.address[0], head.method, head.target[:200],
                  response.status)
        streaming = isinstance(response, StreamResponse) and response.stream is not None
        if streaming:
            self._stream(head, response)  # type: ignore[arg-type]
        else:
            self._send(head, response, close=not head.keep_alive)
        return head.keep_alive and not streaming

    # -- an event stream ----------------------------------------------------------------
    def _stream(self, head: RequestHead, response: StreamResponse) -> None:
        """Send the stream's messages until the client goes or the server stops; the
        body ends with the connection (no length, no chunks)."""
        stream = response.stream
        assert stream is not None
        if not self.server.open_stream():
            stream.close()
            self._send(head, error_response(503, "too many event streams; retry later",
                                            {"Retry-After": "5", **SECURITY_HEADERS}),
                       close=True)
            return
        try:
            lines = [f"HTTP/1.1 200 {_phrase(200)}", f"Server: {SERVER_NAME}",
                     f"Date: {formatdate(usegmt=True)}", f"Content-Type: {response.content_type}",
                     "Connection: close", "X-Accel-Buffering: no"]
            lines += [f"{name}: {value}" for name, value in response.headers.items()]
            data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            if head.method == "HEAD":
                self._write(data)
                return
            if not self._write_all(data + b"retry: 2000\n\n" + stream.first()):
                return
            sent_at = time.monotonic()
            while not self.server.stopping.is_set() and not self._client_gone():
                chunk = stream.poll(1.0)
                if not chunk and time.monotonic() - sent_at >= self.limits.heartbeat_s:
                    chunk = b": keepalive\n\n"
                if chunk:
                    if not self._write_all(chunk):
                        return
                    sent_at = time.monotonic()
        finally:
            stream.close()
            self.server.close_stream()

    def _client_gone(self) -> bool:
        """Whether the client closed its side (it has nothing to send on a stream)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return False
            self.sock.settimeout(0)
            return not self.sock.recv(4096)
        except (OSError, ValueError):
            return True

    def _write_all(self, data: bytes) -> bool:
        """Send ``data`` within the write deadline; False when the client is gone or
        too slow."""
        deadline = time.monotonic() + self.limits.write_deadline_s
        view = memoryview(data)
        try:
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.sock.settimeout(remaining)
                view = view[self.sock.send(view):]
        except OSError:
            return False
        return True

    # -- reading ----------------------------------------------------------------------
    def _read_head(self, first: bool) -> RequestHead | None:
        """The next request head; None when the client closed the connection between
        requests. Raises ClientTimeout or BadRequest."""
        now = time.monotonic()
        if first:
            deadline = self.slot.accepted + self.limits.head_deadline_s
        else:
            deadline = now + self.limits.idle_s  # until its first byte
        begun = False
        empty_lines = 0
        while True:
            while self.buffer.startswith(b"\r\n"):
                del self.buffer[:2]
                empty_lines += 1
                if empty_lines > MAX_LEADING_EMPTY_LINES:
                    raise BadRequest(400, "empty lines instead of a request line")
            if self.buffer and not begun:
                begun = True
                if not first:
                    deadline = time.monotonic() + self.limits.head_deadline_s
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end])
                del self.buffer[:end + 4]
                return parse_head(head)
            if len(self.buffer) > MAX_HEAD_BYTES:
                raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            if not self._receive(deadline):
                if self.buffer.strip(b"\r\n"):
                    log.debug("%s closed the connection within a request head",
                              self.slot.address[0])
                return None

    def _read_exact(self, length: int) -> bytes | None:
        """``length`` bytes of body; None when the client closed the connection."""
        deadline = time.monotonic() + self.limits.body_deadline_s
        while len(self.buffer) < length:
            if not self._receive(deadline):
                return None
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return body

    def _receive(self, deadline: float) -> bool:
        """Append what arrives before ``deadline``; False when the peer closed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTimeout
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise ClientTimeout from None
        except OSError:
            return False
        if not chunk:
            return False
        self.buffer += chunk
        return True

    # -- writing ----------------------------------------------------------------------
    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be read safely, then close."""
        log.debug("%s: %d %s", self.slot.address[0], status, message)
        response = error_response(status, message)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Cache-Control", "no-store")
        self._send(None, response, close=True)

    def _send(self, head: RequestHead | None, response: Response, *, close: bool) -> None:
        phrase = _phrase(response.status)
        lines = [f"HTTP/1.1 {response.status} {phrase}",
                 f"Server: {SERVER_NAME}",
                 f"Date: {formatdate(usegmt=True)}",
                 f"Content-Type: {response.content_type}",
                 f"Content-Length: {len(response.body)}"]
        lines += [f"{name}: {value}" for name, value in response.headers.items()
                  if name.lower() not in ("connection", "content-length", "content-type")]
        if close:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head is None or head.method != "HEAD":
            data += response.body
        self._write(data)

    def _write(self, data: bytes) -> None:
        """Send everything within the write deadline, or give up on the client."""
        deadline = time.monotonic() + self.limits.write_deadline_s
        view = memoryview(data)
        with contextlib.suppress(OSError):
            while view:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.sock.settimeout(remaining)
                sent = self.sock.send(view)
                view = view[sent:]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _busy(message: str) -> bytes:
    body = ('{"error":"' + message + '"}').encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nServer: " + SERVER_NAME.encode()
            + b"\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


BUSY = _busy("too many connections; retry later")
BUSY_CLIENT = _busy("too many connections from your address; retry later")


class BridgeServer(socketserver.TCPServer):
    """Accepts connections and gives each a thread, within ``ServerLimits``."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], api: Api,
                 limits: ServerLimits | None = None) -> None:
        self.api = api
        self.limits = limits or ServerLimits()
        self._lock = threading.Lock()
        self._slots: set[Slot] = set()
        self._per_client: dict[str, int] = {}
        self._full_logged = False
        self._streams = 0
        self._streams_full_logged = False
        self.stopping = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, socketserver.BaseRequestHandler)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._slots)

    def process_request(self, request: Any, client_address: Any) -> None:
        slot, refusal = self._admit(request, client_address)
        if slot is None:
            with contextlib.suppress(OSError):
                request.sendall(refusal)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve, args=(slot,), daemon=True,
                                  name="edge-bridge-http-conn")
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: as good as full
            self._release(slot)
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)

    def _serve(self, slot: Slot) -> None:
        try:
            Connection(self, slot).serve()
        except OSError:
            log.debug("connection from %s ended with an error", slot.address, exc_info=True)
        except Exception:
            log.exception("connection from %s failed", slot.address)
        finally:
            self._release(slot)
            self.shutdown_request(slot.sock)

    def _admit(self, sock: socket.socket, address: Any) -> tuple[Slot | None, bytes]:
        key = client_key(str(address[0]))
        now = time.monotonic()
        with self._lock:
            if self._per_client.get(key, 0) >= self.limits.max_client_connections:
                return None, BUSY_CLIENT
            if len(self._slots) >= self.limits.max_connections:
                victims = [s for s in self._slots if s.evictable]
                if not victims:
                    if not self._full_logged:
                        log.warning("all %d connections are busy with requests; answering "
                                    "503 to new ones", self.limits.max_connections)
                        self._full_logged = True
                    return None, BUSY
                self._close(min(victims, key=lambda s: s.since))
            self._full_logged = False
            slot = Slot(sock, address, key, accepted=now, since=now)
            self._slots.add(slot)
            self._per_client[key] = self._per_client.get(key, 0) + 1
            return slot, b""

    def open_stream(self) -> bool:
        """Count one more event stream; False when ``max_streams`` are open."""
        with self._lock:
            if self._streams >= self.limits.max_streams:
                if not self._streams_full_logged:
                    log.warning("%d event streams are open; answering 503 to new ones",
                                self.limits.max_streams)
                    self._streams_full_logged = True
                return False
            self._streams += 1
            self._streams_full_logged = False
            return True

    def close_stream(self) -> None:
        with self._lock:
            self._streams -= 1

    @property
    def streams(self) -> int:
        with self._lock:
            return self._streams

    def set_evictable(self, slot: Slot, evictable: bool) -> bool:
        """Mark a connection idle or busy; False when it was already closed."""
        with self._lock:
            if slot.closed:
                return False
            if evictable and not slot.evictable:
                slot.since = time.monotonic()
            slot.evictable = evictable
            return True

    def _close(self, slot: Slot) -> None:
        """Stop counting a connection and make its thread's next read return (caller
        holds the lock)."""
        if slot.closed:
            return
        slot.closed = True
        self._slots.discard(slot)
        left = self._per_client.get(slot.key, 1) - 1
        if left > 0:
            self._per_client[slot.key] = left
        else:
            self._per_client.pop(slot.key, None)
        with contextlib.suppress(OSError):
            slot.sock.shutdown(socket.SHUT_RDWR)

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._close(slot)

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()
        with self._lock:
            for slot in list(self._slots):
                self._close(slot)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class Bridge:
    """Fleet registry + MQTT link + HTTP server, started and stopped together."""

    def __init__(self, settings: BridgeSettings, limits: ServerLimits | None = None) -> None:
        self.settings = settings
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.fleet = Fleet(self.topics)
        self.desired = self.fleet.desired
        self.link = BridgeLink(
            settings.mqtt,
            [self.topics.all_states, self.topics.all_availability, self.topics.all_events,
             *self.desired.subscriptions],
            self._on_message,
        )
        self.rollouts = RolloutController(settings.data_dir, self.topics, self.fleet,
                                          self.desired, self.link)
        self.fleet.event_listeners.append(self.rollouts.on_event)
        self.api = Api(settings.token, self.topics, self.fleet, self.link,
                       max_wait_s=settings.max_wait_s, metrics_token=settings.metrics_token,
                       rollouts=self.rollouts,
                       registry=settings.registry)
        if limits is None:
            limits = ServerLimits(max_client_connections=settings.max_client_connections)
        self.server = BridgeServer((settings.host, settings.port), self.api, limits)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    @property
    def url(self) -> str:
        host = self.settings.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self.fleet.handle(topic, payload, retained)  # desired tags too (fleet.desired)

    def start(self) -> None:
        self.rollouts.start()
        self.link.start()
        self._threads = [
            threading.Thread(target=self.server.serve_forever, name="edge-bridge-http",
                             kwargs={"poll_interval": 0.2}, daemon=True),
            threading.Thread(target=self._flush, name="edge-bridge-fleet", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("edge-bridge listening on %s", self.url)

    def _flush(self) -> None:
        """Show throttled devices' latest states once their budget allows; after a
        flood, fetch the retained states again in case the broker dropped some."""
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.fleet.flush_pending()
            if self.fleet.resync_due():
                log.info("a device flooded; fetching every device's retained state again")
                self.link.resync([self.topics.all_states, self.topics.all_availability])

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.rollouts.stop()
        self.link.stop()
        for thread in self._threads:
            thread.join(timeout=5)

