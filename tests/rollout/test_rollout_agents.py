"""Rollouts with real agents, a real broker and the real registry (issue 12,
acceptance 1, 2, 3 and 5): 12 agents in group line-1, driven by edge-bridge as its own
process, watched through the agents' own events."""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import wait_until
from tests.support.bridge_process import BridgeProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import publish
from tests.support.fleet import BRIDGE_TOKEN, AgentFleet
from tests.support.images import remove_repo_images

GROUP = "line-1"
CAP = 3
WAVES: list[Any] = [1, "25%", "100%"]


class Rig:
    def __init__(self, broker: Broker, fleet: AgentFleet, watcher: MqttWatcher,
                 bridge: BridgeProcess) -> None:
        self.broker, self.fleet, self.watcher, self.bridge = broker, fleet, watcher, bridge

    def events(self, rollout_id: str) -> list[dict[str, Any]]:
        """The agents' own events answering this rollout's requests, in their order."""
        found = []
        for message in list(self.watcher.messages):
            if message.topic.endswith("/events") and message.payload:
                event = message.json()
                if str(event.get("request_id", "")).startswith(f"{rollout_id}:"):
                    found.append(event)
        return sorted(found, key=lambda e: str(e.get("ts")))

    def tag_messages(self) -> list[str]:
        return [m.topic for m in list(self.watcher.messages) if m.topic.endswith("/tag")]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[Rig]:
    run = uuid.uuid4().hex[:8]
    repo = f"{registry}/ro{run}/app"
    prefix = f"ro{run}"
    tmp = tmp_path_factory.mktemp("rollout")
    for tag in ("1.0", "2.0", "3.0"):
        publish(repo, tag, tag)
    publish(repo, "bad", "bad", "exits")
    with Broker() as broker:
        broker.add_operator("bridge")
        broker.add_operator("watcher")
        watcher = MqttWatcher(broker.settings("watcher", prefix=prefix), [f"{prefix}/#"]).start()
        fleet = AgentFleet(broker, prefix, repo, f"edge-test-ro{run}", tmp, groups=[GROUP])
        bridge = BridgeProcess(broker, prefix, BRIDGE_TOKEN, tmp / "bridge.log",
                               data_dir=tmp / "bridge-data")
        try:
            fleet.start("1.0", watcher)
            bridge.start().wait_devices(len(fleet.names))
            yield Rig(broker, fleet, watcher, bridge)
        finally:
            bridge.stop()
            watcher.close()
            fleet.close()
            remove_repo_images(repo)


def start(rig: Rig, **fields: Any) -> dict[str, Any]:
    body = {"tag": "2.0", "target": {"group": GROUP}, "waves": WAVES, "max_updating": CAP,
            "wave_timeout_s": 120, **fields}
    response = rig.bridge.post("/api/v1/rollouts", body)
    assert response.status_code == 201, response.text
    document: dict[str, Any] = response.json()
    return document


def peak_updating(events: list[dict[str, Any]]) -> int:
    """Most devices between update_started and their end event at once."""
    busy: set[str] = set()
    peak = 0
    for event in events:
        if event["event"] == "update_started":
            busy.add(event["device_id"])
        elif event["event"] in ("update_succeeded", "rolled_back", "update_failed"):
            busy.discard(event["device_id"])
        peak = max(peak, len(busy))
    return peak


def check_clean_end(rig: Rig, tag: str) -> None:
    group = rig.watcher.last(rig.fleet.topics.group_tag(GROUP))
    assert group is not None and json.loads(group.payload)["tag"] == tag
    for name in rig.fleet.names:  # every override of the rollout cleared
        last = rig.watcher.last(rig.fleet.topics.device_tag(name))
        assert last is not None and last.payload == b"", name
        # and each device follows the group's tag now, not a leftover of the rollout
        state = wait_until(functools.partial(follows_group, rig, name),
                           timeout=20, message=f"{name} to follow the group's tag")
        assert state["running"]["tag"] == tag, name


def follows_group(rig: Rig, name: str) -> dict[str, Any] | None:
    """The device's state once its desired tag comes from the rollout's group."""
    state = rig.fleet.state(rig.watcher, name)
    desired = (state or {}).get("desired") or {}
    return state if desired.get("source") == "group" and desired.get("group") == GROUP else None


