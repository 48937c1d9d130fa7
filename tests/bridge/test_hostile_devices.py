"""Devices that publish hostile data or flood: the bridge, real Mosquitto (repository
config and ACL), real HTTP. One device's data never breaks the list, another device or
the page, and a later good state fully replaces a bad one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from paho.mqtt.enums import MQTTErrorCode

from edge_agent.protocol.mqtt import connect_client, disconnect_client
from edge_agent.protocol.settings import MqttSettings
from edge_agent.protocol.topics import Topics
from tests.bridge.support import (
    ApiClient,
    SimulatedDevices,
    hostile_events,
    hostile_states,
    running_bridge,
    schema_validator,
    state_document,
    strict_json,
    unique_prefix,
)
from tests.support import wait_until
from tests.support.broker import Broker, MqttWatcher

pytestmark = pytest.mark.broker

GOOD = ("good-1", "good-2")
DEVICE_LIST = schema_validator("DeviceList")
DEVICE = schema_validator("Device")


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture
def publisher(broker: Broker, prefix: str) -> Iterator[MqttWatcher]:
    """A client allowed to write any device's telemetry (plays the compromised devices)."""
    client = MqttWatcher(broker.settings("simulator", prefix=prefix), []).start()
    yield client
    client.close()


def publish_tolerant(broker: Broker, prefix: str, topic: str, payload: bytes,
                     retain: bool = True) -> None:
    """Publish from a client of its own: a broker with a message size limit may
    refuse (or disconnect for) a payload this large, which is fine here."""
    client = connect_client(broker.settings("simulator", prefix=prefix),
                            f"big-{uuid.uuid4().hex[:8]}")
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(10)
    finally:
        disconnect_client(client)


def publish_hostile(broker: Broker, publisher: MqttWatcher, prefix: str, *,
                    retain: bool) -> None:
    topics = Topics(prefix)
    for name, payload in hostile_states().items():
        device_id = f"evil-{name}"
        publisher.publish(topics.availability(device_id), b"online", retain=True)
        if len(payload) > 100_000:
            publish_tolerant(broker, prefix, topics.state(device_id), payload)
        else:
            publisher.publish(topics.state(device_id), payload, retain=retain)
        for event in hostile_events():
            if len(event) > 100_000:
                continue  # the huge ones go through publish_tolerant below
            publisher.publish(topics.events(device_id), event)


def check_fleet(api: ApiClient, good: dict[str, dict[str, Any]], hostile: list[str]) -> None:
    """The list and every device answer 200 with strict, schema-valid JSON; the good
    devices show exactly what they published."""
    response = api.get("/api/v1/devices")
    assert response.status_code == 200, response.text[:2000]
    listing = strict_json(response.content)
    DEVICE_LIST(listing)
    by_id = {d["id"]: d for d in listing["devices"]}
    for device_id, document in good.items():
        assert by_id[device_id]["state"] == document
        assert by_id[device_id]["online"] is True
    for device_id in [*good, *hostile]:
        assert device_id in by_id, sorted(by_id)
        one = api.get(f"/api/v1/devices/{device_id}")
        assert one.status_code == 200, (device_id, one.text[:2000])
        view = strict_json(one.content)
        DEVICE(view)
        # one device's view is the list's entry plus its recent events (all well-formed)
        recent = view.pop("recent_events")
        assert isinstance(recent, list) and all(isinstance(e, dict) for e in recent), recent
        assert view == by_id[device_id]
        if view["last_seen"] is not None:
            seen = datetime.fromisoformat(view["last_seen"])
            assert seen.year >= 1970
            assert seen.timestamp() <= time.time() + 600, view["last_seen"]
    page = api.get("/")
    assert page.status_code == 200


def wait_listed(api: ApiClient, ids: list[str], online: Iterable[str] = ()) -> None:
    """Until every device in ``ids`` is listed, and those in ``online`` shown online
    (retained states and availabilities arrive on their own topics, in no set order)."""
    def listed() -> bool:
        response = api.get("/api/v1/devices")
        if response.status_code != 200:
            return False
        shown = {d["id"]: d for d in strict_json(response.content)["devices"]}
        return set(ids) <= set(shown) and all(shown[i]["online"] is True for i in online)
    try:
        wait_until(listed, timeout=20, message="every device listed")
    except TimeoutError:
        response = api.get("/api/v1/devices")
        raise AssertionError(f"{response.status_code}: {response.text[:3000]}") from None


