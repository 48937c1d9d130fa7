"""The routes behind the fleet console on a real bridge and a real Mosquitto: the paged,
filtered device list, the fleet summary, a device's recent events, install, and the
live event stream (``GET /api/v1/stream``) with its limits."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.bridge.fleet import MAX_RECENT_EVENT_BYTES, MAX_RECENT_EVENTS
from edge_agent.bridge.server import Bridge
from edge_agent.protocol.topics import Topics
from tests.bridge.support import TOKEN, ApiClient, state_document
from tests.support import wait_until
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker


@pytest.fixture
def devices(broker: Broker, prefix: str) -> Iterator[tuple[MqttWatcher, Topics]]:
    client = MqttWatcher(broker.settings("simulator", prefix=prefix), []).start()
    yield client, Topics(prefix)
    client.close()


def publish_state(client: MqttWatcher, topics: Topics, device_id: str, tag: str,
                  groups: list[str], **update: Any) -> None:
    state = state_document(device_id, tag)
    state["groups"] = groups
    state["update"].update(update)
    client.publish(topics.availability(device_id), b"online", retain=True)
    client.publish(topics.state(device_id), json.dumps(state).encode(), retain=True)


def seed(client: MqttWatcher, topics: Topics, api: ApiClient) -> None:
    publish_state(client, topics, "dev-a", "1.0", ["north"])
    publish_state(client, topics, "dev-b", "2.0", ["north", "south"])
    publish_state(client, topics, "dev-c", "1.10", ["south"], status="error",
                  last_error="pull failed")
    publish_state(client, topics, "dev-d", "1.9", [], status="pulling", progress=40.0)
    client.publish(topics.availability("dev-d"), b"offline", retain=True)
    wait_until(lambda: len(api.get("/api/v1/devices").json()["devices"]) == 4
               and api.get("/api/v1/devices/dev-d").json()["availability"] == "offline",
               timeout=10, message="four devices")


def ids(api: ApiClient, query: str) -> list[str]:
    response = api.get(f"/api/v1/devices?{query}")
    assert response.status_code == 200, response.text
    return [d["id"] for d in response.json()["devices"]]


def test_the_list_filters_sorts_and_pages_on_the_server(
        bridge: Bridge, api: ApiClient, devices: tuple[MqttWatcher, Topics]) -> None:
    seed(*devices, api)
    plain = api.get("/api/v1/devices").json()
    assert set(plain) == {"broker_connected", "devices"}  # unchanged without a query
    assert ids(api, "group=south") == ["dev-b", "dev-c"]
    assert ids(api, "tag=1.0") == ["dev-a"]
    assert ids(api, "status=failed") == ["dev-c"]
    assert ids(api, "status=offline") == ["dev-d"]
    assert ids(api, "status=updating") == ["dev-d"]
    assert ids(api, "q=DEV-B") == ["dev-b"]
    assert ids(api, "q=1.1") == ["dev-c"]
    assert ids(api, "sort=running") == ["dev-a", "dev-d", "dev-c", "dev-b"]  # 1.9 < 1.10
    assert ids(api, "sort=-id") == ["dev-d", "dev-c", "dev-b", "dev-a"]
    page = api.get("/api/v1/devices?limit=2&offset=1").json()
    assert [d["id"] for d in page["devices"]] == ["dev-b", "dev-c"]
    assert (page["total"], page["offset"], page["limit"]) == (4, 1, 2)
    for bad in ("status=nope", "sort=state", "limit=-1", "limit=1001", "offset=x",
                "q=" + "x" * 129, "color=red"):
        response = api.get(f"/api/v1/devices?{bad}")
        assert response.status_code == 400, (bad, response.text)

    summary = api.get("/api/v1/fleet/summary").json()
    assert summary["devices"] == 4
    assert summary["counts"]["online"] == 3
    assert summary["counts"]["offline"] == 1
    assert summary["counts"]["failed"] == 1
    assert summary["counts"]["updating"] == 1
    assert {v["tag"]: v["devices"] for v in summary["versions"]} == {
        "1.0": 1, "2.0": 1, "1.10": 1, "1.9": 1}


def test_a_device_keeps_a_bounded_ring_of_recent_events(
        bridge: Bridge, api: ApiClient, devices: tuple[MqttWatcher, Topics]) -> None:
    client, topics = devices
    publish_state(client, topics, "dev-a", "1.0", [])
    wait_until(lambda: api.get("/api/v1/devices/dev-a").status_code == 200, timeout=10)
    for n in range(MAX_RECENT_EVENTS + 5):
        client.publish(topics.events("dev-a"), json.dumps(
            {"event": "update_failed", "request_id": f"r-{n}", "error": "e" * 1500,
             "ts": "2024-01-01T00:00:00Z"}).encode())
    client.publish(topics.events("dev-a"), json.dumps(
        {"event": "rolled_back", "request_id": "last", "reason": "unhealthy"}).encode())
    wait_until(lambda: (api.get("/api/v1/devices/dev-a").json()["recent_events"] or [{}])[-1]
               .get("request_id") == "last", timeout=10, message="the last event")
    recent = api.get("/api/v1/devices/dev-a").json()["recent_events"]
    assert len(json.dumps(recent)) <= MAX_RECENT_EVENT_BYTES + 1000
    assert 1 < len(recent) < MAX_RECENT_EVENTS
    assert recent[-1]["reason"] == "unhealthy"
    assert "recent_events" not in api.get("/api/v1/devices").json()["devices"][0]


def test_install_publishes_the_install_command(
        bridge: Bridge, api: ApiClient, watcher: MqttWatcher) -> None:
    response = api.post("/api/v1/devices/dev-a/install")
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    topic = Topics(bridge.topics.prefix).device_install("dev-a")
    watcher.wait_for(topic, lambda m: request_id.encode() in m.payload, timeout=10)


class Stream:
    """A raw HTTP client reading ``GET /api/v1/stream``'s events."""

    def __init__(self, url: str, token: str = TOKEN) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: Bearer {token}\r\n\r\n".encode())
        self.buffer = b""

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buffer += chunk

    def event(self) -> tuple[str, Any]:
        """The next event (comments and retry lines skipped)."""
        while True:
            while b"\n\n" not in self.buffer:
                self._read()
            frame, _, self.buffer = self.buffer.partition(b"\n\n")
            fields = dict(line.split(": ", 1) for line in frame.decode().split("\n")
                          if not line.startswith(":") and ": " in line)
            if "event" in fields:
                return fields["event"], json.loads(fields["data"])

    def close(self) -> None:
        self.sock.close()


