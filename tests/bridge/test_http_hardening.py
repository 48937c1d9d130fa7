"""The bridge's HTTP layer under attack, over real sockets against a real bridge and
Mosquitto: slow clients (slowloris) and lenient framing (request smuggling).
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from edge_agent.bridge.server import Bridge, ServerLimits
from tests.bridge.support import TOKEN, ApiClient, running_bridge, unique_prefix
from tests.support import wait_until
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
BODY = b'{"tag":"1.0"}'  # 13 bytes
# the attackers' source address: another loopback address than the legitimate client's
ATTACKER = "127.0.0.2"
HEAD_DEADLINE_S = 10.0  # the bridge's default (docs/BRIDGE.md)


# -- raw HTTP ---------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Exchange:
    answers: list[Answer] = field(default_factory=list)
    closed: bool = False  # the server closed the connection


def exchange(port: int, data: bytes, timeout: float = 5.0) -> Exchange:
    """Send ``data`` on a fresh connection; read every answer until the server closes
    the connection or stays silent for ``timeout`` seconds."""
    result = Exchange()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        buffer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                result.closed = True
                break
            if not chunk:
                result.closed = True
                break
            buffer += chunk
    while buffer:
        head, sep, rest = buffer.partition(b"\r\n\r\n")
        assert sep, f"incomplete answer: {buffer[:500]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        result.answers.append(Answer(status, headers, rest[:length]))
        buffer = rest[length:]
    return result


def request(method: str, target: str, *headers: str, body: bytes = b"",
            auth: bool = True, host: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    if host:
        lines.append(b"Host: 127.0.0.1")
    if auth:
        lines.append(AUTH.rstrip(b"\r\n"))
    lines += [h.encode("latin-1") for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def assert_nothing_published(api: ApiClient, watcher: MqttWatcher, prefix: str,
                             topic: str) -> None:
    """A valid write after the attack: anything the attack published arrives before it."""
    assert api.put("/api/v1/devices/marker/tag", json={"tag": "1"}).status_code == 202
    watcher.wait_for(f"{prefix}/devices/marker/tag", timeout=10)
    assert [m.payload for m in watcher.on(topic)] == [], topic


# -- finding 9: request smuggling and lenient parsing -----------------------------------
def test_duplicate_content_length_cannot_smuggle_a_delete(
    broker: Broker, bridge: Bridge, api: ApiClient, prefix: str
) -> None:
    victim = f"{prefix}/devices/victim/tag"
    assert api.put("/api/v1/devices/victim/tag", json={"tag": "1.0"}).status_code == 202
    watcher = MqttWatcher(broker.settings("bridge", prefix=prefix), [f"{prefix}/#"]).start()
    try:
        watcher.wait_for(victim, lambda m: m.json()["tag"] == "1.0", timeout=10)
        before = len(watcher.on(victim))
        smuggled = request("DELETE", "/api/v1/devices/victim/tag", "Content-Length: 0")
        for lengths in ((0, len(smuggled)), (len(smuggled), 0)):
            carrier = request("GET", "/api/v1/devices", *(f"Content-Length: {n}"
                                                          for n in lengths), body=smuggled)
            result = exchange(bridge.port, carrier)
            assert [a.status for a in result.answers] == [400], result
            assert result.closed
            assert b"Content-Length" in result.answers[0].body
        # nothing reached the broker: a write after the attack arrives, the DELETE never
        assert api.put("/api/v1/devices/marker/tag", json={"tag": "1"}).status_code == 202
        watcher.wait_for(f"{prefix}/devices/marker/tag", timeout=10)
        assert len(watcher.on(victim)) == before
        assert all(m.payload for m in watcher.on(victim))
    finally:
        watcher.close()
    late = MqttWatcher(broker.settings("bridge", prefix=prefix), [victim]).start()
    try:
        assert late.wait_for(victim, timeout=10).json()["tag"] == "1.0"
    finally:
        late.close()


PUT = "/api/v1/devices/dev1/tag"
FRAMING = {
    "underscore": request("PUT", PUT, "Content-Length: 1_3", body=BODY),
    "plus": request("PUT", PUT, "Content-Length: +13", body=BODY),
    "minus": request("PUT", PUT, "Content-Length: -13", body=BODY),
    "hex": request("PUT", PUT, "Content-Length: 0xd", body=BODY),
    "list": request("PUT", PUT, "Content-Length: 13, 13", body=BODY),
    "identical-twice": request("PUT", PUT, "Content-Length: 13", "Content-Length: 13",
                               body=BODY),
    "te-and-cl": request("PUT", PUT, "Transfer-Encoding: chunked", "Content-Length: 13",
                         body=BODY),
    "te-chunked": request("PUT", PUT, "Transfer-Encoding: chunked",
                          body=b"d\r\n" + BODY + b"\r\n0\r\n\r\n"),
    "te-identity": request("PUT", PUT, "Transfer-Encoding: identity", "Content-Length: 13",
                           body=BODY),
    "no-host": request("PUT", PUT, "Content-Length: 13", body=BODY, host=False),
    "two-hosts": request("PUT", PUT, "Host: other", "Content-Length: 13", body=BODY),
    "obs-fold": request("PUT", PUT, "Content-Length: 13", "X-A: 1", " folded", body=BODY),
    "space-before-colon": request("PUT", PUT, "Content-Length : 13", body=BODY),
    "nul-in-header": request("PUT", PUT, "Content-Length: 13", "X-A: a\x00b", body=BODY),
    "bare-lf": (f"PUT {PUT} HTTP/1.1\nHost: x\n".encode() + AUTH.rstrip(b"\r\n") + b"\n"
                b"Content-Length: 13\n\n" + BODY),
    "http-0.9-style": b"GET /api/v1/devices\r\n\r\n",
    "http-2.0": b"GET /api/v1/devices HTTP/2.0\r\nHost: x\r\n\r\n",
    "space-in-target": request("GET", "/api/v1/devices /x"),
    "non-ascii-target": request("GET", "/api/v1/devices/\xe9"),
}


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_ambiguous_framing_is_400_and_closes_the_connection(
    bridge: Bridge, api: ApiClient, watcher: MqttWatcher, prefix: str, name: str
) -> None:
    result = exchange(bridge.port, FRAMING[name] + request("GET", "/healthz"))
    statuses = [a.status for a in result.answers]
    assert statuses == [400], (name, result)
    assert result.closed, name
    assert json.loads(result.answers[0].body)["error"]
    assert_nothing_published(api, watcher, prefix, f"{prefix}/devices/dev1/tag")


BODIES = {
    "utf-16": '{"tag":"1.0"}'.encode("utf-16"),
    "utf-16-be": '{"tag":"1.0"}'.encode("utf-16-be"),
    "utf-32": '{"tag":"1.0"}'.encode("utf-32"),
    "utf-8-bom": '{"tag":"1.0"}'.encode("utf-8-sig"),
    "latin-1": '{"tag":"1.0","request_id":"\xe9"}'.encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(BODIES))
def test_body_must_be_utf8_json_without_bom(
    bridge: Bridge, api: ApiClient, watcher: MqttWatcher, prefix: str, name: str
) -> None:
    body = BODIES[name]
    result = exchange(bridge.port, request("PUT", PUT, f"Content-Length: {len(body)}",
                                           "Connection: close", body=body))
    assert [a.status for a in result.answers] == [400], (name, result)
    assert_nothing_published(api, watcher, prefix, f"{prefix}/devices/dev1/tag")


@pytest.mark.parametrize("wait", ["1_0", "+1", "-1", "1e1", "nan", "inf", "%201", "0x1", "1.",
                                  ".5", "1.5.1", "\u0661", "1%00", "Infinity"])
def test_wait_must_be_plain_digits(
    api: ApiClient, watcher: MqttWatcher, prefix: str, wait: str
) -> None:
    response = api.put(f"/api/v1/devices/dev1/tag?wait={wait}", json={"tag": "1.0"})
    assert response.status_code == 400, (wait, response.text)
    assert "wait" in response.json()["error"]
    assert_nothing_published(api, watcher, prefix, f"{prefix}/devices/dev1/tag")


def test_strict_parsing_still_serves_ordinary_clients(bridge: Bridge, api: ApiClient) -> None:
    """Keep-alive with several requests on one connection, HTTP/1.0, Expect: 100-continue,
    header names in any case, OWS around values, a fraction in ?wait."""
    two = (request("GET", "/api/v1/devices") + request("GET", "/healthz", "connection: close"))
    result = exchange(bridge.port, two)
    assert [a.status for a in result.answers] == [200, 200] and result.closed
    old = exchange(bridge.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert [a.status for a in old.answers] == [200] and old.closed
    body = b'{"tag":"1.0"}'
    expect = exchange(bridge.port, request("PUT", "/api/v1/devices/d/tag",
                                           "content-length:   13  ", "Expect: 100-continue",
                                           "Connection: close", body=body))
    assert [a.status for a in expect.answers] in ([100, 202], [202])
    assert api.put("/api/v1/devices/ghost/tag?wait=0.25",
                   json={"tag": "1"}).status_code == 504


# -- finding 5: slowloris ----------------------------------------------------------------
class Trickler:
    """``count`` sockets from ``source`` that send a request head one byte every
    ``interval_s`` seconds and never finish it."""

    HEAD = b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000

    def __init__(self, port: int, source: str, count: int, interval_s: float) -> None:
        self.port = port
        self.source = source
        self.count = count
        self.interval_s = interval_s
        self.socks: dict[socket.socket, int] = {}  # socket -> bytes sent
        self.closed_at: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trickler", daemon=True)

    def start(self) -> Trickler:
        for _ in range(self.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((self.source, 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", self.port))
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.send(self.HEAD[:1])
            self.socks[sock] = 1
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                for sock, sent in list(self.socks.items()):
                    if sock in self.closed_at:
                        continue
                    if self._server_closed(sock):
                        self.closed_at[sock] = time.monotonic()
                        continue
                    try:
                        sock.send(self.HEAD[sent:sent + 1])
                        self.socks[sock] = sent + 1
                    except OSError:
                        self.closed_at[sock] = time.monotonic()

    @staticmethod
    def _server_closed(sock: socket.socket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            return False  # an answer (408/503) arrived, the close may follow
        except OSError as exc:
            return exc.errno in (errno.ECONNRESET, errno.EPIPE)
        return True

    def still_open(self) -> int:
        with self._lock:
            return self.count - len(self.closed_at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.socks:
            sock.close()


def test_slowloris_does_not_lock_out_other_clients(bridge: Bridge) -> None:
    attack = Trickler(bridge.port, ATTACKER, count=512, interval_s=1.0).start()
    try:
        # a legitimate client from another address is served at once, on new connections
        for _ in range(4):
            response = requests.get(f"{bridge.url}/api/v1/devices", timeout=5,
                                    headers={"Authorization": f"Bearer {TOKEN}",
                                             "Connection": "close"})
            assert response.status_code == 200, response.text
            time.sleep(1)
        # every trickling socket is closed once the header deadline has passed, although
        # each of them keeps sending a byte a second
        wait_until(lambda: attack.still_open() == 0, timeout=HEAD_DEADLINE_S + 10,
                   interval=0.5, message="the trickling sockets closed")
        assert max(attack.closed_at.values()) - attack.started < HEAD_DEADLINE_S + 5
    finally:
        attack.close()
    response = requests.get(f"{bridge.url}/healthz", timeout=5)
    assert response.status_code == 200


def test_many_addresses_cannot_take_every_connection_either(broker: Broker) -> None:
    """A distributed slowloris: 16 addresses x 4 sockets against 32 connections. The
    oldest connection still sending its head makes room for a new client, so the
    legitimate one is served; the server never holds more than its 32."""
    limits = ServerLimits(max_connections=32, max_client_connections=4)
    with running_bridge(broker, unique_prefix(), limits=limits) as bridge:
        attacks = [Trickler(bridge.port, f"127.0.1.{i}", count=4, interval_s=1.0).start()
                   for i in range(1, 17)]
        try:
            wait_until(lambda: bridge.server.connections == 32, timeout=10,
                       message="32 connections")
            for _ in range(3):
                response = requests.get(f"{bridge.url}/api/v1/devices", timeout=5, headers={
                    "Authorization": f"Bearer {TOKEN}", "Connection": "close"})
                assert response.status_code == 200
            assert bridge.server.connections <= 32
        finally:
            for attack in attacks:
                attack.close()


def test_busy_authenticated_requests_are_never_evicted(broker: Broker) -> None:
    """When every connection waits for a device on behalf of an operator, a new client
    gets an immediate 503 rather than cutting one of them off."""
    limits = ServerLimits(max_connections=4, max_client_connections=8)
    with running_bridge(broker, unique_prefix(), limits=limits) as bridge:
        results: list[int] = []

        def wait_for_ghost(i: int) -> None:
            with ApiClient(bridge.url) as own:
                results.append(own.put(f"/api/v1/devices/ghost{i}/tag?wait=3",
                                       json={"tag": "1"}).status_code)

        threads = [threading.Thread(target=wait_for_ghost, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: bridge.fleet.waiting == 4, timeout=10, message="4 waiting")
        response = requests.get(f"{bridge.url}/healthz", timeout=5)
        assert response.status_code == 503 and response.headers["Retry-After"]
        for thread in threads:
            thread.join(30)
        assert results == [504] * 4
        assert requests.get(f"{bridge.url}/healthz", timeout=5).status_code == 200


def test_a_body_without_the_token_is_never_waited_for(bridge: Bridge) -> None:
    head = request("PUT", PUT, "Content-Length: 4000", auth=False)
    started = time.monotonic()
    result = exchange(bridge.port, head, timeout=8)
    assert [a.status for a in result.answers] == [401] and result.closed
    assert time.monotonic() - started < 5


def test_slow_bodies_and_idle_connections_are_closed(broker: Broker) -> None:
    limits = ServerLimits(body_deadline_s=1.0, idle_s=1.0)
    with running_bridge(broker, unique_prefix(), limits=limits) as bridge:
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as sock:
            sock.sendall(request("PUT", PUT, "Content-Length: 13") + BODY[:5])
            started = time.monotonic()
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 5
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as sock:
            sock.sendall(request("GET", "/healthz"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            started = time.monotonic()
            assert sock.recv(65536) == b""  # closed once idle, without an answer
            assert time.monotonic() - started < 5
