"""The Home Assistant ``update`` entity against real Home Assistant releases.

Each release in tests/stack/home-assistant.txt (installed by scripts/stack into its own
cached virtualenv) runs as a real process against the test broker (Mosquitto from
``mosquitto/``), with a real agent, Docker and registry: what Home Assistant makes of
our discovery config and state payloads is Home Assistant's own code deciding, not a
copy of its rules. One Home Assistant per release serves every test of this module.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.discovery import NOT_INSTALLED, discovery_topic, update_payload
from edge_agent.agent.reconcile import PullProgress
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device, publish
from tests.support.homeassistant import HomeAssistant, Release, releases, venv_python
from tests.support.images import build_and_push, remove_registry_images
from tests.support.registry import PrivateRegistry
from tests.support.slowpull import ThrottledProxy, push_large_image

RELEASES = releases()
WITH_PROGRESS = [r for r in RELEASES if r.has_progress]
HA_USER = "homeassistant"
OPERATOR = "ops"

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_operator(HA_USER)  # Home Assistant logs in as an operator
        started.add_operator(OPERATOR)
        yield started


@pytest.fixture(scope="module", params=RELEASES, ids=str)
def home_assistant(request: pytest.FixtureRequest, broker: Broker) -> Iterator[HomeAssistant]:
    release: Release = request.param
    ha = HomeAssistant(release, mqtt_port=broker.port, mqtt_user=HA_USER,
                       mqtt_password=broker.passwords[HA_USER])
    try:
        ha.start()
        print(f"Home Assistant {release} started in {ha.startup_s:.1f} s")
        yield ha
    except BaseException:
        print(ha.log()[-8000:])
        raise
    finally:
        ha.close()


@pytest.fixture
def operator(broker: Broker, test_id: str) -> Iterator[MqttWatcher]:
    watcher = MqttWatcher(broker.settings(OPERATOR, prefix=f"t{test_id}"), []).start()
    yield watcher
    watcher.close()


def agent_for(device: Device, broker: Broker, prefix: str, tmp_path: Path,
              **env: str) -> AgentProcess:
    broker.add_device(device.name)
    full = device.agent_env(HA_DISCOVERY="true", FALLBACK_TAG="", HEALTH_TIMEOUT="1",
                            TELEMETRY_INTERVAL="60", **broker.agent_env(device.name, prefix),
                            **env)
    return AgentProcess(full, tmp_path / "agent.log").start()


def is_state(state: str, **attributes: Any) -> Callable[[dict[str, Any]], bool]:
    """A predicate: the entity's state is ``state`` and these attributes have these values."""
    def check(found: dict[str, Any]) -> bool:
        attrs = found["attributes"]
        return found["state"] == state and all(attrs.get(k) == v for k, v in attributes.items())
    return check


def show(ha: HomeAssistant, agent: AgentProcess) -> None:
    print("---- agent log ----\n" + agent.log()[-4000:])
    print("---- Home Assistant log ----\n" + ha.log()[-6000:])


# -- Home Assistant's own decision, without a running instance -------------------------
def tag_pairs() -> list[tuple[str | None, str | None, bool]]:
    """(installed, target, pending) cases: numeric orders both ways, equal values in
    other spellings, pre-releases, words, dates, digests, nothing installed."""
    tags = ["1.0", "1.0.0", "v1.0", "2.0", "1.10", "1.9", "10", "9", "2024.11.0", "2024.9.1",
            "1.0-rc1", "1.0rc1", "2.0b1", "latest", "stable", "dev", "beta", "edge", "main",
            "sha-3f2a9c1", "2024-01-02", "20240102", "01.2", "1.02", "v2", "V2", "_x", "a.b",
            "1.0-alpine", "12345678901234567890", "0", "0.0.0"]
    cases: list[tuple[str | None, str | None, bool]] = []
    for installed in [*tags, None]:
        for target in [*tags, None]:
            for pending in (False, True):
                if target is None and pending:
                    continue
                cases.append((installed, target, pending))
    return cases


