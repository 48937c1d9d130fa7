"""The bridge against the real Mosquitto (repository config and ACL), over real HTTP.

Devices here are simulated (one MQTT client publishing agent-shaped state); the real
agents are in test_bridge_agents.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from edge_agent.bridge.server import Bridge
from tests.bridge.support import (
    TOKEN,
    ApiClient,
    SimulatedDevices,
    running_bridge,
    unique_prefix,
)
from tests.support import REPO_ROOT, wait_until
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker


@pytest.fixture
def devices(broker: Broker, prefix: str) -> Iterator[SimulatedDevices]:
    sim = SimulatedDevices(broker, prefix).start()
    yield sim
    sim.close()


def tag_messages(watcher: MqttWatcher) -> list[str]:
    return [m.topic for m in list(watcher.messages) if m.topic.endswith("/tag")]


def test_put_publishes_retained_json_that_late_subscribers_get(
    broker: Broker, api: ApiClient, prefix: str
) -> None:
    response = api.put("/api/v1/devices/dev1/tag", data='{"tag":"2.0"}')  # no content type
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    late = MqttWatcher(broker.settings("bridge", prefix=prefix), [f"{prefix}/devices/dev1/tag"])
    late.start()
    try:
        message = late.wait_for(f"{prefix}/devices/dev1/tag", timeout=10)
    finally:
        late.close()
    assert message.retain
    body = message.json()
    assert body["tag"] == "2.0" and body["request_id"] == request_id
    assert body["issued_at"].endswith("Z")


def test_wrong_token_or_invalid_tag_publishes_nothing(
    bridge: Bridge, api: ApiClient, watcher: MqttWatcher, prefix: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        response = requests.put(f"{bridge.url}/api/v1/devices/dev1/tag", json={"tag": "2.0"},
                                headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json() == {"error": "missing or invalid bearer token"}
    for body in ({"tag": "no spaces"}, {"tag": ""}, {"tag": "a" * 200}, {"tag": 1}, {}):
        response = api.put("/api/v1/devices/dev1/tag", json=body)
        assert response.status_code == 400, body
        assert "error" in response.json()
    assert api.put("/api/v1/devices/a%2Fb/tag", json={"tag": "1"}).status_code == 400
    assert api.put("/api/v1/groups/%23/tag", json={"tag": "1"}).status_code == 400
    # then one valid write: everything before it would have arrived first
    assert api.put("/api/v1/devices/marker/tag", json={"tag": "1"}).status_code == 202
    watcher.wait_for(f"{prefix}/devices/marker/tag", timeout=10)
    assert tag_messages(watcher) == [f"{prefix}/devices/marker/tag"]


def test_absent_device_wait_is_504(api: ApiClient) -> None:
    response = api.put("/api/v1/devices/ghost/tag?wait=0.5", json={"tag": "2.0"})
    assert response.status_code == 504
    body = response.json()
    assert "did not answer" in body["error"] and body["state"] is None


def test_wait_200_and_device_list_from_retained_state(
    api: ApiClient, devices: SimulatedDevices
) -> None:
    devices.add(["sim-a", "sim-b"], tag="1.0")
    wait_until(lambda: len(api.get("/api/v1/devices").json()["devices"]) == 2, timeout=10,
               message="two devices listed")
    response = api.put("/api/v1/devices/sim-a/tag?wait=10", json={"tag": "2.0"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"]["installed_version"] == "2.0"
    assert body["state"]["desired"]["request_id"] == body["request_id"]
    listed = {d["id"]: d for d in api.get("/api/v1/devices").json()["devices"]}
    assert listed["sim-a"]["online"] is True
    assert listed["sim-b"]["state"]["installed_version"] == "1.0"
    one = api.get("/api/v1/devices/sim-a").json()
    assert one["state"]["installed_version"] == "2.0" and one["last_seen"]
    assert api.get("/api/v1/devices/nobody").status_code == 404


def test_device_going_offline_shows_offline(
    api: ApiClient, devices: SimulatedDevices, prefix: str
) -> None:
    devices.add(["sim-c"])
    wait_until(lambda: api.get("/api/v1/devices/sim-c").json().get("online") is True,
               timeout=10, message="sim-c online")
    devices._publish(f"{prefix}/devices/sim-c/availability", b"offline")
    wait_until(lambda: api.get("/api/v1/devices/sim-c").json()["online"] is False,
               timeout=10, message="sim-c offline")
    assert api.get("/api/v1/devices/sim-c").json()["availability"] == "offline"


def test_group_fleet_check_and_delete_topics(
    broker: Broker, api: ApiClient, watcher: MqttWatcher, prefix: str
) -> None:
    assert api.put("/api/v1/groups/lab/tag", json={"tag": "3.0"}).status_code == 202
    assert api.put("/api/v1/fleet/tag", json={"tag": "4.0"}).status_code == 202
    assert api.post("/api/v1/devices/dev9/check").status_code == 202
    assert api.post("/api/v1/fleet/check").status_code == 202
    for topic, tag in ((f"{prefix}/groups/lab/tag", "3.0"), (f"{prefix}/fleet/tag", "4.0")):
        assert watcher.wait_for(topic, timeout=10).json()["tag"] == tag
    check = watcher.wait_for(f"{prefix}/devices/dev9/cmd/check", timeout=10)
    assert "request_id" in check.json() and not check.retain
    watcher.wait_for(f"{prefix}/fleet/cmd/check", timeout=10)

    assert api.delete("/api/v1/groups/lab/tag").json() == {
        "scope": "group", "target": "lab", "cleared": True}
    assert api.delete("/api/v1/fleet/tag").status_code == 200
    watcher.wait_for(f"{prefix}/fleet/tag", lambda m: m.payload == b"", timeout=10)
    # cleared retained messages are gone for a new subscriber
    late = MqttWatcher(broker.settings("bridge", prefix=prefix), [f"{prefix}/+/tag",
                                                                  f"{prefix}/groups/+/tag"])
    late.start()
    try:
        time.sleep(0.5)  # retained messages arrive right after SUBACK; there are none
        assert late.messages == []
    finally:
        late.close()


def test_slow_devices_do_not_block_other_requests(bridge: Bridge, api: ApiClient) -> None:
    results: list[int] = []

    def wait_for_ghost(i: int) -> None:
        with ApiClient(bridge.url) as own:
            results.append(own.put(f"/api/v1/devices/ghost{i}/tag?wait=3",
                                   json={"tag": "1"}).status_code)

    threads = [threading.Thread(target=wait_for_ghost, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    wait_until(lambda: api.get("/healthz").json()["waiting"] == 20, timeout=10,
               message="20 requests waiting")
    # while 20 requests wait for absent devices, everything else is answered
    assert api.get("/api/v1/devices").status_code == 200
    assert api.put("/api/v1/devices/other/tag", json={"tag": "2"}).status_code == 202
    assert api.get("/healthz").json()["waiting"] == 20
    for thread in threads:
        thread.join(30)
    assert results == [504] * 20


def test_broker_gone_is_503_on_writes_without_hanging(tmp_path: Path) -> None:
    with Broker() as broker:
        broker.add_operator("bridge")
        with running_bridge(broker, unique_prefix()) as bridge, ApiClient(bridge.url) as api:
            assert api.put("/api/v1/fleet/tag", json={"tag": "1"}).status_code == 202
            broker.stop()
            wait_until(lambda: not bridge.link.connected, timeout=10, message="disconnect")
            for method, path in (("PUT", "/api/v1/devices/d/tag?wait=30"),
                                 ("PUT", "/api/v1/fleet/tag"), ("DELETE", "/api/v1/fleet/tag"),
                                 ("POST", "/api/v1/devices/d/check")):
                response = api.request(method, path, json={"tag": "2"}, timeout=10)
                assert response.status_code == 503, (method, path)
                assert "broker" in response.json()["error"]
            assert api.get("/api/v1/devices").json()["broker_connected"] is False
            assert api.get("/healthz").status_code == 503
            broker.start()
            wait_until(lambda: api.get("/healthz").status_code == 200, timeout=30,
                       message="bridge reconnected")
            assert api.put("/api/v1/fleet/tag", json={"tag": "3"}).status_code == 202


def test_http_level_errors_are_json(bridge: Bridge, api: ApiClient) -> None:
    response = api.request("QUERY", "/api/v1/devices")
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
    response = api.put("/api/v1/fleet/tag", data=b"x" * 10_000)
    assert response.status_code == 413 and "error" in response.json()
    response = api.head("/api/v1/devices")
    assert response.status_code == 200 and response.content == b""
    page = requests.get(f"{bridge.url}/", timeout=10)
    assert page.status_code == 200 and "edge fleet" in page.text
    assert requests.get(f"{bridge.url}/app.js", timeout=10).status_code == 200
    doc = requests.get(f"{bridge.url}/openapi.json", timeout=10).json()
    assert doc["components"]["parameters"]["wait"]["schema"]["maximum"] == 30


def test_cli_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MQTT_"))}
    env["MQTT_HOST"] = "127.0.0.1"
    result = subprocess.run([sys.executable, "-m", "edge_agent.bridge.cli"], env=env, check=False,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BRIDGE_TOKEN" in lines[0]


def test_cli_serves_with_a_token_file(broker: Broker, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = broker.settings("bridge")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MQTT_"))},
        "BRIDGE_TOKEN_FILE": str(token_file), "BRIDGE_PORT": "0",
        "MQTT_HOST": settings.host, "MQTT_PORT": str(settings.port),
        "MQTT_USERNAME": "bridge", "MQTT_PASSWORD": broker.passwords["bridge"],
        "MQTT_TOPIC_PREFIX": unique_prefix(),
    }
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent.bridge.cli"], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("edge-bridge listening on http://127.0.0.1:")
        url = line.split()[-1]
        wait_until(lambda: requests.get(f"{url}/healthz", timeout=5).status_code == 200,
                   timeout=15, message="healthz 200")
        with ApiClient(url) as api:
            assert api.get("/api/v1/devices").status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        stderr = proc.stderr.read() if proc.stderr else ""
    assert TOKEN not in stderr
    assert json.dumps(TOKEN) not in stderr


def test_desired_agent_version_routes_publish_and_clear_retained(
    api: ApiClient, watcher: MqttWatcher, prefix: str
) -> None:
    """docs/SELF-UPDATE.md: PUT/DELETE …/agent for a device, a group and the fleet."""
    for path, topic in (("devices/dev3", "devices/dev3"), ("groups/lab", "groups/lab"),
                        ("fleet", "fleet")):
        response = api.put(f"/api/v1/{path}/agent", json={"tag": "0.2"})
        assert response.status_code == 202, response.text
        message = watcher.wait_for(f"{prefix}/{topic}/agent", timeout=10)
        assert message.json()["tag"] == "0.2"
        assert message.json()["request_id"] == response.json()["request_id"]
        assert api.delete(f"/api/v1/{path}/agent").status_code == 200
        watcher.wait_for(f"{prefix}/{topic}/agent", lambda m: m.payload == b"", timeout=10)
    assert api.put("/api/v1/fleet/agent", json={"tag": "bad tag"}).status_code == 400
