"""The bridge asks the registry before it publishes a desired tag, and shows which group
or fleet tag a device's own tag shadows: a real bridge, the real broker (an operator
watches every topic), the real registry. The devices' states are the agent's own
documents (``Status``), published retained as an agent does."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from edge_agent.agent.reconcile import Desired
from edge_agent.agent.status import Status
from edge_agent.bridge.server import Bridge
from edge_agent.protocol.state import Source
from edge_agent.protocol.topics import Topics
from edge_agent.registry_probe import ProbeSettings
from tests.bridge.support import ApiClient, running_bridge
from tests.support import free_port, wait_until
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import publish

CHECKED = ProbeSettings(timeout_s=3.0)


@pytest.fixture
def checking_bridge(broker: Broker, prefix: str) -> Iterator[Bridge]:
    with running_bridge(broker, prefix, max_wait_s=30, registry=CHECKED) as bridge:
        yield bridge


@pytest.fixture
def client(checking_bridge: Bridge) -> Iterator[ApiClient]:
    with ApiClient(checking_bridge.url) as api:
        yield api


@pytest.fixture
def device_writer(broker: Broker, prefix: str) -> Iterator[MqttWatcher]:
    """Publishes device states (the simulator user may write device telemetry)."""
    writer = MqttWatcher(broker.settings("simulator", prefix=prefix), []).start()
    yield writer
    writer.close()


def report(writer: MqttWatcher, bridge: Bridge, device_id: str, image: str, *,  # noqa: PLR0913
           groups: tuple[str, ...] = (), own_tag: str | None = None) -> None:
    """Publish ``device_id``'s retained state as its agent would, and wait for the bridge
    to show it."""
    status = Status(device_id=device_id, image=image, groups=groups)
    if own_tag is not None:
        status.desired = Desired(own_tag, Source.DEVICE, None)
    topics = Topics(bridge.topics.prefix)
    writer.publish(topics.state(device_id), json.dumps(status.document()), retain=True)
    wait_until(lambda: bridge.fleet.device(device_id) is not None, timeout=10,
               message=f"the bridge shows {device_id}")


def nothing_published(watcher: MqttWatcher, writer: MqttWatcher, topic: str) -> bool:
    """No message on ``topic`` up to now: a marker published after the request has
    arrived, so anything the request published would have too."""
    marker = Topics(topic.split("/", 1)[0]).state(f"marker-{uuid.uuid4().hex[:6]}")
    writer.publish(marker, b"{}")
    watcher.wait_for(marker, timeout=10)
    return watcher.on(topic) == []


def test_a_missing_tag_is_refused_and_nothing_is_published(
    client: ApiClient, checking_bridge: Bridge, watcher: MqttWatcher,
    device_writer: MqttWatcher, unique_repo: str,
) -> None:
    publish(unique_repo, "1.0", "1.0 checked")
    report(device_writer, checking_bridge, "dev1", unique_repo, groups=("line-1",))
    topics = checking_bridge.topics
    for path, topic in [("/api/v1/devices/dev1/tag", topics.device_tag("dev1")),
                        ("/api/v1/groups/line-1/tag", topics.group_tag("line-1")),
                        ("/api/v1/fleet/tag", topics.fleet_tag)]:
        refused = client.put(path, json={"tag": "9.9"})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert f"tag 9.9 does not exist in {unique_repo}" in error
        assert "FALLBACK_TAG" in error and "?force=true" in error
        assert nothing_published(watcher, device_writer, topic)

        forced = client.put(f"{path}?force=true", json={"tag": "9.9"})
        assert forced.status_code == 202, forced.text
        assert "warnings" not in forced.json()
        assert watcher.wait_for(topic, timeout=10).json()["tag"] == "9.9"

        existing = client.put(path, json={"tag": "1.0"})
        assert existing.status_code == 202, existing.text
        assert "warnings" not in existing.json()
        assert watcher.wait_for(topic, lambda m: m.json()["tag"] == "1.0", timeout=10)
        client.delete(path)
    assert client.put("/api/v1/fleet/tag?force=maybe", json={"tag": "1.0"}).status_code == 400


def test_an_unreachable_registry_warns_and_publishes(
    client: ApiClient, checking_bridge: Bridge, watcher: MqttWatcher,
    device_writer: MqttWatcher,
) -> None:
    port = free_port()  # nothing listens there
    report(device_writer, checking_bridge, "dev2", f"127.0.0.1:{port}/acme/app")
    answer = client.put("/api/v1/devices/dev2/tag", json={"tag": "9.9"})
    assert answer.status_code == 202, answer.text
    [warning] = answer.json()["warnings"]
    assert warning.startswith(f"could not ask the registry whether 127.0.0.1:{port}/acme/app:9.9"
                              " exists (")
    assert "unreachable" in warning and warning.endswith("; set anyway")
    assert watcher.wait_for(checking_bridge.topics.device_tag("dev2"), timeout=10)

    # nobody in the group has reported: nothing to ask, said so, published
    nobody = client.put("/api/v1/groups/empty-group/tag", json={"tag": "9.9"})
    assert nobody.status_code == 202, nobody.text
    assert nobody.json()["warnings"] == [
        "the registry was not asked whether tag 9.9 exists: the devices of group "
        "empty-group reported no image repository yet"]
    assert watcher.wait_for(checking_bridge.topics.group_tag("empty-group"), timeout=10)
    for path in ("/api/v1/devices/dev2/tag", "/api/v1/groups/empty-group/tag"):
        client.delete(path)


def test_the_device_view_shows_a_device_tag_shadowing_a_group_tag(
    client: ApiClient, checking_bridge: Bridge, device_writer: MqttWatcher,
) -> None:
    report(device_writer, checking_bridge, "dev3", "127.0.0.1:5000/acme/app",
           groups=("line-0", "line-1"), own_tag="9.9")
    report(device_writer, checking_bridge, "dev4", "127.0.0.1:5000/acme/app",
           groups=("line-1",))  # follows whatever its group says: shadows nothing
    assert client.get("/api/v1/devices/dev3").json()["shadows"] is None

    assert client.put("/api/v1/fleet/tag?force=true", json={"tag": "3.0"}).status_code == 202
    fleet = {"scope": "fleet", "group": None, "tag": "3.0"}
    wait_until(lambda: client.get("/api/v1/devices/dev3").json()["shadows"] == fleet,
               timeout=10, message="the fleet tag shadowed")
    assert client.put("/api/v1/groups/line-1/tag?force=true",
                      json={"tag": "2.0"}).status_code == 202
    group = {"scope": "group", "group": "line-1", "tag": "2.0"}
    wait_until(lambda: client.get("/api/v1/devices/dev3").json()["shadows"] == group,
               timeout=10, message="the group tag shadowed")
    listed = {d["id"]: d for d in client.get("/api/v1/devices").json()["devices"]}
    assert listed["dev3"]["shadows"] == group and listed["dev4"]["shadows"] is None

    # the group tag cleared: the fleet's is the one shadowed again
    client.delete("/api/v1/groups/line-1/tag")
    wait_until(lambda: client.get("/api/v1/devices/dev3").json()["shadows"] == fleet,
               timeout=10, message="back to the fleet tag")
    client.delete("/api/v1/fleet/tag")
    wait_until(lambda: client.get("/api/v1/devices/dev3").json()["shadows"] is None,
               timeout=10, message="nothing shadowed")
