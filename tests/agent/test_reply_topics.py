"""Where the agent answers MQTT 5 requests: only below its own
``P/devices/<id>/reply/``. A Response Topic naming anything else (its own state,
availability or discovery topic, which the ACL lets it write; another device's topics;
wildcards) is ignored with one warning per topic, and the command still runs. Under
MQTT 3.1.1 the payload's ``reply_to`` token names ``reply/<token>``; a token outside the
request-id grammar is ignored the same way.

The rule is fuzzed here (pure); the agent is then tested as a process on a real
Mosquitto (the shipped config and ACL), the real Docker daemon and the test registry.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent.config import load_settings
from edge_agent.agent.discovery import discovery_topic
from edge_agent.agent.link import AgentLink
from edge_agent.protocol.messages import (
    MAX_COMMAND_BYTES,
    CheckRequest,
    CommandRefused,
    parse_command,
)
from edge_agent.protocol.mqtt import Incoming, incoming
from edge_agent.protocol.tags import is_request_id
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import OPERATOR, Broker, MqttWatcher
from tests.support.device import Device, publish
from tests.support.hostile import hostile_payloads

T = Topics("edge")
ROOT = "edge/devices/dev1/reply/"


# -- the rule (pure) ----------------------------------------------------------------------
def test_replies_go_only_below_the_devices_own_reply_subtree() -> None:
    for good in (T.reply("dev1", "abc"), ROOT + "ops-cli", ROOT + "a/b/c",
                 ROOT + "caf\u00e9", ROOT + "a.b", ROOT + "...", ROOT + "x" * 1000):
        assert T.is_reply_topic("dev1", good), good
    for bad in (T.state("dev1"), T.availability("dev1"), T.events("dev1"),
                T.device_tag("dev1"), T.device_check("dev1"), discovery_topic("dev1"),
                T.reply("dev2", "abc"), T.reply("dev10", "abc"), "edge", "edge/",
                ROOT, ROOT[:-1], ROOT + "/", ROOT + "a//b", ROOT + "a/", ROOT + "..",
                ROOT + "../state", ROOT + "./x", ROOT + "+", ROOT + "#", ROOT + "a/+/b",
                ROOT + "a\x00b", ROOT + "a\x1b[2J", ROOT + "a\nb", ROOT + "\x85",
                "other/devices/dev1/reply/abc", "/edge/devices/dev1/reply/abc",
                "EDGE/devices/dev1/reply/abc", ROOT + "x" * 65535, ROOT + "\ud800",
                None, 5, b"edge/devices/dev1/reply/abc"):
        assert not T.is_reply_topic("dev1", bad), bad


LEVELS = st.one_of(st.sampled_from(["", ".", "..", "+", "#", "a+", "#b", "\x00", "dev1",
                                    "reply", "state", "edge", "devices", "dev2", "x\x1b"]),
                   st.text(max_size=8))


@settings(max_examples=500, deadline=None)
@given(head=st.lists(LEVELS, max_size=5), tail=st.lists(LEVELS, max_size=4),
       own=st.booleans())
def test_the_reply_rule_holds_for_any_topic(head: list[str], tail: list[str], own: bool) -> None:
    topic = ROOT + "/".join(tail) if own else "/".join(head + tail)
    accepted = T.is_reply_topic("dev1", topic)
    if accepted:  # then it is below the device's root, and every level is a plain name
        assert topic.startswith(ROOT)
        levels = topic[len(ROOT):].split("/")
        assert all(level and level not in (".", "..") for level in levels)
        assert not set(topic) & {"+", "#", "\x00"}
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic)
    # the converse: a plain name below the root is accepted
    if own and tail and all(re.fullmatch(r"[A-Za-z0-9_.-]+", x) and x not in (".", "..")
                            for x in tail):
        assert accepted
    # nothing of another device, and nothing above the root, whatever the levels
    assert not T.is_reply_topic("dev1", "edge/devices/dev2/reply/" + "/".join(tail))
    assert not T.is_reply_topic("dev1", "/".join(head)) or "/".join(head).startswith(ROOT)


def _command(response: str, correlation: bytes = b"c1") -> MQTTMessage:
    message = MQTTMessage(topic=b"edge/devices/dev1/cmd/check")
    message.payload = b'{"request_id": "r1"}'
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = response
    properties.CorrelationData = correlation
    message.properties = properties
    return message


def incoming_of(message: MQTTMessage) -> Incoming:
    typed = incoming(message)
    assert typed is not None
    return typed


def test_the_agent_warns_once_per_topic_and_still_runs_the_command(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
           "DEVICE_ID": "dev1", "MQTT_HOST": "127.0.0.1"}
    inbox: queue.Queue[Any] = queue.Queue()
    link = AgentLink(load_settings(env), inbox)
    caplog.set_level(logging.DEBUG, logger="edge_agent.agent.link")
    for _ in range(3):
        assert link._reply_for(incoming_of(_command(T.state("dev1")))) is None
        assert link._reply_for(incoming_of(_command(T.availability("dev1")))) is None
    assert link._reply_for(incoming_of(_command(T.reply("dev1", "ok")))) is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per distinct topic, not per command
    assert "'edge/devices/dev1/state'" in warnings[0] and ROOT in warnings[0]
    # the command itself is routed, unanswered
    link._on_message(incoming_of(_command(T.state("dev1"))))
    request = inbox.get_nowait()
    assert (request.request_id, request.reply) == ("r1", None)
    # many distinct bad topics: bounded memory, and the log stays quiet after the first ones
    for i in range(500):
        link._reply_for(incoming_of(_command(f"edge/devices/dev1/state/{i}")))
    assert len(link._refused_reply_topics) <= 100


# -- reply_to: the MQTT 3.1.1 request (pure) ----------------------------------------------
@pytest.mark.parametrize(("payload", "token"), [
    (b'{"request_id": "r1", "reply_to": "r1"}', "r1"),
    (b'{"reply_to": "ops-cli:42.a_b"}', "ops-cli:42.a_b"),
    (b'{"reply_to": "' + b"x" * 128 + b'"}', "x" * 128),
    (b'{"reply_to": null}', None),
    (b'{"request_id": "r1"}', None),
    (b"install", None),
])
def test_a_reply_to_token_is_taken(payload: bytes, token: str | None) -> None:
    body = parse_command(payload)
    assert (body.reply_to, body.reply_to_refused) == (token, None)


@pytest.mark.parametrize("value", [
    "", "../state", "..", ".", "a/b", "+", "#", "a+", "x#", "-r1", ".hidden", "r 1",
    "x" * 129, "caf\u00e9", "a\u001b[2J", "a\u0000", "a\u0085", "\ud800", 5, True, [],
    ["r1"], {"topic": "r1"},
])
def test_a_bad_reply_to_is_refused_and_the_command_still_runs(value: object) -> None:
    body = parse_command(json.dumps({"request_id": "r1", "reply_to": value}).encode())
    assert body.request_id == "r1" and body.reply_to is None
    assert body.reply_to_refused is not None and '"reply_to" must be' in body.reply_to_refused
    # quoted safely for a log line: bounded, no control character
    assert len(body.reply_to_refused) < 200
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in body.reply_to_refused)


@settings(max_examples=500, deadline=None)
@given(hostile_payloads(MAX_COMMAND_BYTES, key="reply_to"))
def test_any_reply_to_answers_one_level_below_the_devices_own_root(payload: bytes) -> None:
    try:
        body = parse_command(payload)
    except CommandRefused:
        return
    if body.reply_to is None:
        assert body.reply_to_refused is None or len(body.reply_to_refused) < 200
        return
    assert body.reply_to_refused is None and is_request_id(body.reply_to)
    topic = T.reply("dev1", body.reply_to)
    assert T.is_reply_topic("dev1", topic) and "/" not in topic[len(ROOT):]
    assert not T.is_reply_topic("dev2", topic)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=140), st.sampled_from(["..", "../state", "a/b", "+", "#"])))
def test_a_taken_token_is_never_more_than_one_plain_level(token: str) -> None:
    body = parse_command(json.dumps({"reply_to": token}).encode())
    if body.reply_to is not None:
        assert body.reply_to == token and T.is_reply_topic("dev1", T.reply("dev1", token))
        assert not set(token) & {"/", "+", "#"} and token not in (".", "..")
    else:
        assert body.reply_to_refused is not None


def _plain_command(payload: bytes, topic: bytes = b"edge/devices/dev1/cmd/check") -> Incoming:
    message = MQTTMessage(topic=topic)
    message.payload = payload
    return incoming_of(message)


def test_the_agent_binds_reply_to_to_its_own_reply_topic_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
           "DEVICE_ID": "dev1", "MQTT_HOST": "127.0.0.1", "MQTT_PROTOCOL": "3.1.1"}
    inbox: queue.Queue[Any] = queue.Queue()
    link = AgentLink(load_settings(env), inbox)
    caplog.set_level(logging.DEBUG, logger="edge_agent.agent.link")
    link._on_message(_plain_command(b'{"request_id": "r1", "reply_to": "tok-1"}'))
    request = inbox.get_nowait()
    assert isinstance(request, CheckRequest) and request.reply is not None
    assert request.reply.args == (T.reply("dev1", "tok-1"), None)  # type: ignore[attr-defined]
    # install and the fleet's check are answered the same way, each on its own device
    link._on_message(_plain_command(b'{"reply_to": "t2"}', b"edge/fleet/cmd/check"))
    assert inbox.get_nowait().reply.args[0] == T.reply("dev1", "t2")
    for _ in range(3):
        for bad in (b'"../state"', b'"a/b"', b"7"):
            link._on_message(_plain_command(b'{"request_id": "r2", "reply_to": ' + bad + b"}"))
            request = inbox.get_nowait()
            assert (request.request_id, request.reply) == ("r2", None)  # runs, unanswered
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # one per distinct value, not per command
    assert all("ignored the reply_to of a command on edge/devices/dev1/cmd/check" in w
               for w in warnings)
    assert "'../state'" in warnings[0]
    # an MQTT 5 Response Topic wins over reply_to
    message = _command(T.reply("dev1", "v5"))
    message.payload = b'{"request_id": "r1", "reply_to": "other"}'
    link._on_message(incoming_of(message))
    assert inbox.get_nowait().reply.args[0] == T.reply("dev1", "v5")


# -- a real agent on the shipped broker -------------------------------------------------
def ask(ops: MqttWatcher, command_topic: str, response_topic: str, correlation: bytes) -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = response_topic
    properties.CorrelationData = correlation
    ops.publish(command_topic, json.dumps({"request_id": correlation.decode()}),
                properties=properties)


@pytest.mark.broker
def test_a_response_topic_on_the_devices_own_topics_is_never_written(
    broker: Broker, unique_repo: str, container_name: str, tmp_path: Path, test_id: str,
) -> None:
    publish(unique_repo, "1.0", f"1.0 {container_name}")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    t = Topics(f"r{test_id}")
    broker.add_device(name)
    env = device.agent_env(**{"CONTAINER_IMAGE": f"{unique_repo}:1.0", "HEALTH_TIMEOUT": "1",
                              "FALLBACK_TAG": "", "TELEMETRY_INTERVAL": "60",
                              "HA_DISCOVERY": "true", **broker.agent_env(name, t.prefix)})
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    ops = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix),
                      [f"{t.prefix}/#", discovery_topic(name)]).start()
    try:
        ops.wait_for(t.state(name), lambda m: m.json()["update"]["status"] == "idle"
                     and m.json()["running"]["status"] == "running", timeout=60)
        own = (t.state(name), t.availability(name), discovery_topic(name), t.events(name))
        mark = time.monotonic()
        # a command whose Response Topic is the device's own state topic still runs...
        ask(ops, t.device_check(name), t.state(name), b"bad-state")
        ops.wait_for(t.state(name), lambda m: m.json()["update"]["status"] == "checking",
                     since=mark, timeout=60, message="the check of the first command")
        for round_ in range(2):  # ...as do the others; the same topics again: no 2nd warning
            for i, topic in enumerate(own):
                ask(ops, t.device_check(name), topic, f"bad-{round_}-{i}".encode())
        # positive control, last: its answer arrives on the reply subtree
        ask(ops, t.device_check(name), t.reply(name, "ops"), b"good")
        answer = ops.wait_for(t.reply(name, "ops"), timeout=60)
        assert answer.json()["request_id"] == "good" and answer.json()["ok"] is True
        time.sleep(1.0)  # anything late would be here now
        for topic in own:
            written = [m for m in ops.on(topic) if m.at >= mark and m.properties is not None
                       and getattr(m.properties, "CorrelationData", None) is not None]
            assert written == [], (topic, [m.text for m in written])
        assert all(m.text in ("online", "offline") for m in ops.on(t.availability(name)))
        assert all("request_id" not in m.json() or "device_id" in m.json()
                   for m in ops.on(t.state(name)))

        # what the broker keeps for the next subscriber is still the device's own
        fresh = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix),
                            [t.state(name), t.availability(name), discovery_topic(name)]).start()
        try:
            state = fresh.wait_for(t.state(name), timeout=10).json()
            assert state["device_id"] == name and "outcome" not in state
            assert fresh.wait_for(t.availability(name), timeout=10).text == "online"
            assert "unique_id" in fresh.wait_for(discovery_topic(name), timeout=10).json()
        finally:
            fresh.close()
        warnings = [line for line in agent.log().splitlines() if "WARNING" in line]
        for topic in own:
            said = [line for line in warnings if f"ignored the response topic {topic!r}" in line]
            assert len(said) == 1, warnings
    finally:
        ops.close()
        agent.stop(signal.SIGTERM)
        print(agent.log()[-4000:])


# The reply_to values an operator (or a slip) might send to aim the answer elsewhere: a
# path, wildcards (publishing to one would cost the agent its connection), another
# level, a NUL, a huge value, a wrong type.
HOSTILE_REPLY_TO: list[object] = ["../state", "+", "#", "a/b", "x\u0000y", "x" * 3000,
                                  ["r1"], "../../dev2/reply/x"]


@pytest.mark.broker
def test_on_mqtt_3_1_1_a_hostile_reply_to_is_never_answered(
    broker: Broker, unique_repo: str, container_name: str, tmp_path: Path, test_id: str,
) -> None:
    publish(unique_repo, "1.0", f"1.0 {container_name}")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    t = Topics(f"r{test_id}")
    broker.add_device(name)
    env = device.agent_env(**{"CONTAINER_IMAGE": f"{unique_repo}:1.0", "HEALTH_TIMEOUT": "1",
                              "FALLBACK_TAG": "", "TELEMETRY_INTERVAL": "60",
                              "MQTT_PROTOCOL": "3.1.1", **broker.agent_env(name, t.prefix)})
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    ops = MqttWatcher(broker.settings(OPERATOR, prefix=t.prefix, protocol="3.1.1"),
                      [f"{t.prefix}/#"]).start()
    try:
        ops.wait_for(t.state(name), lambda m: m.json()["update"]["status"] == "idle"
                     and m.json()["running"]["status"] == "running", timeout=60)
        mark = time.monotonic()
        for round_ in range(2):  # the same values again: no second warning
            for i, value in enumerate(HOSTILE_REPLY_TO):
                ops.publish(t.device_check(name), json.dumps(
                    {"request_id": f"bad-{round_}-{i}", "reply_to": value}))
        # the commands still run: the check they asked for happens
        ops.wait_for(t.state(name), lambda m: m.json()["update"]["status"] == "checking",
                     since=mark, timeout=60, message="a check of the hostile commands")
        # positive control, last: its answer arrives on reply/<token>, without properties
        ops.publish(t.device_check(name), json.dumps({"request_id": "good",
                                                      "reply_to": "good-1"}))
        answer = ops.wait_for(t.reply(name, "good-1"), timeout=60).json()
        assert answer["request_id"] == "good" and answer["ok"] is True
        assert answer["outcome"] == "unchanged" and answer["tag"] == "1.0"
        time.sleep(1.0)  # anything late would be here now
        own = {t.state(name), t.availability(name), t.events(name), t.device_check(name)}
        written = {m.topic for m in ops.messages if m.at >= mark} - own
        assert written == {t.reply(name, "good-1")}, written
        # the agent kept its connection (a publish to a wildcard would have cost it)
        assert {m.text for m in ops.on(t.availability(name))} == {"online"}
        warnings = [line for line in agent.log().splitlines()
                    if "WARNING" in line and "ignored the reply_to" in line]
        assert len(warnings) == len(HOSTILE_REPLY_TO), warnings
    finally:
        ops.close()
        agent.stop(signal.SIGTERM)
        print(agent.log()[-4000:])
