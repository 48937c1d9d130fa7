"""edge-ctl's MQTT session against a real Mosquitto (the shipped configuration and ACL):
each way the broker can fail a command ends it with its exit code and one line that
says what to do; what the broker delivers reaches the command typed and in order."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_TIMEOUT, CtlError
from edge_agent.ctl.session import (
    MAX_DEVICE_MESSAGE_BYTES,
    OPERATOR_ACL,
    Session,
    document,
    document_or_none,
    publish_error,
)
from edge_agent.protocol.mqtt import BrokerUnavailable, Incoming, PublishRefused
from edge_agent.protocol.safejson import UntrustedJson
from edge_agent.protocol.topics import Topics
from tests.support.broker import Broker, MqttWatcher
from tests.support.hostile import deep_json

OPERATOR = "ops"  # made by the broker fixture (conftest.py)


def test_a_wrong_password_is_reported_with_what_to_check(broker: Broker) -> None:
    with pytest.raises(CtlError) as caught:
        Session(broker.settings(OPERATOR, password="wrong"), [])
    error = caught.value
    assert error.code == EXIT_TIMEOUT
    assert str(error).startswith("cannot use the MQTT broker: the broker at ")
    assert "Bad user name or password" in str(error) or "Not authorized" in str(error)
    assert "MQTT_PASSWORD" in str(error)


def test_no_broker_listening_is_a_timeout_exit(broker: Broker) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = dataclasses.replace(broker.settings(OPERATOR), port=port)
    with pytest.raises(CtlError) as caught:
        Session(settings, [])
    assert caught.value.code == EXIT_TIMEOUT
    assert f"cannot use the MQTT broker: connection to 127.0.0.1:{port} refused" in str(
        caught.value)


def test_a_refused_publish_is_not_success(broker: Broker, test_id: str) -> None:
    """A device's login may not set the fleet's tag: the broker says so in its PUBACK
    (MQTT 5), and the command ends with exit 1 and the ACL it needs."""
    device = f"dev-{test_id}"
    broker.add_device(device)
    session = Session(broker.settings(device), [])
    try:
        with pytest.raises(CtlError) as caught:
            session.publish(Topics("edge").fleet_tag, b"2.0", retain=True)
    finally:
        session.close()
    assert caught.value.code == EXIT_FAILED
    assert str(caught.value).startswith("the broker refused the message to edge/fleet/tag (")
    assert str(caught.value).endswith(OPERATOR_ACL)
    probe = MqttWatcher(broker.settings(OPERATOR), [Topics("edge").fleet_tag]).start()
    try:
        assert probe.last(Topics("edge").fleet_tag) is None  # nothing was retained
    finally:
        probe.close()


def test_publish_errors_keep_their_exit_codes() -> None:
    refused = publish_error(PublishRefused(
        "the broker refused the message to edge/fleet/tag (Not authorized); check the "
        "broker's ACL for dev1", "edge/fleet/tag", "Not authorized"))
    assert refused.code == EXIT_FAILED and str(refused).endswith(OPERATOR_ACL)
    late = publish_error(BrokerUnavailable("the MQTT broker did not acknowledge the message "
                                           "to edge/fleet/tag within 10 s"))
    assert late.code == EXIT_TIMEOUT and OPERATOR_ACL not in str(late)


def test_retained_then_live_messages_in_order(broker: Broker, test_id: str) -> None:
    topics = Topics(f"s{test_id}")
    device = f"dev-{test_id}"
    broker.add_device(device)
    sender = MqttWatcher(broker.settings(device, prefix=topics.prefix), []).start()
    try:
        sender.publish(topics.state(device), b'{"n": 0}', retain=True)
        session = Session(broker.settings(OPERATOR, prefix=topics.prefix),
                          [topics.all_states, topics.all_events])
        try:
            retained = session.retained()
            assert [(m.topic, m.payload, m.retained) for m in retained] == [
                (topics.state(device), b'{"n": 0}', True)]
            for n in range(1, 4):
                sender.publish(topics.events(device), json.dumps({"n": n}))
            live = [m for _, m in zip(range(3), session.messages(10), strict=False)]
            assert [document(m) for m in live] == [{"n": 1}, {"n": 2}, {"n": 3}]
            assert all(isinstance(m, Incoming) and not m.retained for m in live)
            assert list(session.messages(0.2)) == []  # and then nothing: the timeout ends it
        finally:
            session.close()
    finally:
        sender.publish(topics.state(device), b"", retain=True)
        sender.close()


def test_a_request_carries_its_response_topic_and_correlation(broker: Broker,
                                                              test_id: str) -> None:
    device = f"dev-{test_id}"
    broker.add_device(device)
    topics = Topics("edge")
    receiver = MqttWatcher(broker.settings(device), [topics.device_check(device)]).start()
    reply = topics.reply(device, f"r{test_id}")
    session = Session(broker.settings(OPERATOR), [reply])
    try:
        session.publish(topics.device_check(device), b'{"request_id": "r1"}', retain=False,
                        response_topic=reply, correlation=b"r1")
        command = receiver.wait_for(topics.device_check(device))
        assert command.properties.ResponseTopic == reply
        assert command.properties.CorrelationData == b"r1"
        receiver.publish(reply, b'{"ok": true}', properties=_correlated(b"r1"))
        answer = next(iter(session.messages(10)))
        assert (answer.topic, answer.correlation, document(answer)) == (reply, b"r1",
                                                                        {"ok": True})
    finally:
        session.close()
        receiver.close()


def _correlated(correlation: bytes) -> Properties:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.CorrelationData = correlation
    return properties


@pytest.mark.parametrize("payload", [
    deep_json(), b"x" * (MAX_DEVICE_MESSAGE_BYTES + 1), b"[1]", b"\xff", b"NaN", b"",
])
def test_a_device_message_is_read_only_as_a_bounded_json_object(payload: bytes) -> None:
    message = Incoming("edge/devices/d/state", payload, False)
    with pytest.raises(UntrustedJson):
        document(message)
    assert document_or_none(message) is None
    assert document(Incoming("t", b'{"a": [1]}', False)) == {"a": [1]}