def test_the_stream_sends_device_changes_and_needs_the_token(
        bridge: Bridge, api: ApiClient, devices: tuple[MqttWatcher, Topics]) -> None:
    client, topics = devices
    refused = Stream(bridge.url, token="wrong")
    assert refused.head().startswith(b"HTTP/1.1 401")
    refused.close()

    stream = Stream(bridge.url)
    head = stream.head()
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"Content-Type: text/event-stream" in head
    name, hello = stream.event()
    assert name == "hello" and hello["broker_connected"] is True
    publish_state(client, topics, "dev-live", "3.0", ["north"], status="pulling",
                  progress=55.0)
    deadline = time.monotonic() + 10
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline and not seen.get("state"):
        name, data = stream.event()
        if name == "devices":
            seen = next((d for d in data["devices"] if d["id"] == "dev-live"), seen)
    assert seen["state"]["update"]["progress"] == 55.0
    assert data["summary"]["counts"]["updating"] >= 1
    stream.close()
    wait_until(lambda: bridge.server.streams == 0, timeout=10,
               message="the closed stream's slot is given back")


def test_streams_are_capped_and_end_when_the_bridge_stops(broker: Broker, prefix: str) -> None:
    from edge_agent.bridge.server import ServerLimits  # noqa: PLC0415
    from tests.bridge.support import running_bridge  # noqa: PLC0415

    limits = ServerLimits(max_streams=2, heartbeat_s=0.5)
    with running_bridge(broker, prefix, limits=limits) as bridge:
        streams = [Stream(bridge.url) for _ in range(2)]
        for stream in streams:
            assert stream.head().startswith(b"HTTP/1.1 200")
        third = Stream(bridge.url)
        assert third.head().startswith(b"HTTP/1.1 503")
        third.close()
        # heartbeats keep an idle stream alive past the read deadlines
        time.sleep(1.5)
        assert b": keepalive" in streams[0].sock.recv(65536) + streams[0].buffer
    for stream in streams:  # the bridge stopped: the streams end
        stream.sock.settimeout(10)
        with pytest.raises((EOFError, OSError)):
            while True:
                stream._read()
        stream.close()
