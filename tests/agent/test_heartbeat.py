"""The state over MQTT on change plus a heartbeat, and the agent's MQTT keepalive
(issue 13, wire cost): pure decisions first, then real agents on a real Mosquitto."""

from __future__ import annotations

import itertools
import queue
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.config import load_settings
from edge_agent.agent.heartbeat import StateGate, content_of
from edge_agent.agent.link import AgentLink
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device, publish


def state(ts: str, status: str = "idle") -> dict[str, Any]:
    return {"device_id": "d1", "ts": ts, "update": {"status": status}}


# -- pure decisions -------------------------------------------------------------------
def test_an_unchanged_state_waits_for_the_heartbeat() -> None:
    gate = StateGate(heartbeat_s=60.0)
    assert gate.due(state("t0"), now=0.0)  # the first of a connection
    gate.sent(state("t0"), now=0.0)
    assert not gate.due(state("t1"), now=1.0)  # only ts moved
    assert not gate.due(state("t2"), now=59.9)
    assert gate.due(state("t3"), now=60.0)  # the heartbeat


def test_a_change_is_due_at_once_and_a_new_connection_sends_again() -> None:
    gate = StateGate(heartbeat_s=60.0)
    gate.sent(state("t0"), now=0.0)
    assert gate.due(state("t1", status="pulling"), now=0.5)
    gate.sent(state("t1", status="pulling"), now=0.5)
    assert not gate.due(state("t2", status="pulling"), now=1.0)
    gate.reset()
    assert gate.due(state("t3", status="pulling"), now=1.5)


def test_only_ts_is_ignored() -> None:
    assert content_of(state("t0")) == {"device_id": "d1", "update": {"status": "idle"}}


def test_keepalive_and_heartbeat_settings() -> None:
    base = {"CONTAINER_IMAGE": "registry/app", "DEVICE_ID": "d1"}
    defaults = load_settings(base)
    assert defaults.mqtt_keepalive_s == 300
    assert defaults.heartbeat_interval_s == 3600.0
    chosen = load_settings({**base, "MQTT_KEEPALIVE": "60", "HEARTBEAT_INTERVAL": "120"})
    assert (chosen.mqtt_keepalive_s, chosen.heartbeat_interval_s) == (60, 120.0)
    for bad in ("0", "4", "65536", "1.5", "x"):
        with pytest.raises(ConfigError, match="MQTT_KEEPALIVE"):
            load_settings({**base, "MQTT_KEEPALIVE": bad})
    with pytest.raises(ConfigError, match="HEARTBEAT_INTERVAL"):
        load_settings({**base, "HEARTBEAT_INTERVAL": "0"})


# -- real agents on a real broker ---------------------------------------------------
@pytest.fixture
def agent_of(broker: Broker, prefix: str, unique_repo: str, container_name: str,
             tmp_path: Path) -> Iterator[Any]:
    """Starts one agent process for the test's device; killed at teardown (before the
    container fixtures remove the app)."""
    started: list[AgentProcess] = []

    def start(**extra: str) -> tuple[Device, AgentProcess]:
        publish(unique_repo, "1.0", "1.0")
        device = Device(unique_repo, container_name, tmp_path / "data")
        broker.add_device(device.name)
        env = device.agent_env(**{
            "CONTAINER_IMAGE": f"{unique_repo}:1.0", "HEALTH_TIMEOUT": "1",
            "FALLBACK_TAG": "", "POLL_INTERVAL": "10",
            **broker.agent_env(device.name, prefix), **extra,
        })
        agent = AgentProcess(env, tmp_path / "agent.log").start()
        started.append(agent)
        return device, agent

    yield start
    for agent in started:
        if agent.alive:
            agent.stop(signal.SIGKILL)
        print(agent.log()[-6000:])


def settled(watcher: MqttWatcher, topics: Topics, device: str) -> float:
    """Waits for the first state running 1.0; when it arrived."""
    found = watcher.wait_for(
        topics.state(device),
        lambda m: m.json()["running"]["status"] == "running"
        and m.json()["update"]["status"] == "idle", timeout=60, message="a settled state")
    return found.at


@pytest.mark.broker
def test_an_idle_agent_publishes_no_state_until_something_changes(
    watcher: MqttWatcher, prefix: str, agent_of: Any, docker_client: docker.DockerClient,
) -> None:
    """It looks at its container twice a second (status.json moves), but the broker
    hears nothing new until the container dies: then at once."""
    device, _ = agent_of(TELEMETRY_INTERVAL="0.5", HEARTBEAT_INTERVAL="3600")
    topics = Topics(prefix)
    settled(watcher, topics, device.name)
    time.sleep(1.0)  # the first check's last states (the subscription's replay) land
    mark = time.monotonic()
    first_ts = device.status()["ts"]
    time.sleep(4.0)  # eight looks at the container
    assert device.status()["ts"] != first_ts  # the loop ran and refreshed status.json
    assert [m for m in watcher.on(topics.state(device.name)) if m.at >= mark] == []

    docker_client.containers.get(device.name).kill()
    watcher.wait_for(topics.state(device.name),
                     lambda m: m.json()["running"]["status"] == "exited",
                     since=mark, timeout=10, message="the exited container")


@pytest.mark.broker
def test_an_unchanged_state_is_sent_again_at_the_heartbeat(
    watcher: MqttWatcher, prefix: str, agent_of: Any,
) -> None:
    device, _ = agent_of(TELEMETRY_INTERVAL="0.5", HEARTBEAT_INTERVAL="2")
    topics = Topics(prefix)
    since = settled(watcher, topics, device.name) + 1.0
    wait_until(lambda: len([m for m in watcher.on(topics.state(device.name))
                            if m.at >= since]) >= 2, timeout=15, message="two heartbeats")
    beats = [m.json() for m in watcher.on(topics.state(device.name)) if m.at >= since]
    assert content_of(beats[0]) == content_of(beats[1])
    assert beats[0]["ts"] < beats[1]["ts"]
    arrivals = [m.at for m in watcher.on(topics.state(device.name)) if m.at >= since]
    # not at every look at the container (0.5 s)
    assert all(later - earlier > 1.0 for earlier, later in itertools.pairwise(arrivals))


@pytest.mark.broker
def test_a_frozen_agent_goes_offline_within_one_and_a_half_keepalives(
    watcher: MqttWatcher, prefix: str, agent_of: Any,
) -> None:
    """MQTT_KEEPALIVE reaches the broker: with 5 s the will speaks within 7.5 s (with
    the old fixed 30 s it took 45 s)."""
    device, agent = agent_of(MQTT_KEEPALIVE="5")
    topics = Topics(prefix)
    settled(watcher, topics, device.name)
    mark = time.monotonic()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGSTOP)  # silent: no goodbye, no pings
    try:
        watcher.wait_for(topics.availability(device.name), lambda m: m.text == "offline",
                         since=mark, timeout=20, message="the will after 1.5 x keepalive")
    finally:
        agent.proc.send_signal(signal.SIGCONT)


@pytest.mark.broker
def test_the_default_keepalive_is_five_minutes(broker: Broker, prefix: str) -> None:
    broker.add_device("d1")
    settings = load_settings({"CONTAINER_IMAGE": "registry/app", "DEVICE_ID": "d1",
                              **broker.agent_env("d1", prefix)})
    link = AgentLink(settings, queue.Queue())
    link.broker.start(wait_s=10)
    try:
        client = link.broker._client  # what paho was given is the point
        assert client is not None
        assert client.keepalive == 300
    finally:
        link.stop()
