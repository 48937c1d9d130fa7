"""The whole contract on a three-node NATS cluster (issue 13, acceptance 2), MQTT 3.1.1:
real agents on node A, the real bridge on node B, edge-ctl and an observer on node C.
Every client lists all three nodes (MQTT_HOST), its own node first. Users and rights
come from the shipped nats/ files (nats/add-device)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.agent.discovery import discovery_topic
from tests.support import REPO_ROOT, wait_until
from tests.support.bridge_process import BridgeProcess
from tests.support.broker import MqttWatcher
from tests.support.device import publish
from tests.support.fleet import BRIDGE_TOKEN, AgentFleet, settled_on
from tests.support.images import remove_repo_images
from tests.support.nats_cluster import NatsCluster, nats_server

pytestmark = pytest.mark.skipif(nats_server() is None,
                                reason="nats-server is not installed (scripts/stack)")

GROUP = "line-1"
A, B, C = 0, 1, 2
EDGE_CTL = (sys.executable, "-m", "edge_agent.ctl")


class Rig:
    def __init__(self, cluster: NatsCluster, fleet: AgentFleet, watcher: MqttWatcher,
                 bridge: BridgeProcess, prefix: str) -> None:
        self.cluster, self.fleet, self.watcher, self.bridge = cluster, fleet, watcher, bridge
        self.prefix = prefix

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """edge-ctl on node C (then A, B)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
        env.update(self.cluster.agent_env("operator", self.prefix, nodes=[C, A, B]),
                   PYTHONPATH=str(REPO_ROOT))
        return subprocess.run([*EDGE_CTL, *args], env=env, capture_output=True, text=True,
                              timeout=180, check=False)

    def all_settled(self, tag: str, names: list[str] | None = None) -> bool:
        return all(settled_on(self.fleet.state(self.watcher, n), tag)
                   for n in names or self.fleet.names)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[Rig]:
    run = uuid.uuid4().hex[:8]
    repo = f"{registry}/nc{run}/app"
    prefix = f"nc{run}"
    tmp = tmp_path_factory.mktemp("nats")
    for tag in ("1.0", "2.0", "3.0", "4.0"):
        publish(repo, tag, tag)
    with NatsCluster() as cluster:
        cluster.add_operator("bridge")
        cluster.add_operator("operator")
        watcher = MqttWatcher(cluster.settings("operator", prefix=prefix, nodes=[C]),
                              [f"{prefix}/#"]).start()
        # agents on A first (then B, C): all three nodes in their MQTT_HOST
        fleet = AgentFleet(cluster, prefix, repo, f"edge-test-nc{run}", tmp, count=3,
                           groups=[GROUP], HA_DISCOVERY="true", MQTT_PROTOCOL="3.1.1")
        bridge = BridgeProcess(cluster, prefix, BRIDGE_TOKEN, tmp / "bridge.log",
                               data_dir=tmp / "bridge-data",
                               MQTT_HOST=cluster.host_list([B, C, A]), MQTT_PROTOCOL="3.1.1")
        try:
            fleet.start("1.0", watcher, timeout=180)
            bridge.start().wait_devices(len(fleet.names))
            yield Rig(cluster, fleet, watcher, bridge, prefix)
        finally:
            bridge.stop()
            watcher.close()
            fleet.close()
            remove_repo_images(repo)


def test_desired_tags_and_waits_across_nodes(rig: Rig) -> None:
    names = rig.fleet.names
    result = rig.ctl("set-tag", "--fleet", "2.0")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: rig.all_settled("2.0"), timeout=120, interval=0.5,
               message=f"the fleet tag 2.0 applied\n{rig.fleet.logs()}")
    response = rig.bridge.session.put(f"{rig.bridge.url}/api/v1/groups/{GROUP}/tag",
                                      json={"tag": "3.0"}, timeout=30)
    assert response.status_code == 202, response.text
    wait_until(lambda: rig.all_settled("3.0"), timeout=120, interval=0.5,
               message="the group tag 3.0 applied")
    response = rig.bridge.session.put(f"{rig.bridge.url}/api/v1/devices/{names[0]}/tag?wait=120",
                                      json={"tag": "2.0"}, timeout=150)
    assert response.status_code == 200, response.text
    result = rig.ctl("set-tag", "--device", names[1], "2.0", "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    # the answers came as events; the observer on node C sees the states a moment later
    wait_until(lambda: rig.all_settled("2.0", names[:2]) and rig.all_settled("3.0", names[2:]),
               timeout=30, interval=0.5, message="the states after the waits")
    # check --wait: edge-ctl on node C, the agent on node A, answered on its reply topic
    # (MQTT 3.1.1: the command's reply_to names it)
    result = rig.ctl("check", "--device", names[2], "--wait", "--json", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert (answer["ok"], answer["outcome"], answer["tag"]) == (True, "unchanged", "3.0")


def test_home_assistant_discovery_is_seen_on_another_node(rig: Rig) -> None:
    late = MqttWatcher(rig.cluster.settings("operator", nodes=[C]), ["homeassistant/#"]).start()
    try:
        for name in rig.fleet.names:
            message = late.wait_for(discovery_topic(name), timeout=20)
            assert message.retain and message.json()["state_topic"].startswith(rig.prefix)
    finally:
        late.close()


def test_a_rollout_survives_the_death_of_the_agents_node(rig: Rig) -> None:
    body = {"tag": "4.0", "target": {"group": GROUP}, "waves": [1, "100%"],
            "max_updating": 1, "wave_timeout_s": 400}
    # The agents move to node B within seconds (nats-server.conf keeps the MQTT streams
    # on all three nodes); B may refuse some subscriptions for a moment while its
    # JetStream storage settles, which the agents ask for again (protocol/mqtt.py).
    since = len(rig.watcher.messages)
    response = rig.bridge.post("/api/v1/rollouts", body)
    assert response.status_code == 201, response.text

    def started() -> list[dict[str, Any]]:
        """Every update started since the rollout was created, whatever its request."""
        return [e for e in events(rig, since) if e["event"] == "update_started"]
    wait_until(started, timeout=60, message="the rollout's first update")
    rig.cluster.kill(A)  # the agents' node dies mid-rollout
    done = rig.bridge.wait_rollout(response.json()["id"], ["succeeded", "halted"], timeout=600)
    assert done["state"] == "succeeded", f"{done}\n{rig.fleet.logs()}"
    wait_until(lambda: rig.all_settled("4.0"), timeout=30, interval=0.5,
               message="every device's state on 4.0")
    # QoS 1 may deliver an event twice across the node's death: the same event (same
    # timestamp) is one update; two different ones are a device updating twice.
    distinct = {json.dumps(e, sort_keys=True) for e in started()}
    per_device = Counter(json.loads(e)["device_id"] for e in distinct)
    for agent in rig.fleet.agents:
        assert "MQTT: lost the broker at" in agent.log()
    # Exactly once each, to 4.0 (agent/remote.py). Seen before: the rollout cleared a
    # device's own tag while the new node still refused its subscription to the group's
    # tag, and the device went to the group's old tag for a few seconds; and a late
    # granted subscription replayed a device's tag from before the rollout's live one.
    assert per_device == dict.fromkeys(rig.fleet.names, 1), \
        f"{sorted(distinct)}\n{rig.fleet.logs()}"
    assert {json.loads(e)["to_tag"] for e in distinct} == {"4.0"}


def events(rig: Rig, since: int) -> list[dict[str, Any]]:
    """The events the observer has seen from its ``since``-th message on."""
    return [m.json() for m in list(rig.watcher.messages)[since:]
            if m.topic.endswith("/events") and m.payload]
