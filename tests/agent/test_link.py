"""The MQTT control plane and telemetry (issue 3), against a real Mosquitto started from
``mosquitto/``, the real Docker daemon and the test registry.

Agents run as their own processes (``python -m edge_agent``) so that kills, wills
and restarts are real. Every test has its own topic prefix and device ids.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent.config import load_settings
from edge_agent.agent.link import AgentLink
from edge_agent.agent.loop import Agent, ContainerEvent
from edge_agent.agent.remote import REPLAY_GRACE_S
from edge_agent.agent.status import RunningView
from edge_agent.protocol.answers import Answer, Outcome, judge_event, judge_state
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.messages import (
    MAX_COMMAND_BYTES,
    CheckRequest,
    RemoteReady,
    RemoteReset,
    RemoteTagMessage,
    parse_request_id,
    route,
)
from edge_agent.protocol.state import Source, UpdateStatus
from edge_agent.protocol.tags import is_request_id, parse_tag_payload
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import OPERATOR, Broker, MqttWatcher, Received
from tests.support.device import Device, publish
from tests.support.hostile import RecordsWithTracebacks, hostile_payloads
from tests.support.images import remove_repo_images
from tests.support.throttle import ThrottledRegistry, publish_padded

# -- pure routing ---------------------------------------------------------------------
T = Topics("edge")


def test_desired_tag_topics_route_by_scope() -> None:
    def routed(topic: str, retained: bool = False) -> object:
        return route(T, "dev1", ("g1", "g2"), topic, b"1.0", retained=retained)

    assert routed("edge/devices/dev1/tag") == RemoteTagMessage(
        Source.DEVICE, b"1.0", "edge/devices/dev1/tag", retained=False)
    assert routed("edge/fleet/tag", retained=True) == RemoteTagMessage(
        Source.FLEET, b"1.0", "edge/fleet/tag", retained=True)
    assert routed("edge/groups/g2/tag") == RemoteTagMessage(
        Source.GROUP, b"1.0", "edge/groups/g2/tag", "g2", retained=False)
    for foreign in ("edge/devices/dev2/tag", "edge/groups/g3/tag", "other/fleet/tag",
                    "edge/devices/dev1/state", "edge/devices/dev1/tag/x", ""):
        assert routed(foreign) is None, foreign


def test_commands_route_to_check_requests() -> None:
    replies: list[dict[str, Any]] = []
    check = route(T, "dev1", (), "edge/devices/dev1/cmd/check", b'{"request_id": "r1"}',
                  reply=replies.append)
    assert check == CheckRequest("r1", install=False, reply=replies.append)
    install = route(T, "dev1", (), "edge/devices/dev1/cmd/install", b"install")
    assert install == CheckRequest(None, install=True)
    assert route(T, "dev1", (), "edge/fleet/cmd/check", b"") == CheckRequest(None, fleet=True)
    assert route(T, "dev1", (), "edge/devices/dev2/cmd/check", b"") is None
    # a retained command would fire again at every reconnect
    assert route(T, "dev1", (), "edge/devices/dev1/cmd/install", b"", retained=True) is None


@pytest.mark.parametrize(("payload", "expected"), [
    (b"", None),
    (b"install", None),
    (b'{"request_id": "abc", "issued_at": "x"}', "abc"),
    (b'  {"request_id": "abc"}', "abc"),
    (b'{"request_id": 5}', None),
    (b'{"request_id": ""}', None),
    (b'{"request_id": "' + b"x" * 200 + b'"}', None),
    (b'["request_id"]', None),
    (b"{not json", None),
    (b'{"request_id": "\xff"}', None),
    (b"{" * 100_000, None),
    # the one request-id grammar (finding 12): anything else is dropped, the command runs
    (b'{"request_id": "r 1"}', None),
    (b'{"request_id": "-r1"}', None),
    (b'{"request_id": "r1\\u001b[2J"}', None),
    (b'{"request_id": "r\\ud800"}', None),
    (b'{"request_id": "' + b"x" * 128 + b'"}', "x" * 128),
    (b'{"request_id": "a.b:c_d-e"}', "a.b:c_d-e"),
    # bounded decoding: depth, numbers
    (b'{"x": ' + b"[" * 3000 + b"]" * 3000 + b', "request_id": "r1"}', None),
    (b'{"request_id": "r1", "x": NaN}', None),
])
def test_request_id_of_a_command(payload: bytes, expected: str | None) -> None:
    assert parse_request_id(payload) == expected


@settings(max_examples=400, deadline=None)
@given(hostile_payloads(MAX_COMMAND_BYTES, key="request_id"))
def test_request_id_is_valid_or_none_for_any_payload(payload: bytes) -> None:
    request_id = parse_request_id(payload)
    assert request_id is None or is_request_id(request_id)


@settings(max_examples=400, deadline=None)
@given(
    topic=st.one_of(st.sampled_from(["p/devices/dev1/tag", "p/fleet/tag", "p/groups/g1/tag",
                                      "p/devices/dev1/cmd/check", "p/fleet/cmd/check",
                                      "p/devices/dev1/cmd/install", "p/devices/dev2/tag"]),
                    st.text(max_size=60)),
    payload=hostile_payloads(),
    retained=st.booleans(),
    groups=st.lists(st.sampled_from(["g1", "g2"]) | st.text(max_size=10), max_size=3),
)
def test_route_maps_every_message_to_one_typed_message_or_none(
    topic: str, payload: bytes, retained: bool, groups: list[str]
) -> None:
    t = Topics("p")
    routed = route(t, "dev1", groups, topic, payload, retained=retained)
    tag_topics = {t.device_tag("dev1"), t.fleet_tag, *(t.group_tag(g) for g in groups)}
    commands = {t.device_check("dev1"), t.device_install("dev1"), t.fleet_check}
    if topic in tag_topics:
        assert isinstance(routed, RemoteTagMessage)
        assert (routed.payload, routed.topic, routed.retained) == (payload, topic, retained)
    elif topic in commands and not retained:
        assert isinstance(routed, CheckRequest)
        assert routed.install == (topic == t.device_install("dev1"))
        assert routed.request_id is None or is_request_id(routed.request_id)
    else:
        assert routed is None


def test_response_topics_must_be_publishable() -> None:
    t = Topics("edge")
    assert t.is_reply_topic("d", "edge/devices/d/reply/abc")
    for bad in ("", "edge/devices/d/reply/#", "edge/devices/d/reply/+/b",
                "edge/devices/d/reply/a\x00b", None, 5):
        assert not t.is_reply_topic("d", bad), bad


# -- property: random messages never crash the handling ------------------------------
def _message(topic: bytes, payload: bytes, retain: bool, response: str | None,
             correlation: bytes | None) -> MQTTMessage:
    message = MQTTMessage(topic=topic)
    message.payload = payload
    message.retain = retain
    if response is not None or correlation is not None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if response is not None:
            properties.ResponseTopic = response
        if correlation is not None:
            properties.CorrelationData = correlation
        message.properties = properties
    return message


KNOWN_TOPICS = [
    b"p/devices/dev1/tag", b"p/groups/g1/tag", b"p/fleet/tag", b"p/devices/dev1/cmd/check",
    b"p/devices/dev1/cmd/install", b"p/fleet/cmd/check", b"p/devices/dev2/tag",
]
PAYLOADS = st.one_of(
    hostile_payloads(),
    st.binary(max_size=6000),
    st.text(max_size=300).map(str.encode),
    st.sampled_from([b"", b"{}", b"../x", b"\xff\xfe", b'{"tag": 5}', b'["1.0"]', b"null",
                     b'{"tag": "1.0", "request_id": 7}', b"x" * (1 << 20), b"{" * 50_000,
                     b'{"tag": "1.0"}', b"latest", b"sha256:" + b"a" * 64]),
    st.dictionaries(st.sampled_from(["tag", "request_id", "issued_at", "x"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=140),
                              st.lists(st.integers(), max_size=3)),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
)


def test_random_messages_never_crash_the_handling(tmp_path: Path) -> None:
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
           "DEVICE_ID": "dev1", "DEVICE_GROUPS": "g1", "MQTT_HOST": "127.0.0.1",
           "MQTT_TOPIC_PREFIX": "p"}
    agent = Agent(load_settings(env))
    link = AgentLink(agent.settings, agent.inbox)
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    client = Client(CallbackAPIVersion.VERSION2)  # never connected: the callback ignores it
    # Agent.handle never raises (a bug is logged and the message dropped): any traceback
    # logged while handling a message fails the test
    tracebacks = RecordsWithTracebacks()
    logging.getLogger("edge_agent").addHandler(tracebacks)

    @settings(max_examples=400, deadline=None)
    @given(
        topic=st.one_of(st.sampled_from(KNOWN_TOPICS), st.binary(max_size=60),
                        st.text(max_size=60).map(lambda t: t.encode(errors="surrogatepass"))),
        payload=PAYLOADS,
        retain=st.booleans(),
        response=st.one_of(st.none(), st.text(max_size=40)),
        correlation=st.one_of(st.none(), st.binary(max_size=20)),
    )
    def handle(topic: bytes, payload: bytes, retain: bool, response: str | None,
               correlation: bytes | None) -> None:
        # the paho callback itself, unguarded: an exception fails the test
        link.broker._handle(client, _message(topic, payload, retain, response, correlation))
        while not agent.inbox.empty():
            message = agent.inbox.get_nowait()
            before = len(events)
            agent.handle(message)
            assert tracebacks.records == [], tracebacks.records[0].getMessage()
            if isinstance(message, RemoteTagMessage):
                try:
                    parse_tag_payload(message.payload)
                except TagError:
                    assert [e["event"] for e in events[before:]] == ["tag_rejected"]
                    assert events[-1].get("request_id") is None \
                        or is_request_id(events[-1]["request_id"])
                else:
                    assert events[before:] == []
            elif isinstance(message, CheckRequest):
                assert message.request_id is None or is_request_id(message.request_id)

    try:
        handle()
    finally:
        logging.getLogger("edge_agent").removeHandler(tracebacks)
        agent.close()


def test_reconnect_forgets_remote_tags_until_the_broker_replays_them(tmp_path: Path) -> None:
    """A device tag cleared while the agent was offline is not replayed: it must not
    linger after the reconnect."""
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
           "DEVICE_ID": "dev1"}
    agent = Agent(load_settings(env))
    agent.handle(RemoteTagMessage(Source.DEVICE, b"2.0", "edge/devices/dev1/tag"))
    agent.handle(RemoteTagMessage(Source.FLEET, b"1.5", "edge/fleet/tag"))
    resolved = agent.resolve()
    assert resolved is not None and resolved.tag == "2.0"
    agent.handle(RemoteReset())
    agent.handle(RemoteTagMessage(Source.FLEET, b"1.5", "edge/fleet/tag"))  # the replay
    agent.handle(RemoteReady())
    # no replay of the device tag comes: at the grace's end it is gone (REPLAY_GRACE_S)
    agent.tags.expire(time.monotonic() + REPLAY_GRACE_S + 1)
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source) == ("1.5", Source.FLEET)
    agent.close()


def test_an_incomplete_replay_does_not_replace_the_last_complete_view(tmp_path: Path) -> None:
    """After a reconnect the broker refused the device tag's subscription for a moment:
    the group tag alone must not look like the desired one until RemoteReady (every tag
    subscription granted) says the replay is complete."""
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
           "DEVICE_ID": "dev1", "DEVICE_GROUPS": "g1"}
    agent = Agent(load_settings(env))
    agent.handle(RemoteTagMessage(Source.DEVICE, b"2.0", "edge/devices/dev1/tag"))
    agent.handle(RemoteTagMessage(Source.GROUP, b"3.0", "edge/groups/g1/tag", "g1"))
    agent.handle(RemoteReset())
    agent.handle(RemoteTagMessage(Source.GROUP, b"3.0", "edge/groups/g1/tag", "g1"))
    desired = agent.resolve()  # the device tag's subscription not granted yet
    assert desired is not None and (desired.tag, desired.source) == ("2.0", Source.DEVICE)
    agent.handle(RemoteTagMessage(Source.DEVICE, b"4.0", "edge/devices/dev1/tag"))
    desired = agent.resolve()  # what this session brought counts at once
    assert desired is not None and (desired.tag, desired.source) == ("4.0", Source.DEVICE)
    agent.handle(RemoteReset())  # another reconnect: the device tag was cleared meanwhile
    agent.handle(RemoteTagMessage(Source.GROUP, b"3.0", "edge/groups/g1/tag", "g1"))
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source) == ("4.0", Source.DEVICE)
    agent.handle(RemoteReady())  # every tag subscription granted
    desired = agent.resolve()  # the device tag's replay may still be on its way
    assert desired is not None and (desired.tag, desired.source) == ("4.0", Source.DEVICE)
    agent.tags.expire(time.monotonic() + REPLAY_GRACE_S + 1)  # none came: cleared
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source) == ("3.0", Source.GROUP)
    agent.close()


# -- fixtures for the stack tests ------------------------------------------------------
class Agents:
    """Agent processes of one test; all killed at teardown (before the containers go)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[AgentProcess] = []

    def spawn(self, device: Device, broker: Broker, prefix: str, **extra: str) -> AgentProcess:
        env = device.agent_env(**{
            "HEALTH_TIMEOUT": "1", "FALLBACK_TAG": "", "TELEMETRY_INTERVAL": "60",
            **broker.agent_env(device.name, prefix), **extra,
        })
        agent = AgentProcess(env, self.tmp_path / f"{device.name}.log").start()
        self.running.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.running:
            if agent.alive:
                agent.stop(signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"===== {a.log_path.name}\n{a.log()[-6000:]}" for a in self.running)


