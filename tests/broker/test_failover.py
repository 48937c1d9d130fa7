"""Broker failover (issue 13): MQTT_HOST lists two Mosquitto brokers. The agent, the
bridge and edge-ctl start on the second when the first is down, and move to the other
when the one they use dies (protocol/mqtt.py: every attempt after the first goes to
the next broker in the list)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.protocol.mqtt import BrokerClient
from edge_agent.protocol.settings import BrokerAddress, MqttSettings
from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.bridge_process import BridgeProcess
from tests.support.broker import HOST, Broker, MqttWatcher, text_is
from tests.support.device import Device, publish
from tests.support.fleet import BRIDGE_TOKEN

EDGE_CTL = (sys.executable, "-m", "edge_agent.ctl")


class Pair:
    """Two brokers with the same users (same passwords)."""

    def __init__(self, first: Broker, second: Broker) -> None:
        self.brokers = (first, second)

    def add(self, name: str, groups: tuple[str, ...] = (), *, operator: bool = False) -> None:
        password = self.brokers[0].add_device(name, groups, operator=operator)
        self.brokers[1].add_device(name, groups, operator=operator, password=password)

    def host_list(self) -> str:
        return ",".join(f"{HOST}:{b.port}" for b in self.brokers)

    def settings(self, user: str, prefix: str) -> MqttSettings:
        """Both brokers, the first first."""
        return replace(self.brokers[0].settings(user, prefix=prefix),
                       brokers=tuple(BrokerAddress(HOST, b.port) for b in self.brokers))


@pytest.fixture
def pair() -> Iterator[Pair]:
    with Broker() as first, Broker(pki=first.pki) as second:
        yield Pair(first, second)


def test_a_client_starts_on_the_live_broker_and_moves_when_it_dies(pair: Pair) -> None:
    first, second = pair.brokers
    pair.add("operator", operator=True)
    first.stop()
    prefix = f"f{uuid.uuid4().hex[:6]}"
    client = BrokerClient(pair.settings("operator", prefix))
    client.start(wait_s=15)  # the first refuses: the second takes it
    try:
        watch_second = MqttWatcher(second.settings("operator", prefix=prefix),
                                   [f"{prefix}/#"]).start()
        client.publish_and_wait(f"{prefix}/fleet/tag", "1.0", retain=True)
        watch_second.wait_for(f"{prefix}/fleet/tag", text_is("1.0"), timeout=5)
        watch_second.close()
        first.start()
        second.stop()  # the broker in use dies: the client moves to the first
        wait_until(lambda: client.connected, timeout=30, message="a reconnect to the first")
        watch_first = MqttWatcher(first.settings("operator", prefix=prefix),
                                  [f"{prefix}/#"]).start()
        client.publish_and_wait(f"{prefix}/fleet/tag", "2.0", retain=True)
        watch_first.wait_for(f"{prefix}/fleet/tag", text_is("2.0"), timeout=5)
        watch_first.close()
    finally:
        client.stop()


def ctl(pair: Pair, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env.update(PYTHONPATH=str(REPO_ROOT), MQTT_HOST=pair.host_list(), MQTT_USERNAME="operator",
               MQTT_PASSWORD=pair.brokers[0].passwords["operator"], MQTT_TOPIC_PREFIX=prefix)
    return subprocess.run([*EDGE_CTL, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_agent_bridge_and_edge_ctl_fail_over(pair: Pair, unique_repo: str,
                                             container_name: str, tmp_path: Path) -> None:
    first, second = pair.brokers
    prefix = f"f{uuid.uuid4().hex[:6]}"
    topics = Topics(prefix)
    name = container_name
    pair.add(name, ("lab",))
    pair.add("operator", operator=True)
    pair.add("bridge", operator=True)
    for tag in ("1.0", "2.0", "3.0"):
        publish(unique_repo, tag, f"{tag} {name}")
    first.stop()  # everyone starts with the first broker of their list down
    device = Device(unique_repo, name, tmp_path / "data")
    agent = AgentProcess(device.agent_env(**{
        "CONTAINER_IMAGE": f"{unique_repo}:1.0", "HEALTH_TIMEOUT": "1", "FALLBACK_TAG": "",
        "DEVICE_GROUPS": "lab", "POLL_INTERVAL": "600", "LOG_LEVEL": "INFO",
        "MQTT_HOST": pair.host_list(), "MQTT_USERNAME": name,
        "MQTT_PASSWORD": second.passwords[name], "MQTT_TOPIC_PREFIX": prefix,
    }), tmp_path / "agent.log").start()
    bridge = BridgeProcess(second, prefix, BRIDGE_TOKEN, tmp_path / "bridge.log",
                           MQTT_HOST=pair.host_list())
    watch = MqttWatcher(second.settings("operator", prefix=prefix), [f"{prefix}/#"]).start()
    try:
        watch.wait_for(topics.availability(name), text_is("online"), timeout=60,
                       message=f"the agent online on the second broker\n{agent.log()[-3000:]}")
        bridge.start()
        bridge.wait_devices(1)
        result = ctl(pair, prefix, "set-tag", "--device", name, "2.0", "--wait",
                     "--timeout", "90")
        assert result.returncode == 0, result.stdout + result.stderr
        assert wait_until(lambda: device.serving() == f"2.0 {name}", timeout=30)
        watch.close()

        # the broker in use dies; the first comes back: all three move there
        first.start()
        watch = MqttWatcher(first.settings("operator", prefix=prefix), [f"{prefix}/#"]).start()
        second.stop()
        watch.wait_for(topics.availability(name), text_is("online"), timeout=60,
                       message=f"the agent online on the first broker\n{agent.log()[-3000:]}")
        wait_until(lambda: bridge.get("/healthz").status_code == 200, timeout=60,
                   message="the bridge on the first broker")
        response = bridge.session.put(f"{bridge.url}/api/v1/devices/{name}/tag?wait=90",
                                      json={"tag": "3.0"}, timeout=120)
        assert response.status_code == 200, response.text
        assert device.serving() == f"3.0 {name}"
        result = ctl(pair, prefix, "devices", name)
        assert result.returncode == 0 and "3.0" in result.stdout, result.stdout + result.stderr
        assert "MQTT: lost the broker at" in agent.log()
    finally:
        watch.close()
        bridge.stop()
        agent.stop()