def test_bad_specs_are_refused_and_publish_nothing(rig: Rig) -> None:
    """Acceptance 5."""
    before = len(rig.tag_messages())
    cases = [
        ({"tag": "2.0", "target": {"devices": ["nobody-here"]}}, "target.devices"),
        ({"tag": "2.0", "target": {"group": GROUP}, "waves": [0]}, "waves[0]"),
        ({"tag": "2.0", "target": {"group": GROUP}, "waves": [12, "50%"]}, "waves[1]"),
        ({"tag": "no good", "target": {"group": GROUP}}, "tag"),
        ({"tag": "2.0", "target": {"group": GROUP}, "failure_threshold": 1.5},
         "failure_threshold"),
        ({"tag": "2.0", "target": {"group": GROUP}, "success_threshold": 0}, "success_threshold"),
        ({"tag": "2.0", "target": {"group": "nobody"}}, "target"),
    ]
    for body, field in cases:
        response = rig.bridge.post("/api/v1/rollouts", body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"].startswith(f"{field}:"), response.text
    response = rig.bridge.post("/api/v1/rollouts", data=b"{not json")
    assert response.status_code == 400
    assert rig.bridge.get("/api/v1/rollouts").json() == {"rollouts": []}
    assert rig.bridge.post("/api/v1/rollouts/ro-nothing/pause").status_code == 404
    time.sleep(1.5)  # a publish would have reached the watcher by now
    assert len(rig.tag_messages()) == before


def test_a_good_tag_rolls_out_in_waves_within_the_cap_and_ends_clean(rig: Rig) -> None:
    """Acceptance 1."""
    rollout = start(rig, tag="2.0")
    assert [len(w["devices"]) for w in rollout["waves"]] == [1, 2, 9]
    again = rig.bridge.post("/api/v1/rollouts", {"tag": "2.0", "target": {"group": GROUP}})
    assert again.status_code == 409, again.text  # overlapping active rollout
    done = rig.bridge.wait_rollout(rollout["id"], ["succeeded", "halted"], timeout=240)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[:3000]
    assert done["counts"]["succeeded"] == 12
    events = rig.events(rollout["id"])
    started = [e["device_id"] for e in events if e["event"] == "update_started"]
    assert sorted(started) == sorted(rig.fleet.names)  # each device once
    assert peak_updating(events) <= CAP
    check_clean_end(rig, "2.0")


def test_a_crashing_tag_halts_after_the_canary_and_rolls_it_back(rig: Rig) -> None:
    """Acceptance 2."""
    rollout = start(rig, tag="bad", on_halt="revert")
    canary = rollout["waves"][0]["devices"][0]["device_id"]
    done = rig.bridge.wait_rollout(rollout["id"], ["halted", "succeeded"], timeout=120)
    assert done["state"] == "halted"
    assert done["reason"].startswith("wave 0 halted: 1 of 1 devices failed")
    assert canary in done["reason"]
    assert "rolled_back" in done["reason"] or "rolled back" in done["reason"]  # event or state
    events = rig.events(rollout["id"])
    assert {e["device_id"] for e in events if e["event"] == "update_started"} <= {canary}
    assert [e["device_id"] for e in events if e["event"] == "rolled_back"] == [canary]
    assert done["waves"][0]["devices"][0]["outcome"] == "reverted"
    # the canary runs 2.0 again and its desired state is the group's 2.0 again
    last = rig.watcher.last(rig.fleet.topics.device_tag(canary))
    assert last is not None and last.payload == b""
    state = rig.fleet.state(rig.watcher, canary)
    assert state is not None and state["running"]["tag"] == "2.0"


def test_a_killed_controller_resumes_and_never_sends_twice(rig: Rig) -> None:
    """Acceptance 3: SIGKILL in the middle of the last wave, start again, same end."""
    rollout = start(rig, tag="3.0")

    def mid_wave() -> bool:
        document = rig.bridge.get(f"/api/v1/rollouts/{rollout['id']}").json()
        counts = document["counts"]
        return bool(document["current_wave"] == 2 and counts["succeeded"] < 12
                    and counts["sent"] + counts["updating"] > 0)

    wait_until(mid_wave, timeout=180, interval=0.2, message="the last wave under way")
    rig.bridge.kill()
    rig.bridge.start().wait_devices(len(rig.fleet.names))
    done = rig.bridge.wait_rollout(rollout["id"], ["succeeded", "halted"], timeout=240)
    assert done["state"] == "succeeded", json.dumps(done, indent=1)[:3000]
    events = rig.events(rollout["id"])
    started = [e["device_id"] for e in events if e["event"] == "update_started"]
    assert sorted(started) == sorted(rig.fleet.names)  # each device exactly once
    assert peak_updating(events) <= CAP
    check_clean_end(rig, "3.0")
    assert "resuming " + rollout["id"] in rig.bridge.log()

