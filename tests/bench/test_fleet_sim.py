"""The fleet simulator (bench/fleet_sim.py) is judged by the real operator code as a real
agent would be: the real bridge, the real broker with the shipped ACL, every device
logged in as itself. This checks the simulator, which the scale bench relies on; it
never stands in for a real agent in a test of agent behaviour."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.fleet_sim import FleetSim, SimConfig, device_ids, group_rule
from edge_agent.protocol.events import EventName
from edge_agent.protocol.tags import command_payload
from edge_agent.protocol.timestamps import utc_now
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.bridge_process import BRIDGE_USER, BridgeProcess
from tests.support.broker import Broker, MqttWatcher, device_acl_section

DEVICES = 20
PASSWORD = "sim-" + "p" * 20
TOKEN = "sim-token-" + "t" * 24


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker() as running:
        running.add_operator(BRIDGE_USER)
        running.add_operator("watcher")
        yield running


@pytest.fixture
def prefix() -> str:
    return f"sim{uuid.uuid4().hex[:8]}"


def start_sim(broker: Broker, prefix: str, name_prefix: str, count: int, **config: Any
              ) -> FleetSim:
    ids = device_ids(name_prefix, count)
    broker.add_devices(ids, group_rule(2), PASSWORD)
    settings = SimConfig(host="127.0.0.1", port=broker.port, prefix=prefix, password=PASSWORD,
                         **config)
    return FleetSim(settings, ids, group_rule(2)).start()


def devices(bridge: BridgeProcess) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in bridge.get("/api/v1/devices").json()["devices"]}


def running_tags(bridge: BridgeProcess) -> dict[str, str | None]:
    return {device_id: ((view.get("state") or {}).get("running") or {}).get("tag")
            for device_id, view in devices(bridge).items()}


def test_bulk_users_match_add_device(tmp_path: Path) -> None:
    """``Broker.add_devices`` writes the ACL section that ``mosquitto/add-device`` does."""
    with Broker() as broker:
        broker.add_device("dev.a", ["line-1", "line-2"])
        acl = (broker.config_dir / "acl").read_text()
    section = device_acl_section("dev.a", ["line-1", "line-2"])
    assert section in acl


def test_simulated_devices_follow_tags_and_answer_as_agents(broker: Broker, prefix: str,
                                                            tmp_path: Path) -> None:
    topics = Topics(prefix)
    sim = start_sim(broker, prefix, "simdev-", DEVICES, update_s=0.5)
    failing = start_sim(broker, prefix, "simbad-", 2, update_s=0.3, failure_rate=1.0)
    (tmp_path / "bridge").mkdir()
    bridge = BridgeProcess(broker, prefix, TOKEN, tmp_path / "bridge.log",
                           data_dir=tmp_path / "bridge", REGISTRY_CHECK="false").start()
    watcher = MqttWatcher(broker.settings("watcher", prefix=prefix), [f"{prefix}/#"]).start()
    try:
        bridge.wait_devices(DEVICES + 2)
        assert all(view["online"] for view in devices(bridge).values())
        assert set(running_tags(bridge).values()) == {"1.0"}

        # fleet tag: every device updates, the bridge sees it
        assert bridge.session.put(f"{bridge.url}/api/v1/fleet/tag", json={"tag": "2.0"},
                                  timeout=30).status_code == 202
        good = device_ids("simdev-", DEVICES)
        wait_until(lambda: all(running_tags(bridge)[d] == "2.0" for d in good), timeout=30,
                   message="every simulated device on 2.0")
        # group beats fleet, device beats group
        bridge.session.put(f"{bridge.url}/api/v1/groups/g0/tag", json={"tag": "3.0"},
                           timeout=30)
        answer = bridge.session.put(f"{bridge.url}/api/v1/devices/{good[0]}/tag?wait=30",
                                    json={"tag": "4.0"}, timeout=60)
        assert answer.status_code == 200, answer.text
        expected = {d: "4.0" if d == good[0] else "3.0" if int(d[-5:]) % 2 == 0 else "2.0"
                    for d in good}
        wait_until(lambda: {d: running_tags(bridge)[d] for d in good} == expected,
                   timeout=30, message="the precedence device > group > fleet")
        state = devices(bridge)[good[2]]["state"]
        assert state["desired"]["source"] == "group" and state["desired"]["group"] == "g0"

        # a failing update: rolled back, judged by protocol/answers through ?wait
        bad = device_ids("simbad-", 2)[0]
        answer = bridge.session.put(f"{bridge.url}/api/v1/devices/{bad}/tag?wait=30",
                                    json={"tag": "5.0"}, timeout=60)
        assert answer.status_code == 409, answer.text
        assert answer.json()["event"] == EventName.ROLLED_BACK
        request_id = answer.json()["request_id"]
        events = [json.loads(m.payload) for m in watcher.on(topics.events(bad))]
        assert [e["event"] for e in events if e.get("request_id") == request_id] == [
            EventName.UPDATE_STARTED, EventName.PULL_PROGRESS, EventName.ROLLED_BACK]
        assert running_tags(bridge)[bad] != "5.0"

        # a command with an MQTT 5 response topic is answered there, with its correlation
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        reply_topic = topics.reply(good[1], "t1")
        properties.ResponseTopic = reply_topic
        properties.CorrelationData = b"corr-1"
        watcher.publish(topics.device_check(good[1]), command_payload("check-1", utc_now()),
                        properties=properties)
        reply = watcher.wait_for(reply_topic, timeout=20)
        body = reply.json()
        assert body["request_id"] == "check-1" and body["outcome"] == "unchanged"
        assert reply.properties.CorrelationData == b"corr-1"
        # and, as MQTT 3.1.1 asks, on the reply_to token of its payload
        watcher.publish(topics.device_check(good[1]),
                        command_payload("check-2", utc_now(), reply_to="t2"))
        assert watcher.wait_for(topics.reply(good[1], "t2"), timeout=20).json()["request_id"] \
            == "check-2"

        # broker restart: every device comes back, with its will fired meanwhile
        broker.stop()
        broker.start()
        wait_until(lambda: sim.online() == DEVICES and failing.online() == 2, timeout=60,
                   message="every simulated device reconnected")
        wait_until(lambda: all(v["online"] for v in devices(bridge).values()), timeout=60,
                   message="the bridge sees every device online again")
        assert {d: running_tags(bridge)[d] for d in good} == expected
    finally:
        watcher.close()
        bridge.stop()
        sim.stop()
        failing.stop()