@pytest.fixture
def agents(tmp_path: Path, container_name: str, unique_repo: str) -> Iterator[Agents]:
    """Depends on the container fixtures so that its teardown (kill the agents) runs
    before theirs (remove the containers); the logs show up with a failure."""
    fleet = Agents(tmp_path)
    yield fleet
    fleet.close()
    print(fleet.logs())


def wait_state(watcher: MqttWatcher, prefix: str, device: str,  # noqa: PLR0913
               predicate: Callable[[dict[str, Any]], bool], *, since: float = 0.0,
               timeout: float = 30.0, message: str = "a state") -> dict[str, Any]:
    found = watcher.wait_for(Topics(prefix).state(device), lambda m: predicate(m.json()),
                             since=since, timeout=timeout, message=f"{message} of {device}")
    document: dict[str, Any] = found.json()
    return document


def settled_on(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["running"]["tag"] == tag and s["update"]["status"] == "idle" \
        and s["running"]["status"] == "running"


def settled_from(tag: str, source: str) -> Callable[[dict[str, Any]], bool]:
    """Settled on ``tag``, desired from ``source`` (device, group or fleet)."""
    return lambda s: settled_on(tag)(s) and s["desired"]["source"] == source


def events_since(watcher: MqttWatcher, prefix: str, device: str, mark: float) -> list[Any]:
    return [m.json() for m in watcher.on(Topics(prefix).events(device)) if m.at >= mark]


def ask(watcher: MqttWatcher, topic: str, reply_topic: str, payload: bytes = b"",  # noqa: PLR0913, PLR0917
        correlation: bytes = b"corr", timeout: float = 30.0) -> Received:
    """Send an MQTT 5 request with Response Topic and Correlation Data; the answer."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = reply_topic
    properties.CorrelationData = correlation
    mark = time.monotonic()
    watcher.publish(topic, payload, properties=properties)
    return watcher.wait_for(
        reply_topic, lambda m: m.properties.CorrelationData == correlation, since=mark,
        timeout=timeout, message=f"an answer on {reply_topic}",
    )


# -- acceptance -------------------------------------------------------------------------
@pytest.mark.broker
def test_device_tag_updates_then_duplicates_junk_and_restart_change_nothing(  # noqa: PLR0913, PLR0915, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
    docker_client: docker.DockerClient,
) -> None:
    """Acceptance 1, 3, 5 (clean stop) and 6."""
    publish(unique_repo, "1.0", "1.0")
    # content of its own: an image another test published with the same content shares
    # its layers, and a pull with nothing to download reports no progress
    v2 = f"2.0 {container_name}"
    publish(unique_repo, "2.0", v2)
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    broker.add_device(name)
    agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0")
    watcher.wait_for(topics.availability(name), lambda m: m.text == "online")
    wait_state(watcher, prefix, name, settled_on("1.0"))

    # 1: a retained device tag updates the container at once
    mark = time.monotonic()
    desired = json.dumps({"tag": "2.0", "request_id": "req-2", "issued_at": "2026-01-01T00:00Z"})
    watcher.publish(topics.device_tag(name), desired, retain=True)
    state = wait_state(watcher, prefix, name, settled_on("2.0"), since=mark)
    assert state["desired"] == {"tag": "2.0", "source": "device", "group": None,
                                "request_id": "req-2"}
    assert (device.data_dir / "tag").read_text().strip() == "2.0"
    assert device.serving() == v2
    def answering(request_id: str) -> list[dict[str, Any]] | None:
        found = [e for e in events_since(watcher, prefix, name, mark)
                 if e.get("request_id") == request_id]
        return found if found and found[-1]["event"] == "update_succeeded" else None

    events = wait_until(lambda: answering("req-2"), message="update_succeeded")
    names = [e["event"] for e in events]
    assert names[0] == "update_started" and "pull_progress" in names, names
    assert set(names) == {"update_started", "pull_progress", "update_succeeded"}, names
    assert {e["request_id"] for e in events} == {"req-2"}
    progress = [e["progress"] for e in events if e["event"] == "pull_progress"]
    assert progress == sorted(progress) and progress[-1] == 100
    busy = [m.json() for m in watcher.on(topics.state(name)) if m.at >= mark
            and m.json()["in_progress"]]
    assert busy, "no state showed the update in progress"
    # Home Assistant's view: 2.0 on its way while 1.0 is installed, a percentage while pulling
    assert {s["latest_version"] for s in busy} == {"2.0"}
    assert ("1.0", "2.0") in {(s["installed_version"], s["latest_version"]) for s in busy}
    assert any(s["update_percentage"] is not None for s in busy)
    container_id = state["running"]["container_id"]
    started_at = docker_client.containers.get(name).attrs["State"]["StartedAt"]
    reply_topic = topics.reply(name, "t1")

    # 6: junk is rejected with a reason, nothing changes, the agent stays up
    mark = time.monotonic()
    junk = [b"../x", b"{}", b"x" * 5000, b"\xff\xfe2.0", b'{"tag": 5}', b'["2.0"]',
            b'{"tag": "2.0", "request_id": 7}', b"2.0 3.0"]
    for payload in junk:  # not retained: the retained 2.0 stays the device's tag
        watcher.publish(topics.device_tag(name), payload)

    def all_rejected() -> list[Any] | None:
        found = [e for e in events_since(watcher, prefix, name, mark)
                 if e["event"] == "tag_rejected"]
        return found if len(found) >= len(junk) else None

    rejected = wait_until(all_rejected, message="a tag_rejected event per junk payload")
    assert len(rejected) == len(junk)
    assert all(e["topic"] == topics.device_tag(name) and e["reason"] for e in rejected)
    assert any("too large" in e["reason"] for e in rejected)
    assert any("UTF-8" in e["reason"] for e in rejected)
    answer = ask(watcher, topics.device_check(name), reply_topic, b'{"request_id": "chk-1"}')
    assert answer.json() == {"request_id": "chk-1", "ok": True, "outcome": "unchanged",
                             "tag": "2.0", "digest": state["running"]["digest"]}
    assert agent.alive

    # 3: a QoS 1 duplicate (the same retained message again) changes nothing
    mark = time.monotonic()
    watcher.publish(topics.device_tag(name), desired, retain=True)
    assert ask(watcher, topics.device_check(name), reply_topic).json()["outcome"] == "unchanged"

    # 5: a clean stop says offline itself (the broker drops the will on DISCONNECT)
    assert agent.stop() == 0
    watcher.wait_for(topics.availability(name), lambda m: m.text == "offline", since=mark)

    # 3: restarted while the broker holds the retained tag: no second update
    restart = time.monotonic()
    agent.start()
    watcher.wait_for(topics.availability(name), lambda m: m.text == "online", since=restart)
    state = wait_state(watcher, prefix, name,
                       lambda s: settled_on("2.0")(s) and s["desired"]["source"] == "device",
                       since=restart, message="the retained device tag after the restart")
    assert ask(watcher, topics.device_check(name), reply_topic).json()["outcome"] == "unchanged"
    assert state["running"]["container_id"] == container_id
    assert docker_client.containers.get(name).attrs["State"]["StartedAt"] == started_at
    after = [e["event"] for e in events_since(watcher, prefix, name, mark)]
    assert "update_started" not in after, after
    assert device.serving() == v2


@pytest.mark.broker
def test_fleet_and_group_broadcasts_reach_three_agents(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
) -> None:
    """Acceptance 2; one of the agents speaks MQTT 3.1.1."""
    for version in ("1.0", "2.0", "3.0"):
        publish(unique_repo, version, version)
    topics = Topics(prefix)
    groups = {"a": "blue", "b": "blue", "c": "green"}
    devices: dict[str, Device] = {}
    for key, group in groups.items():
        device = Device(unique_repo, f"{container_name}-{key}", tmp_path / key)
        broker.add_device(device.name, [group])
        protocol = "3.1.1" if key == "b" else "5"
        agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0",
                     DEVICE_GROUPS=f"{group},spare", MQTT_PROTOCOL=protocol)
        devices[key] = device

    def all_settle(expected: dict[str, tuple[str, str]], since: float) -> None:
        for key, (tag, source) in expected.items():
            wait_state(
                watcher, prefix, devices[key].name,
                settled_from(tag, source),
                since=since, message=f"{tag} from {source}")
            assert devices[key].serving() == tag

    all_settle({k: ("1.0", "image") for k in devices}, 0.0)

    mark = time.monotonic()
    watcher.publish(topics.fleet_tag, "2.0", retain=True)
    all_settle({k: ("2.0", "fleet") for k in devices}, mark)

    mark = time.monotonic()
    watcher.publish(topics.group_tag("blue"), "3.0", retain=True)
    watcher.publish(topics.device_tag(devices["c"].name), "3.0", retain=True)
    all_settle({"a": ("3.0", "group"), "b": ("3.0", "group"), "c": ("3.0", "device")}, mark)
    group_state = wait_state(watcher, prefix, devices["a"].name, settled_on("3.0"))
    assert group_state["desired"]["group"] == "blue"

    mark = time.monotonic()
    watcher.publish(topics.device_tag(devices["c"].name), "", retain=True)  # clears
    all_settle({"c": ("2.0", "fleet")}, mark)
    assert (devices["c"].data_dir / "tag").read_text().strip() == "2.0"


@pytest.mark.broker
def test_broker_down_at_start_and_gone_for_30_s(
    unique_repo: str, container_name: str, tmp_path: Path, agents: Agents, test_id: str,
) -> None:
    """Acceptance 4, and a broker that is down at start never stops updates."""
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    prefix = f"t{test_id}"
    topics = Topics(prefix)
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    own = Broker()
    try:
        own.start()
        own.add_device(name)
        own.add_operator(OPERATOR)
        own.stop()

        agent = agents.spawn(device, own, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0")
        wait_until(lambda: device.serving() == "1.0", timeout=30,
                   message="the container to run without a broker")
        wait_until(lambda: "refused (broker down" in agent.log(), message="the refusal logged")

        own.start()
        watching = MqttWatcher(own.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"]).start()
        watching.wait_for(topics.availability(name), lambda m: m.text == "online", timeout=40)
        wait_state(watching, prefix, name, settled_on("1.0"), timeout=40)
        watching.close()

        own.stop()
        outage_end = time.monotonic() + 30
        answers = []
        while time.monotonic() < outage_end:
            answers.append(device.serving())
            time.sleep(0.5)
        assert set(answers) == {"1.0"}, answers
        assert agent.alive

        restart = time.monotonic()
        own.start()
        watching = MqttWatcher(own.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"]).start()
        # persistence: the retained state survived the restart ...
        retained = watching.wait_for(topics.state(name), lambda m: m.retain, since=restart)
        assert retained.json()["running"]["tag"] == "1.0"
        # ... and the agent republishes availability and state once it is back
        watching.wait_for(topics.availability(name), lambda m: not m.retain and m.text == "online",
                          since=restart, timeout=40, message="online republished")
        watching.wait_for(topics.state(name), lambda m: not m.retain, since=restart,
                          timeout=40, message="state republished")

        mark = time.monotonic()
        watching.publish(topics.device_tag(name), "2.0", retain=True)
        wait_state(watching, prefix, name, settled_on("2.0"), since=mark)
        assert device.serving() == "2.0"
        watching.close()
    finally:
        agents.close()
        own.close()


@pytest.mark.broker
def test_crash_reported_from_docker_events_and_sigkill_fires_the_will(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
    docker_client: docker.DockerClient,
) -> None:
    """Acceptance 5 (will) and crashes reported from Docker events: the next poll is ten
    minutes away, so only the events can bring the news."""
    publish(unique_repo, "1.0", "1.0")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    broker.add_device(name)
    agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0",
                         POLL_INTERVAL="10")
    state = wait_state(watcher, prefix, name, settled_on("1.0"))

    mark = time.monotonic()
    docker_client.containers.get(name).kill()
    exited = watcher.wait_for(topics.events(name),
                              lambda m: m.json()["event"] == "container_exited", since=mark,
                              timeout=10, message="container_exited")
    assert exited.json()["exit_code"] == 137
    crashed = wait_state(watcher, prefix, name, lambda s: s["running"]["status"] == "exited",
                         since=mark, timeout=10, message="the exited container")
    assert crashed["running"]["container_id"] == state["running"]["container_id"]

    mark = time.monotonic()
    agent.kill()
    watcher.wait_for(topics.availability(name), lambda m: m.text == "offline", since=mark,
                     timeout=15, message="the will")


@pytest.mark.broker
def test_notify_mode_installs_on_command_and_answers_mqtt5_requests(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
    docker_client: docker.DockerClient,
) -> None:
    """UPDATE_MODE=notify, cmd/install and cmd/check (device and fleet) with Response
    Topic and Correlation Data."""
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    reply_topic = topics.reply(name, "ops")
    broker.add_device(name)
    agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0",
                 UPDATE_MODE="notify")
    state = wait_state(watcher, prefix, name, lambda s: s["update"]["status"] == "available")
    assert (state["installed_version"], state["latest_version"]) == (None, "1.0")
    assert docker_client.containers.list(all=True, filters={"name": name}) == []

    answer = ask(watcher, topics.device_install(name), reply_topic,
                 b'{"request_id": "inst-1"}', correlation=b"\x00\xffbinary")
    assert answer.properties.CorrelationData == b"\x00\xffbinary"
    assert answer.json()["request_id"] == "inst-1"
    assert (answer.json()["outcome"], answer.json()["tag"]) == ("updated", "1.0")
    assert device.serving() == "1.0"
    container_id = docker_client.containers.get(name).id

    mark = time.monotonic()
    watcher.publish(topics.device_tag(name), "2.0", retain=True)
    state = wait_state(watcher, prefix, name,
                       lambda s: s["update"]["status"] == "available"
                       and s["latest_version"] == "2.0", since=mark)
    assert state["installed_version"] == "1.0"
    fleet = ask(watcher, topics.fleet_check, reply_topic, correlation=b"fleet")
    assert (fleet.json()["outcome"], fleet.json()["tag"]) == ("available", "2.0")
    assert docker_client.containers.get(name).id == container_id
    assert device.serving() == "1.0"

    answer = ask(watcher, topics.device_install(name), reply_topic, correlation=b"go")
    assert (answer.json()["outcome"], answer.json()["tag"]) == ("updated", "2.0")
    state = wait_state(watcher, prefix, name, settled_on("2.0"))
    assert state["installed_version"] == state["latest_version"] == "2.0"
    assert device.serving() == "2.0"


@pytest.mark.parametrize(("status", "event_id", "reported"), [
    (UpdateStatus.IDLE, "abc", True),
    (UpdateStatus.AVAILABLE, "abc", True),  # notify mode waiting for install
    (UpdateStatus.ERROR, "abc", True),
    (UpdateStatus.VERIFYING, "abc", False),  # the updater is busy with containers
    (UpdateStatus.IDLE, "old", False),  # removed by a rollback: no longer the container
])
def test_only_the_current_containers_death_is_a_crash(
    tmp_path: Path, status: UpdateStatus, event_id: str, reported: bool,
) -> None:
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path)}
    agent = Agent(load_settings(env))
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    agent.status.running = RunningView(container_id="abc", status="running")
    agent.status.update_status = status
    agent.handle(ContainerEvent("die", {"id": event_id, "exitCode": "3", "name": "edge-app"}))
    expected = [{"event": "container_exited", "exit_code": 3}] if reported else []
    assert [{k: e[k] for k in ("event", "exit_code")} for e in events] == expected
    agent.close()


# -- hostile and bursty desired tags (issue 9) -------------------------------------------
DEEP_TAG = b'{"tag": ' + b"[" * 2040 + b"]" * 2040 + b"}"  # 4 KB, within the size limit


def rejected_since(watcher: MqttWatcher, prefix: str, device: str, mark: float,
                   topics: set[str]) -> list[dict[str, Any]] | None:
    found = [e for e in events_since(watcher, prefix, device, mark)
             if e["event"] == "tag_rejected" and e.get("topic") in topics]
    return found if {e["topic"] for e in found} == topics else None


@pytest.mark.broker
def test_deep_json_retained_on_tag_topics_never_stops_the_agent(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
) -> None:
    """Finding 2: retained on fleet/tag, 4 KB of nesting killed the agent at every start."""
    publish(unique_repo, "1.0", "1.0")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    broker.add_device(name)
    deep_topics = {topics.fleet_tag, topics.device_tag(name)}
    for topic in deep_topics:
        watcher.publish(topic, DEEP_TAG, retain=True)

    start = time.monotonic()
    agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0")
    rejected = wait_until(lambda: rejected_since(watcher, prefix, name, start, deep_topics),
                          timeout=30, message="tag_rejected for both deep payloads")
    assert all("nested 2041 levels deep" in e["reason"] for e in rejected), rejected
    assert all("request_id" not in e for e in rejected)  # they answer no request
    wait_state(watcher, prefix, name, lambda s: settled_on("1.0")(s)
               and s["desired"]["source"] == "image", since=start)
    assert device.serving() == "1.0"
    assert agent.alive
    # a command is still answered, and a live deep payload is rejected like the retained
    answer = ask(watcher, topics.device_check(name), topics.reply(name, "deep"),
                 b'{"request_id": "chk-deep"}')
    assert answer.json()["outcome"] == "unchanged"
    mark = time.monotonic()
    watcher.publish(topics.device_tag(name), DEEP_TAG)
    wait_until(lambda: rejected_since(watcher, prefix, name, mark, {topics.device_tag(name)}),
               message="tag_rejected for the live deep payload")
    assert agent.alive

    # restart with the payloads still retained: it comes back and keeps running
    assert agent.stop() == 0
    restart = time.monotonic()
    agent.start()
    watcher.wait_for(topics.availability(name), lambda m: m.text == "online", since=restart)
    wait_until(lambda: rejected_since(watcher, prefix, name, restart, deep_topics),
               timeout=30, message="tag_rejected again after the restart")
    wait_state(watcher, prefix, name, settled_on("1.0"), since=restart)
    assert agent.alive and device.serving() == "1.0"
    assert "Traceback" not in agent.log()
    for topic in deep_topics:
        watcher.publish(topic, b"", retain=True)


@pytest.mark.broker
def test_request_ids_outside_the_grammar_are_refused_on_tags_and_dropped_on_commands(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
) -> None:
    """Finding 12 (agent half): one request-id grammar for the agent and the bridge."""
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    broker.add_device(name)
    agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0")
    wait_state(watcher, prefix, name, settled_on("1.0"))

    mark = time.monotonic()
    bad = json.dumps({"tag": "2.0", "request_id": "r1\u001b[2J\u202e"})
    watcher.publish(topics.device_tag(name), bad)
    rejected = wait_until(
        lambda: rejected_since(watcher, prefix, name, mark, {topics.device_tag(name)}),
        message="tag_rejected for the bad request id")
    assert rejected[0]["reason"] == ('"request_id" must be a string matching '
                                     "[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
    assert "request_id" not in rejected[0]
    # the command runs, answered without the id it cannot carry
    answer = ask(watcher, topics.device_check(name), topics.reply(name, "grammar"),
                 json.dumps({"request_id": "c 1\n"}).encode())
    assert (answer.json()["request_id"], answer.json()["outcome"]) == (None, "unchanged")
    assert answer.json()["tag"] == "1.0" and device.serving() == "1.0"
    assert "update_started" not in [e["event"] for e in events_since(watcher, prefix, name,
                                                                      mark)]
    assert agent.alive


def request_answers(watcher: MqttWatcher, prefix: str, device: str, request_id: str,  # noqa: PLR0913, PLR0917
                    tag: str, since: float) -> list[Answer]:
    """Every answer the device gave to ``request_id``, by edge_agent.protocol.answers' judges."""
    t = Topics(prefix)
    said = [(m.at, judge_state(m.json(), request_id, tag)) for m in watcher.on(t.state(device))]
    said += [(m.at, judge_event(m.json(), request_id, tag)) for m in watcher.on(t.events(device))]
    return [answer for at, answer in sorted(said, key=lambda pair: pair[0])
            if at >= since and answer is not None and answer.settled]


@pytest.mark.broker
def test_a_burst_of_tag_flips_is_coalesced_and_a_command_answered_meanwhile(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
) -> None:
    """Finding 4: 150 live flips were replayed one by one (an update each) and a command
    waited behind them. Now: a handful of updates, the last tag wins, every request is
    answered (applied, or superseded by a newer one), the command within an update or two."""
    tags = ("1.0", "2.0", "3.0")
    for tag in tags:
        publish(unique_repo, tag, tag)
    device = Device(unique_repo, container_name, tmp_path / "data")
    name = device.name
    topics = Topics(prefix)
    broker.add_device(name)
    agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{unique_repo}:1.0")
    wait_state(watcher, prefix, name, settled_on("1.0"))

    mark = time.monotonic()
    flips = [(f"flip-{n}", tags[(n % 2) + 1]) for n in range(150)]
    flips[-1] = ("flip-last", flips[-1][1])
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.ResponseTopic = topics.reply(name, "burst")
    properties.CorrelationData = b"burst"
    client = watcher.client
    assert client is not None
    sent = []
    for n, (request_id, tag) in enumerate(flips):  # as fast as QoS 1 goes, no waiting
        payload = json.dumps({"tag": tag, "request_id": request_id})
        sent.append(client.publish(topics.device_tag(name), payload, qos=1, retain=True))
        if n == 75:
            commanded = time.monotonic()
            sent.append(client.publish(topics.device_check(name), b'{"request_id": "chk-burst"}',
                                       qos=1, properties=properties))
    for info in sent:
        info.wait_for_publish(10)
    last_id, last_tag = flips[-1]
    # bounded: before, the command waited for ~75 updates (minutes)
    answer = watcher.wait_for(topics.reply(name, "burst"), since=commanded, timeout=60,
                              message="the answer to the command sent during the burst")
    assert answer.json()["request_id"] == "chk-burst" and answer.json()["ok"]
    state = wait_state(watcher, prefix, name, lambda s: settled_on(last_tag)(s)
                       and s["desired"]["request_id"] == last_id, since=mark, timeout=60,
                       message="the last flip applied")
    assert state["desired"]["request_id"] == last_id and device.serving() == last_tag
    time.sleep(2)  # nothing more happens: no backlog is being worked off
    events = events_since(watcher, prefix, name, mark)
    started = [e for e in events if e["event"] == "update_started"]
    assert 1 <= len(started) <= 3, [(e["to_tag"], e.get("request_id")) for e in started]
    swapped = [e for e in events if e["event"] in ("update_succeeded", "rolled_back")]
    assert [(e["event"], e["tag"]) for e in swapped][-1:] == [("update_succeeded", last_tag)]
    assert len(swapped) <= 3, swapped  # a handful (how many depends on the machine's pace)
    # every request has an answer: the last one applied, the others mostly superseded
    unanswered = [rid for rid, tag in flips
                  if not request_answers(watcher, prefix, name, rid, tag, mark)]
    assert unanswered == []
    outcomes = Counter(a.outcome for rid, tag in flips
                       for a in request_answers(watcher, prefix, name, rid, tag, mark)[:1])
    assert outcomes[Outcome.SUPERSEDED] >= len(flips) - 4, outcomes
    assert [a.outcome for a in request_answers(watcher, prefix, name, last_id, last_tag,
                                               mark)][:1] in (["applied"], ["updated"])
    assert agent.alive


@pytest.mark.broker
def test_a_new_desired_tag_stops_a_slow_pull(  # noqa: PLR0913, PLR0917
    broker: Broker, watcher: MqttWatcher, prefix: str, unique_repo: str,
    container_name: str, tmp_path: Path, agents: Agents,
) -> None:
    """Finding 4: a tag corrected during a long pull was pulled, installed and only then
    replaced. Now the pull stops, the newest tag is installed, the replaced request is
    answered tag_superseded, and a command sent meanwhile is answered after it."""
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "3.0", "3.0")
    publish_padded(unique_repo, "2.0", "2.0", pad_bytes=6 * 1024 * 1024)
    with ThrottledRegistry(bytes_per_s=256 * 1024, min_bytes=2 * 1024 * 1024) as proxy:
        repo = proxy.repo(unique_repo)  # ~25 s for 2.0's big layer through the proxy
        try:
            device = Device(repo, container_name, tmp_path / "data")
            name = device.name
            topics = Topics(prefix)
            broker.add_device(name)
            agent = agents.spawn(device, broker, prefix, CONTAINER_IMAGE=f"{repo}:1.0")
            wait_state(watcher, prefix, name, settled_on("1.0"))

            mark = time.monotonic()
            watcher.publish(topics.device_tag(name),
                            json.dumps({"tag": "2.0", "request_id": "r-slow"}), retain=True)
            wait_state(watcher, prefix, name, lambda s: s["update"]["status"] == "pulling"
                       and s["desired"]["request_id"] == "r-slow"
                       and (s["update"]["progress"] or 0) > 0, since=mark,
                       message="the slow pull under way")
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = topics.reply(name, "slow")
            properties.CorrelationData = b"slow"
            watcher.publish(topics.device_check(name), b'{"request_id": "chk-slow"}',
                            properties=properties)
            watcher.publish(topics.device_tag(name),
                            json.dumps({"tag": "3.0", "request_id": "r-fast"}), retain=True)

            superseded = watcher.wait_for(
                topics.events(name), lambda m: m.json()["event"] == "tag_superseded",
                since=mark, timeout=20, message="tag_superseded for r-slow").json()
            assert (superseded["request_id"], superseded["tag"], superseded["new_tag"],
                    superseded["superseded_by"]) == ("r-slow", "2.0", "3.0", "r-fast")
            state = wait_state(watcher, prefix, name, settled_on("3.0"), since=mark,
                               message="3.0 installed")
            assert state["desired"]["request_id"] == "r-fast" and device.serving() == "3.0"
            answer = watcher.wait_for(topics.reply(name, "slow"), since=mark, timeout=20,
                                      message="the answer to the command").json()
            assert (answer["request_id"], answer["ok"], answer["tag"]) == ("chk-slow", True,
                                                                            "3.0")
            events = events_since(watcher, prefix, name, mark)
            assert [(e["event"], e["tag"]) for e in events
                    if e["event"] in ("update_succeeded", "rolled_back", "update_failed")] \
                == [("update_succeeded", "3.0")]
            wait_until(lambda: proxy.aborted >= 1, message="the 2.0 download abandoned")
            assert proxy.completed == 0
            slow = request_answers(watcher, prefix, name, "r-slow", "2.0", mark)
            assert [a.outcome for a in slow] == ["superseded"]
            assert agent.alive
        finally:
            agents.close()
            remove_repo_images(repo)
