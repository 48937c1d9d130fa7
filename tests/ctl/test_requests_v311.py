"""``edge-ctl check|install --wait`` on MQTT 3.1.1: no Response Topic there, so the
command's ``reply_to`` names the device's ``reply/<token>`` (docs/PROTOCOL.md §5), and
the operator sees the same answer as on MQTT 5. A real agent on MQTT 3.1.1, the shipped
Mosquitto, the real Docker daemon and the test registry; edge-ctl runs as a process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.ctl.errors import EXIT_OK
from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device, publish

OPERATOR = "ops"  # made by the broker fixture (conftest.py)
V311 = "3.1.1"


def ctl(broker: Broker, *args: str) -> subprocess.CompletedProcess[str]:
    """``edge-ctl ARGS`` as the operator, on MQTT 3.1.1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    env.update(PYTHONPATH=str(REPO_ROOT), MQTT_HOST="127.0.0.1", MQTT_PORT=str(broker.port),
               MQTT_USERNAME=OPERATOR, MQTT_PASSWORD=broker.passwords[OPERATOR],
               MQTT_PROTOCOL=V311)
    return subprocess.run([sys.executable, "-m", "edge_agent.ctl", *args], env=env,
                          capture_output=True, text=True, timeout=150, check=False)


@pytest.fixture
def device(broker: Broker, unique_repo: str, container_name: str,
           tmp_path: Path) -> Iterator[Device]:
    """An agent on MQTT 3.1.1 in notify mode for ``repo:1.0`` (not installed yet: it
    waits for install); 2.0 is published too."""
    publish(unique_repo, "1.0", f"1.0 {container_name}")
    publish(unique_repo, "2.0", f"2.0 {container_name}")
    device = Device(unique_repo, container_name, tmp_path / "data")
    broker.add_device(device.name)
    env = device.agent_env(**{
        "CONTAINER_IMAGE": f"{unique_repo}:1.0", "HEALTH_TIMEOUT": "1", "FALLBACK_TAG": "",
        "TELEMETRY_INTERVAL": "60", "UPDATE_MODE": "notify", "MQTT_PROTOCOL": V311,
        **broker.agent_env(device.name, "edge"),
    })
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    ops = MqttWatcher(broker.settings(OPERATOR, protocol=V311),
                      [Topics("edge").state(device.name)]).start()
    try:
        # subscribed and checked once: a command now reaches it
        ops.wait_for(Topics("edge").state(device.name),
                     lambda m: m.json()["update"]["status"] == "available", timeout=60)
        yield device
    finally:
        agent.stop(signal.SIGTERM)
        print(agent.log()[-6000:])
        ops.publish(Topics("edge").device_tag(device.name), b"", retain=True)
        ops.close()


def test_check_and_install_wait_answer_on_mqtt_3_1_1(broker: Broker, device: Device) -> None:
    name = device.name
    offered = ctl(broker, "check", "--device", name, "--wait", "--json", "--timeout", "60")
    assert offered.returncode == EXIT_OK, offered.stderr
    answer = json.loads(offered.stdout)
    assert (answer["ok"], answer["outcome"], answer["tag"]) == (True, "available", "1.0")
    installed = ctl(broker, "install", "--device", name, "--wait", "--timeout", "90")
    assert installed.returncode == EXIT_OK, installed.stderr
    assert device.serving() == f"1.0 {name}"
    up_to_date = ctl(broker, "check", "--device", name, "--wait", "--timeout", "60")
    assert up_to_date.returncode == EXIT_OK, up_to_date.stderr
    assert up_to_date.stdout == f"{name}: up to date: runs 1.0\n"

    assert ctl(broker, "set-tag", "2.0", "--device", name, "--force").returncode == EXIT_OK
    # notify mode: the check finds 2.0 and says so, without applying it
    offered = ctl(broker, "check", "--device", name, "--wait", "--json", "--timeout", "60")
    assert offered.returncode == EXIT_OK, offered.stderr
    answer = json.loads(offered.stdout)
    assert (answer["ok"], answer["outcome"], answer["tag"]) == (True, "available", "2.0")
    assert answer["request_id"] and "error" not in answer
    assert device.serving() == f"1.0 {name}"

    installed = ctl(broker, "install", "--device", name, "--wait", "--json", "--timeout", "90")
    assert installed.returncode == EXIT_OK, installed.stderr
    answer = json.loads(installed.stdout)
    assert (answer["ok"], answer["outcome"], answer["tag"]) == (True, "updated", "2.0")
    assert answer["digest"].startswith("sha256:")
    assert device.serving() == f"2.0 {name}"
