"""Home Assistant MQTT discovery (HA_DISCOVERY=true): the config message, the state
keys Home Assistant reads, and the install button against a real agent and broker."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_settings
from edge_agent.discovery import discovery_config, discovery_topic, node_id
from edge_agent.reconcile import Desired, Source
from edge_agent.status import RunningView, Status, UpdateStatus
from edge_agent.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device, publish

# Home Assistant's own rule for the node and object ids of a discovery topic.
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def settings_for(device_id: str, **extra: str) -> Any:
    return load_settings({"CONTAINER_IMAGE": "registry.example.com/acme/app:1.0",
                          "DEVICE_ID": device_id, "DATA_DIR": "/nonexistent",
                          "MQTT_HOST": "broker", "MQTT_TOPIC_PREFIX": "fleet1",
                          "HA_DISCOVERY": "true", **extra})


def test_discovery_config_describes_an_update_entity_on_the_agents_topics() -> None:
    topic, config = discovery_config(settings_for("pump-7"))
    topics = Topics("fleet1")
    assert topic == "homeassistant/update/pump-7/app/config"
    assert config["state_topic"] == topics.state("pump-7")
    assert config["command_topic"] == topics.device_install("pump-7")
    assert config["availability_topic"] == topics.availability("pump-7")
    assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
    assert config["payload_install"] == "install"
    assert config["unique_id"] == "edge-agent-pump-7-app"
    assert config["device"]["identifiers"] == ["edge-agent-pump-7"]
    assert config["device"]["name"] == "pump-7"
    assert config["title"] == "registry.example.com/acme/app"
    # no value template: the state JSON carries Home Assistant's keys itself
    assert "value_template" not in config and "latest_version_topic" not in config
    json.dumps(config)  # it is sent as JSON


def test_device_ids_become_valid_discovery_ids() -> None:
    for device_id in ("pump-7", "pump.7", "a b", "x:y", "ünï"):
        node = node_id(device_id)
        assert HA_ID.match(node), node
        assert discovery_topic(device_id).split("/")[2] == node
    assert node_id("pump.7") == "pump_7"  # what mosquitto/add-device allows in the ACL


@pytest.mark.parametrize("status", list(UpdateStatus))
def test_state_carries_home_assistants_update_keys(status: UpdateStatus) -> None:
    state = Status(device_id="d", image="repo")
    state.desired = Desired("2.0", Source.DEVICE)
    state.running = RunningView(tag="1.0", status="running")
    state.update_status = status
    state.progress = 40.0 if status is UpdateStatus.PULLING else None
    document = state.document()
    assert document["installed_version"] == "1.0"
    assert document["latest_version"] == "2.0"
    assert isinstance(document["in_progress"], bool)
    percentage = document["update_percentage"]
    assert percentage is None or (document["in_progress"] and 0 <= percentage <= 100)
    if status is UpdateStatus.PULLING:
        assert (document["in_progress"], percentage) == (True, 40.0)


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_operator("ha")
        yield started


@pytest.mark.broker
def test_home_assistant_discovers_the_device_and_installs_with_its_button(
    broker: Broker, unique_repo: str, container_name: str, tmp_path: Path, test_id: str,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    prefix = f"t{test_id}"
    device = Device(unique_repo, container_name, tmp_path / "data")
    broker.add_device(device.name)
    # Home Assistant subscribes to its discovery prefix, then to what the config names.
    ha = MqttWatcher(broker.settings("ha", prefix=prefix),
                     ["homeassistant/update/#", f"{prefix}/#"]).start()
    env = device.agent_env(CONTAINER_IMAGE=f"{unique_repo}:1.0", UPDATE_MODE="notify",
                           HA_DISCOVERY="true", HEALTH_TIMEOUT="1", FALLBACK_TAG="",
                           **broker.agent_env(device.name, prefix))
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        found = ha.wait_for(discovery_topic(device.name))
        config = found.json()
        assert config["state_topic"] == Topics(prefix).state(device.name)
        ha.wait_for(config["availability_topic"], lambda m: m.text == config["payload_available"])
        ha.wait_for(config["state_topic"],
                    lambda m: m.json()["latest_version"] == "1.0"
                    and m.json()["installed_version"] is None
                    and m.json()["in_progress"] is False,
                    message="an update offered in notify mode")

        mark = time.monotonic()
        ha.publish(config["command_topic"], config["payload_install"])  # the button
        ha.wait_for(config["state_topic"], lambda m: m.json()["in_progress"] is True,
                    since=mark, message="in_progress while installing")
        ha.wait_for(config["state_topic"],
                    lambda m: m.json()["installed_version"] == m.json()["latest_version"] == "1.0"
                    and m.json()["in_progress"] is False, since=mark, timeout=30,
                    message="installed")
        assert device.serving() == "1.0"
        assert found.retain or ha.on(discovery_topic(device.name))  # retained for HA restarts
    finally:
        agent.stop()
        ha.close()
        print(agent.log()[-5000:])