def test_hostile_states_break_nothing_and_a_good_state_replaces_them(
    broker: Broker, prefix: str, publisher: MqttWatcher
) -> None:
    topics = Topics(prefix)
    good = {device_id: state_document(device_id, "1.0") for device_id in GOOD}
    for device_id, document in good.items():
        publisher.publish(topics.availability(device_id), b"online", retain=True)
        publisher.publish(topics.state(device_id), json.dumps(document).encode(), retain=True)
    hostile = [f"evil-{name}" for name in hostile_states()]

    # live: the bridge is running while the devices publish
    with running_bridge(broker, prefix) as bridge, ApiClient(bridge.url) as api:
        publish_hostile(broker, publisher, prefix, retain=True)
        for event in hostile_events():
            publish_tolerant(broker, prefix, topics.events("evil-huge"), event, retain=False)
        # a marker after everything else: messages of one client arrive in order
        marker = state_document("good-1", "1.1")
        publisher.publish(topics.state("good-1"), json.dumps(marker).encode(), retain=True)
        good["good-1"] = marker
        wait_until(lambda: (api.get("/api/v1/devices/good-1").json().get("state")
                            == marker), timeout=20, message="the marker state")
        wait_listed(api, [*good, *hostile])
        check_fleet(api, good, hostile)

    # restarted: everything comes from retained messages
    with running_bridge(broker, prefix) as bridge, ApiClient(bridge.url) as api:
        wait_listed(api, [*good, *hostile], online=good)
        check_fleet(api, good, hostile)

        # each hostile device now publishes a good state: shown exactly, seen just now
        fixed = {device_id: state_document(device_id, "2.0") for device_id in hostile}
        for device_id, document in fixed.items():
            publisher.publish(topics.state(device_id), json.dumps(document).encode(),
                              retain=True)
        for device_id, document in fixed.items():
            wait_until(shows_state(api, device_id, document),
                       timeout=20, message=f"the good state of {device_id}")
        check_fleet(api, {**good, **fixed}, [])
        for device_id in hostile:
            seen = api.get(f"/api/v1/devices/{device_id}").json()["last_seen"]
            assert abs(datetime.fromisoformat(seen).timestamp() - time.time()) < 120, seen

    # and after another restart the good states are what the bridge shows
    with running_bridge(broker, prefix) as bridge, ApiClient(bridge.url) as api:
        wait_listed(api, [*good, *hostile], online=[*good, *fixed])
        check_fleet(api, {**good, **fixed}, [])
        for device_id in hostile:
            seen = datetime.fromisoformat(api.get(f"/api/v1/devices/{device_id}")
                                          .json()["last_seen"])
            assert seen.tzinfo is not None and seen.astimezone(UTC).year < 9999


def flood(settings: MqttSettings, device_id: str, seconds: float, final: bytes,
          sent: Any) -> None:
    """One device publishing its state and events as fast as it can (QoS 0) for
    ``seconds``, then ``final`` as its state (QoS 1). Runs in a process of its own, as a
    real device would: it must not share the bridge's interpreter."""
    topics = Topics(settings.topic_prefix)
    client = connect_client(settings, f"flood-{uuid.uuid4().hex[:8]}")
    # large states (a long error): more work per message than an agent ever makes
    document = state_document(device_id, "0.1")
    document["update"]["last_error"] = "e" * 16_000
    state = json.dumps(document).encode()
    event = json.dumps({"event": "pull_progress", "progress": 1.0,
                        "device_id": device_id}).encode()
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            for topic, payload in ((topics.state(device_id), state),
                                   (topics.events(device_id), event)):
                info = client.publish(topic, payload, qos=0, retain=topic.endswith("state"))
                count += info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        time.sleep(0.01)
    # the flood fills paho's queue; the last state goes out once there is room again
    give_up = time.monotonic() + 30
    while True:
        info = client.publish(topics.state(device_id), final, qos=1, retain=True)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or time.monotonic() > give_up:
            break
        time.sleep(0.05)
    info.wait_for_publish(30)
    disconnect_client(client)
    sent.value = count


def test_a_flooding_device_does_not_degrade_the_others(
    broker: Broker, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One device floods its state and events (thousands of messages a second, from a
    process of its own) while another publishes a new state now and then: the bridge
    keeps answering, shows the other's states as they come, and once the flood is over
    shows every device's latest state, the flooder's included."""
    devices = SimulatedDevices(broker, prefix).start()
    try:
        devices.add(["calm"], tag="1.0")
        with running_bridge(broker, prefix) as bridge, ApiClient(bridge.url) as api:
            wait_until(lambda: api.get("/api/v1/devices/calm").status_code == 200,
                       timeout=10, message="calm listed")
            final = state_document("noisy", "9.9")
            context = multiprocessing.get_context("fork")
            sent = context.Value("i", 0)
            flooder = context.Process(target=flood, args=(
                broker.settings("simulator", prefix=prefix), "noisy", 4.0,
                json.dumps(final).encode(), sent))
            flooder.start()
            shown_at_once = 0
            try:
                for version in range(2, 7):
                    tag = f"1.{version}"
                    devices.add(["calm"], tag=tag)
                    with contextlib.suppress(TimeoutError):
                        # the broker may drop a message while its queue for the bridge is
                        # full (a busy machine); the resync after the flood restores it
                        wait_until(functools.partial(calm_is_on, api, tag),
                                   timeout=3, interval=0.1, message=f"calm on {tag}")
                        shown_at_once += 1
                    # and the bridge answers throughout (a functional deadline)
                    assert api.get("/api/v1/devices", timeout=5).status_code == 200
                    time.sleep(0.2)
            finally:
                flooder.join(60)
            assert flooder.exitcode == 0
            assert sent.value > 2000, sent.value
            assert shown_at_once >= 3, shown_at_once
            # after the flood: every device's latest state, whatever the broker dropped
            wait_until(lambda: calm_version(api) == "1.6", timeout=20,
                       message="calm's latest state")
            wait_until(lambda: api.get("/api/v1/devices/noisy").json().get("state")
                       == final, timeout=20, message="the flooder's last state")
            assert api.get("/api/v1/devices/noisy").json()["last_event"] is None
    finally:
        devices.close()
    # logged once, not at every message
    throttled = [r.getMessage() for r in caplog.records
                 if "noisy" in r.getMessage() and r.levelname == "WARNING"]
    assert len(throttled) == 1, throttled


def shows_state(api: ApiClient, device_id: str,
                document: dict[str, Any]) -> Callable[[], bool]:
    """A ``wait_until`` predicate: the bridge shows exactly ``document`` for the device."""
    return lambda: api.get(f"/api/v1/devices/{device_id}").json().get("state") == document


def calm_is_on(api: ApiClient, tag: str) -> bool:
    return calm_version(api) == tag


def calm_version(api: ApiClient) -> str | None:
    response = api.get("/api/v1/devices/calm", timeout=5)
    state = response.json().get("state") or {} if response.status_code == 200 else {}
    version: str | None = state.get("installed_version")
    return version