@pytest.mark.parametrize("release", RELEASES, ids=str)
def test_home_assistants_own_code_offers_the_update_exactly_when_the_tags_differ(
    release: Release,
) -> None:
    """For every pair, the payload the agent sends goes through the release's own
    UpdateEntity.state (AwesomeVersion), and from 2024.11 through the MQTT platform's
    payload schema: "on" exactly when an update waits or the tags differ."""
    cases = tag_pairs()
    payloads = [update_payload(i, t, pending=p, in_progress=False, percentage=None)
                for i, t, p in cases]
    script = """
import json, sys
from homeassistant.components.update import UpdateEntity
try:
    from homeassistant.components.mqtt.update import MQTT_JSON_UPDATE_SCHEMA as SCHEMA
except ImportError:  # before 2024.11 the payload was not validated
    SCHEMA = None

class Entity(UpdateEntity):
    def __init__(self, installed, latest):
        self._attr_installed_version = installed
        self._attr_latest_version = latest

out = []
for payload in json.load(sys.stdin):
    if SCHEMA is not None:
        SCHEMA(payload)
    out.append(Entity(payload["installed_version"], payload["latest_version"]).state)
print(json.dumps(out))
"""
    done = subprocess.run([str(venv_python(release)), "-c", script], input=json.dumps(payloads),
                          capture_output=True, text=True, timeout=120, check=False, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    states = json.loads(done.stdout)
    wrong = []
    for (installed, target, pending), payload, state in zip(cases, payloads, states,
                                                            strict=True):
        expected = "on" if pending or (target is not None and target != installed) else "off"
        if state != expected:
            wrong.append(f"installed={installed!r} target={target!r} pending={pending}: "
                         f"{payload} -> {state}, want {expected}")
    assert not wrong, "\n".join(wrong[:40])


def test_pull_percentage_of_an_image_on_a_reused_base_stays_below_100_until_done() -> None:
    """Docker's message order for an image whose first layer exists locally."""
    progress = PullProgress()
    messages: list[dict[str, Any]] = [
        {"status": "Pulling from t/app", "id": "2.0"},
        {"status": "Already exists", "id": "base"},
        {"status": "Pulling fs layer", "id": "app"},
        {"status": "Downloading", "id": "app", "progressDetail": {"current": 10, "total": 100}},
        {"status": "Downloading", "id": "app", "progressDetail": {"current": 60, "total": 100}},
    ]
    reported = [p for p in (progress.update(m) for m in messages) if p is not None]
    assert reported and all(p < 100 for p in reported), reported


# -- a real Home Assistant, a real agent ------------------------------------------------
def test_update_entity_offers_installs_and_downgrades_in_notify_mode(  # noqa: PLR0913, PLR0917
    home_assistant: HomeAssistant, broker: Broker, operator: MqttWatcher, unique_repo: str,
    container_name: str, tmp_path: Path, test_id: str,
) -> None:
    """Acceptance: "on" when an update waits (notify mode), the install button applies
    it on the real agent, "off" when current, a downgrade is offered too, attributes
    render, "unavailable" when the agent stops; nothing in Home Assistant's log."""
    ha = home_assistant
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    prefix = f"t{test_id}"
    device = Device(unique_repo, container_name, tmp_path / "data")
    agent = agent_for(device, broker, prefix, tmp_path, CONTAINER_IMAGE=f"{unique_repo}:2.0",
                      UPDATE_MODE="notify")
    try:
        entity = ha.find_entity("update", lambda s: s["attributes"].get("title") == unique_repo,
                                message="the discovered update entity")
        # a fresh device: nothing runs, 2.0 waits for the button
        state = ha.wait_state(entity, is_state("on", installed_version=NOT_INSTALLED,
                                               latest_version="2.0"),
                              message="an update offered to a fresh device")
        attrs = state["attributes"]
        assert attrs["desired_tag"] == "2.0" and attrs["desired_source"] == "image"
        assert attrs["update_status"] == "available"
        assert attrs["container_status"] == "missing" and attrs["fallback_active"] is False
        assert attrs["last_check_at"] and attrs["title"] == unique_repo
        assert attrs["supported_features"] & 1  # INSTALL: the button is there

        ha.call("update", "install", {"entity_id": entity})
        state = ha.wait_state(entity, is_state("off", installed_version="2.0",
                                               latest_version="2.0"),
                              timeout=60, message="2.0 installed by the button")
        assert device.serving() == "2.0"
        attrs = state["attributes"]
        assert (attrs["running_tag"], attrs["container_status"]) == ("2.0", "running")
        assert attrs["update_status"] == "idle" and attrs["last_success_at"]
        assert attrs["in_progress"] is False

        # the operator pins the device to 1.0: a downgrade, offered as an update
        operator.publish(Topics(prefix).device_tag(device.name), "1.0", retain=True)
        state = ha.wait_state(entity, is_state("on", installed_version="2.0"),
                              message="the downgrade offered")
        assert state["attributes"]["latest_version"].startswith("1.0")
        assert state["attributes"]["desired_source"] == "device"
        assert device.serving() == "2.0"  # notify mode: nothing happens without the button

        ha.call("update", "install", {"entity_id": entity})
        ha.wait_state(entity, is_state("off", installed_version="1.0", latest_version="1.0"),
                      timeout=60, message="1.0 installed by the button")
        assert device.serving() == "1.0"

        # the config is retained, so a Home Assistant that starts later finds the device
        late = MqttWatcher(broker.settings(OPERATOR, prefix=prefix),
                           [discovery_topic(device.name)]).start()
        try:
            assert late.wait_for(discovery_topic(device.name)).retain
        finally:
            late.close()

        agent.stop()
        ha.wait_state(entity, lambda s: s["state"] == "unavailable",
                      message="unavailable once the agent stops")
        assert ha.problems() == []
    except BaseException:
        show(ha, agent)
        raise
    finally:
        agent.stop()
        operator.publish(Topics(prefix).device_tag(device.name), "", retain=True)


@pytest.mark.parametrize("home_assistant", WITH_PROGRESS, ids=str, indirect=True)
def test_update_entity_shows_progress_during_a_real_pull(  # noqa: PLR0913, PLR0917
    home_assistant: HomeAssistant, broker: Broker, operator: MqttWatcher,
    private_registry: Any, container_name: str, tmp_path: Path, test_id: str,
    docker_client: docker.DockerClient,
) -> None:
    """2024.11 and later: in_progress and a partial update_percentage while a large layer
    comes in through a throttled link, then "off" on the new version."""
    ha = home_assistant
    registry: PrivateRegistry = private_registry()
    proxy = ThrottledProxy(registry.address, rate=2_000_000)
    path = f"t{test_id}/app"
    build_and_push(registry.repo(path), "1.0", "1.0", registry=registry.address,
                   client=docker_client)
    push_large_image(registry.repo(path), "2.0", "2.0", 12_000_000, client=docker_client)
    remove_registry_images(registry.address, client=docker_client)  # the agent must pull
    repo = f"{proxy.address}/{path}"
    prefix = f"t{test_id}"
    device = Device(repo, container_name, tmp_path / "data")
    agent = agent_for(device, broker, prefix, tmp_path, CONTAINER_IMAGE=f"{repo}:1.0")
    try:
        entity = ha.find_entity("update", lambda s: s["attributes"].get("title") == repo,
                                message="the discovered update entity")
        ha.wait_state(entity, is_state("off", installed_version="1.0"), timeout=60,
                      message="1.0 installed")

        operator.publish(Topics(prefix).device_tag(device.name), "2.0", retain=True)
        seen: list[dict[str, Any]] = []

        def record(state: dict[str, Any]) -> bool:
            seen.append(state)
            return is_state("off", installed_version="2.0")(state)
        ha.wait_state(entity, record, timeout=120, interval=0.05, message="2.0 installed")
        busy = [s for s in seen if s["attributes"]["in_progress"]]
        assert busy, "never in progress"
        assert all(s["state"] == "on" and s["attributes"]["installed_version"] == "1.0"
                   and s["attributes"]["latest_version"] == "2.0" for s in busy)
        percentages = [s["attributes"]["update_percentage"] for s in busy
                       if s["attributes"]["update_percentage"] is not None]
        assert any(0 < p < 100 for p in percentages), percentages
        assert percentages == sorted(percentages)
        assert device.serving() == "2.0"
        assert ha.problems() == []
    except BaseException:
        show(ha, agent)
        raise
    finally:
        agent.stop()
        operator.publish(Topics(prefix).device_tag(device.name), "", retain=True)
        proxy.close()
        remove_registry_images(proxy.address, client=docker_client)
