"""The shipped broker's limits (mosquitto/mosquitto.conf, "Limits"), on a real Mosquitto
started from it: a device cannot make the broker hold an oversized message, every
legitimate message still passes (a positive control for each refusal), and an operator
still receives the retained messages of a large fleet when it subscribes."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.broker import Broker, MqttWatcher, payload_is
from tests.support.hostile import good_state
from tests.support.mqtt_raw import rss_kib, stream_publish

pytestmark = pytest.mark.broker

MAX_PACKET = 65536  # max_packet_size in mosquitto/mosquitto.conf
DEVICE = "dev-limits"
OPERATOR = "ops"
QUIET_S = 1.0


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_device(DEVICE)
        started.add_operator(OPERATOR)
        yield started


@pytest.fixture
def t(test_id: str) -> Topics:
    return Topics(f"l{test_id}")


def largest_state(device_id: str) -> dict[str, Any]:
    """The largest state document an agent sends: every id and tag at its longest (the
    grammars of edge_agent/topics.py and tags.py), a long image name, and error texts
    of 8 KB where errors go (they quote Docker and the registry)."""
    tag, request_id = "t" * 128, "r" * 128
    state = good_state(device_id, tag)
    state["image"] = "registry.example.com:5000/" + "/".join(["a" * 60] * 4)
    state["desired"].update(group="g" * 64, request_id=request_id)
    state["fallback"] = {"active": True, "requested_tag": tag, "reason": "e" * 8192}
    state["update"].update(last_error="e" * 8192, progress=99.9)
    return state


def retained(broker: Broker, topic: str) -> bytes | None:
    """What the broker keeps on ``topic`` for the next subscriber."""
    probe = MqttWatcher(broker.settings(OPERATOR), [topic]).start()
    try:
        time.sleep(QUIET_S)
        found = probe.on(topic)
        return found[-1].payload if found else None
    finally:
        probe.close()


def test_a_100_mb_retained_state_is_refused_and_the_broker_stays_small(
    broker: Broker, t: Topics,
) -> None:
    device = MqttWatcher(broker.settings(DEVICE, prefix=t.prefix), []).start()
    try:  # positive control: the device's real state is retained
        good = json.dumps(good_state(DEVICE)).encode()
        device.publish(t.state(DEVICE), good, retain=True)
        assert retained(broker, t.state(DEVICE)) == good
    finally:
        device.close()
    assert broker.pid is not None
    before = rss_kib(broker.pid)
    result = stream_publish(broker.port, DEVICE, broker.passwords[DEVICE], t.state(DEVICE),
                            100_000_000)
    after = rss_kib(broker.pid)
    print(f"broker RSS {before} KiB before, {after} KiB after a 100 MB publish "
          f"({result.sent} bytes sent before the broker hung up)")
    assert result.closed_by_broker and result.sent < 100_000_000, result
    assert after - before < 16 * 1024, (before, after)  # was +98 MB without the limit
    assert retained(broker, t.state(DEVICE)) == good  # the real state, still


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_packet_over_the_limit_disconnects_and_every_legitimate_message_passes(
    broker: Broker, t: Topics, protocol: str, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_agent.agent.link")
    ops = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix), [t.state(DEVICE)]).start()
    device = MqttWatcher(broker.settings(DEVICE, prefix=t.prefix, protocol=protocol), []).start()
    assert device.client is not None
    try:
        # positive controls: the largest state document, and a packet just under the limit
        largest = json.dumps(largest_state(DEVICE)).encode()
        assert 16_000 < len(largest) < MAX_PACKET // 2
        under = b"u" * (MAX_PACKET - 100)
        for payload in (largest, under):
            device.publish(t.state(DEVICE), payload, retain=True)
            ops.wait_for(t.state(DEVICE), payload_is(payload), timeout=10)
        assert retained(broker, t.state(DEVICE)) == under

        over = b"o" * (MAX_PACKET + 1)
        device.client.publish(t.state(DEVICE), over, qos=1, retain=True)
        lost = wait_until(lambda: [r.getMessage() for r in caplog.records
                                   if "lost the broker" in r.getMessage()],
                          timeout=10, message="the broker to disconnect the device")
        device.close()  # paho would send the message again at every reconnect
        if protocol == "5":
            assert "(Packet too large)" in lost[0], lost  # MQTT 5 says why
        time.sleep(QUIET_S)
        assert all(m.payload != over for m in ops.on(t.state(DEVICE)))
        assert retained(broker, t.state(DEVICE)) == under  # not replaced
    finally:
        device.close()
        ops.close()


def test_an_operator_gets_the_retained_messages_of_a_large_fleet(
    broker: Broker, t: Topics,
) -> None:
    """Mosquitto sends a new subscriber's retained messages at once; beyond its queue
    (1000 + 20 in flight by default) it drops them. The bridge and edge-ctl subscribe to
    every device's state and availability: two retained messages per device."""
    devices = 2_000
    ops = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix), []).start()
    assert ops.client is not None
    try:
        for i in range(devices):  # desired tags: retained topics an operator may write
            info = ops.client.publish(t.device_tag(f"d{i}"), "1.0", qos=1, retain=True)
            info.wait_for_publish(10)
    finally:
        ops.close()
    reader = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix),
                         [f"{t.prefix}/devices/+/tag"]).start()
    try:
        deadline = time.monotonic() + 30
        while len(reader.messages) < devices and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(QUIET_S)
        received = {m.topic for m in reader.messages}
        assert len(received) == devices, f"{len(received)} of {devices} retained tags"
    finally:
        reader.close()
