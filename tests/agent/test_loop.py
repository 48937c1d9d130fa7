"""The agent loop's resilience: faults outside Docker's happy path never crash it."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.agent.config import load_settings
from edge_agent.agent.loop import (
    REMOTE_SETTLE_S,
    RETRY_BASE_S,
    Agent,
    ContainerEvent,
    Wake,
)
from edge_agent.agent.reconcile import Desired, RemoteTag
from edge_agent.agent.remote import REPLAY_GRACE_S, VIEW_HOLD_MAX_S
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.events import CheckOutcome, EventName
from edge_agent.protocol.messages import CheckRequest, RemoteReady, RemoteReset, RemoteTagMessage
from edge_agent.protocol.state import DeferReason, Source, UpdateStatus
from edge_agent.protocol.tags import DesiredTag, is_request_id, parse_tag_payload
from tests.support.hostile import RecordsWithTracebacks, hostile_payloads


def make_agent(tmp_path: Path, **extra: str) -> Agent:
    env = {"CONTAINER_IMAGE": "127.0.0.1:5000/nothing/app", "DATA_DIR": str(tmp_path / "data"),
           "CONTAINER_NAME": "edge-test-unused", "POLL_INTERVAL": "1", **extra}
    return Agent(load_settings(env))


def test_daemon_unreachable_is_reported_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path)
    before = time.monotonic()

    assert agent.check() is None
    assert agent.check() is None

    document = agent.status.document()
    assert document["update"]["status"] == "error"
    assert "connect to Docker" in document["update"]["last_error"]
    # capped backoff: the next try comes sooner than the poll interval, later than at once
    assert before + RETRY_BASE_S <= agent._next_check < before + 60


def test_unwritable_data_dir_does_not_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = Agent(load_settings({"CONTAINER_IMAGE": "r/app", "DATA_DIR": str(blocker / "data")}))
    assert agent.check() is None
    assert agent.status.document()["update"]["status"] == "error"


def test_invalid_remote_payload_is_rejected_without_effect(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    events: list[dict[str, object]] = []
    agent.status.event_sinks.append(events.append)
    agent.handle(RemoteTagMessage(Source.DEVICE, b'{"tag": "../x"}', topic="edge/devices/d/tag"))
    assert agent.tags.current == {}
    assert events[0]["event"] == "tag_rejected"
    assert events[0]["topic"] == "edge/devices/d/tag"


def test_an_unusable_tag_file_holds_the_weaker_sources_back(tmp_path: Path) -> None:
    """Garbage in DATA_DIR/tag must not move a healthy container to the image tag or
    FALLBACK_TAG; a desired tag from MQTT still wins."""
    agent = make_agent(tmp_path, CONTAINER_IMAGE="127.0.0.1:5000/nothing/app:1.0")
    tag_file = tmp_path / "data" / "tag"
    tag_file.parent.mkdir(parents=True, exist_ok=True)
    tag_file.write_text("not a tag!\n")
    with pytest.raises(TagError, match="the tag file is unusable"):
        agent.resolve()
    agent.handle(RemoteTagMessage(Source.DEVICE, b"3.0", retained=False))
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source) == ("3.0", Source.DEVICE)
    tag_file.unlink()  # no file at all is fine: the weaker sources apply
    agent.tags.current.clear()
    desired = agent.resolve()
    assert desired is not None and desired.source is Source.IMAGE


def test_remote_tags_follow_precedence_and_clear(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, DEVICE_GROUPS="north,south")
    agent.handle(RemoteTagMessage(Source.FLEET, b"1.0"))
    agent.handle(RemoteTagMessage(Source.GROUP, b"2.0", group="south"))
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source, desired.detail) == ("2.0", Source.GROUP, "south")
    agent.handle(RemoteTagMessage(Source.DEVICE, b'{"tag": "3.0", "request_id": "r-1"}'))
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.request_id) == ("3.0", "r-1")
    agent.handle(RemoteTagMessage(Source.DEVICE, b""))
    agent.handle(RemoteTagMessage(Source.GROUP, b"", group="south"))
    desired = agent.resolve()
    assert desired is not None and (desired.tag, desired.source) == ("1.0", Source.FLEET)


def test_live_tags_are_acted_on_at_once_retained_ones_settle(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    agent._next_check = time.monotonic() + 3600
    agent.handle(RemoteTagMessage(Source.FLEET, b"1.0", retained=True))
    settle_until = agent._next_check
    assert time.monotonic() < settle_until <= time.monotonic() + REMOTE_SETTLE_S
    agent.handle(RemoteTagMessage(Source.DEVICE, b"2.0", retained=False))
    assert agent._next_check <= time.monotonic()


def test_check_request_is_answered_even_when_the_check_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path)
    answers: list[dict[str, object]] = []
    agent.inbox.put(CheckRequest(request_id="q1", reply=answers.append))
    agent.step(max_wait_s=0)
    assert answers and answers[0]["request_id"] == "q1" and answers[0]["ok"] is False


def test_sigterm_flag_stops_the_loop(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    agent._next_check = time.monotonic() + 3600
    agent.request_exit()
    agent.run()  # returns at once: should_exit is set and the inbox woke it
    assert agent.should_exit


# -- one message never stops the loop (issue 9, finding 2) ---------------------------------
DEEP = b'{"tag": ' + b"[" * 2040 + b"]" * 2040 + b"}"


def test_deep_json_tag_is_rejected_and_the_loop_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path)
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    answers: list[dict[str, Any]] = []
    agent.inbox.put(RemoteTagMessage(Source.FLEET, DEEP, "edge/fleet/tag"))
    agent.inbox.put(CheckRequest("q1", reply=answers.append))
    agent.step(max_wait_s=0)
    rejected = [e for e in events if e["event"] == "tag_rejected"]
    assert len(rejected) == 1 and "nested 2041 levels deep" in rejected[0]["reason"]
    assert agent.tags.current == {}
    assert [a["request_id"] for a in answers] == ["q1"]  # the next message was handled


def test_a_bug_met_handling_a_message_is_logged_once_and_the_message_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path)

    def bug(message: RemoteTagMessage) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(agent, "_handle_remote_tag", bug)
    answers: list[dict[str, Any]] = []
    caplog.set_level(logging.DEBUG, logger="edge_agent.agent.loop")
    for n in range(3):
        agent.inbox.put(RemoteTagMessage(Source.DEVICE, b"1.0", "edge/devices/d/tag"))
        agent.inbox.put(CheckRequest(f"q{n}", reply=answers.append))
        agent.step(max_wait_s=0)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR
              and "internal error while handling" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "RemoteTagMessage on edge/devices/d/tag" in errors[0].getMessage()
    assert sum("(again)" in r.getMessage() for r in caplog.records) == 2
    assert [a["request_id"] for a in answers] == ["q0", "q1", "q2"]


def test_a_rejected_payload_answers_its_own_request_only(tmp_path: Path) -> None:
    """A junk payload must not answer the request the device is working on."""
    agent = make_agent(tmp_path)
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    agent.status.desired = Desired("2.0", Source.DEVICE, "r-current")
    agent.handle(RemoteTagMessage(Source.FLEET, b"{junk", "edge/fleet/tag"))
    agent.handle(RemoteTagMessage(Source.FLEET, b'{"tag": "../x", "request_id": "r9"}',
                                  "edge/fleet/tag"))
    agent.handle(RemoteTagMessage(Source.FLEET, b'{"tag": "1.0", "request_id": "r 9"}',
                                  "edge/fleet/tag"))
    assert [(e["event"], e.get("request_id")) for e in events] == [
        ("tag_rejected", None), ("tag_rejected", "r9"), ("tag_rejected", None)]
    assert agent.status.desired == Desired("2.0", Source.DEVICE, "r-current")
    # the next event still answers the request the device is working on
    agent.status.event(EventName.PULL_PROGRESS)
    assert events[-1]["request_id"] == "r-current"


# -- coalescing (issue 9, finding 4) --------------------------------------------------------
def flip(n: int, tag: str, *, scope: Source = Source.DEVICE, group: str | None = None,
         retained: bool = False) -> RemoteTagMessage:
    payload = json.dumps({"tag": tag, "request_id": f"r{n}"}).encode()
    return RemoteTagMessage(scope, payload, f"edge/{scope}/tag", group, retained=retained)


def test_a_burst_of_desired_tags_is_one_check_on_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 flips and a command queued during an update: one check, on the newest tag; the
    command is answered by it, every older request by a tag_superseded event."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path)
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    answers: list[dict[str, Any]] = []
    for n in range(300):
        agent.inbox.put(flip(n, ("2.0", "3.0")[n % 2]))
        if n == 150:
            agent.inbox.put(CheckRequest("cmd", reply=answers.append))
    agent.step(max_wait_s=0)
    assert agent.inbox.empty()
    assert agent.status.desired == Desired("3.0", Source.DEVICE, "r299")
    assert agent._failures == 1  # one check (it failed: no Docker here)
    assert [a["request_id"] for a in answers] == ["cmd"]
    superseded = [e for e in events if e["event"] == "tag_superseded"]
    assert [e["request_id"] for e in superseded] == [f"r{n}" for n in range(299)]
    assert {(e["superseded_by"], e["new_tag"]) for e in superseded} == {("r299", "3.0")}
    assert superseded[0]["tag"] == "2.0" and superseded[0]["reason"] == (
        "the device desired tag 2.0 was replaced by 3.0 (request r299) before it was applied")
    # r299 is still open (the check failed, it is retried): a newer tag supersedes it too
    events.clear()
    agent.inbox.put(RemoteTagMessage(Source.DEVICE, b"", "edge/device/tag", retained=False))
    agent.step(max_wait_s=0)
    assert [(e["event"], e["request_id"], e["new_tag"]) for e in events
            if e["event"] == "tag_superseded"] == [("tag_superseded", "r299", None)]


def test_only_a_request_replaced_on_its_own_topic_is_superseded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """A fleet request under a device tag stays open (it applies when the device tag goes);
    a retained replay is history, not a request; a repeat of an id is the same request."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    agent = make_agent(tmp_path, DEVICE_GROUPS="blue")
    events: list[dict[str, Any]] = []
    agent.status.event_sinks.append(events.append)
    for message in (flip(1, "1.0", scope=Source.DEVICE), flip(2, "2.0", scope=Source.FLEET),
                    flip(3, "3.0", scope=Source.GROUP, group="blue"),
                    RemoteReset(),  # a reconnect: the replay of a tag set meanwhile
                    flip(4, "4.0", scope=Source.FLEET, retained=True),
                    flip(1, "1.0", scope=Source.DEVICE)):
        agent.inbox.put(message)
    agent.step(max_wait_s=0)
    assert [e["request_id"] for e in events if e["event"] == "tag_superseded"] == ["r2"]
    assert agent.status.desired == Desired("1.0", Source.DEVICE, "r1")


def test_a_pull_stops_when_the_desired_tag_changes(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    agent.handle(flip(1, "2.0"))
    agent._working_on = agent.resolve()
    agent.status.update_status = UpdateStatus.PULLING
    assert not agent._should_abort()  # nothing new

    agent.inbox.put(flip(2, "2.0"))  # the same tag again, another request: pull on
    assert not agent._should_abort()

    exit_soon = ContainerEvent("die", {"id": "x"})
    agent.inbox.put(exit_soon)  # not a tag: waits for the loop, in order
    agent.inbox.put(flip(3, "3.0"))
    assert agent._should_abort()
    assert agent._superseded_by == Desired("3.0", Source.DEVICE, "r3")
    assert list(agent._backlog) == [exit_soon]

    agent.status.update_status = UpdateStatus.VERIFYING  # a swap is never broken off
    agent.inbox.put(flip(4, "4.0"))
    assert not agent._should_abort()
    assert agent.inbox.qsize() == 1

    agent.request_exit()
    assert agent._should_abort()


def test_tags_after_a_reconnect_wait_for_the_reset_before_them(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    agent.handle(flip(1, "2.0"))
    agent._working_on = agent.resolve()
    agent.status.update_status = UpdateStatus.PULLING
    agent.inbox.put(RemoteReset())
    agent.inbox.put(flip(2, "3.0", retained=True))  # the next session's replay
    agent.inbox.put(RemoteReady())  # its tag subscriptions granted
    assert not agent._should_abort()
    assert [type(m) for m in agent._backlog] == [RemoteReset, RemoteTagMessage, RemoteReady]
    agent.status.update_status = UpdateStatus.IDLE
    agent._working_on = None
    agent.step(max_wait_s=0)  # the loop handles them in order
    assert not agent._backlog
    assert agent.tags.current == {(Source.DEVICE, None): RemoteTag("3.0", "r2")}


def test_a_tag_the_new_session_has_not_replayed_yet_holds_for_a_grace(tmp_path: Path) -> None:
    """A cluster node that took over may grant the subscriptions and send the retained
    tags later: until then (or the grace's end) the device tag still wins over its group's."""
    agent = make_agent(tmp_path, DEVICE_GROUPS="blue")
    device, group = (Source.DEVICE, None), (Source.GROUP, "blue")
    for message in (flip(1, "4.0"), flip(2, "3.0", scope=Source.GROUP, group="blue")):
        agent.handle(message)
    agent.handle(RemoteReset())
    agent.handle(flip(3, "3.0", scope=Source.GROUP, group="blue", retained=True))
    agent.handle(RemoteReady())  # granted; the device tag's replay is still on its way
    assert agent.tags.current[device] == RemoteTag("4.0", "r1")
    desired = agent.resolve()
    assert desired is not None and desired.tag == "4.0"
    # its replay confirms it: it stays past the grace
    agent.handle(flip(1, "4.0", retained=True))
    agent.tags.expire(time.monotonic() + REPLAY_GRACE_S + 1)
    assert agent.tags.current[device] == RemoteTag("4.0", "r1")
    # a tag cleared while the agent was away: no replay comes, and after the grace it goes
    agent.handle(RemoteReset())
    agent.handle(flip(4, "3.0", scope=Source.GROUP, group="blue", retained=True))
    agent.handle(RemoteReady())
    assert device in agent.tags.current
    agent.tags.expire(time.monotonic() + REPLAY_GRACE_S + 1)
    assert device not in agent.tags.current and agent.tags.current[group].tag == "3.0"
    desired = agent.resolve()
    assert desired is not None and desired.tag == "3.0"
    agent.close()


def test_after_a_reconnect_no_version_change_rests_on_an_unconfirmed_tag(tmp_path: Path) -> None:
    """Seen on a NATS cluster after a node died: the rollout cleared the device's own tag
    while the device's subscription to its group was still refused. The group's old tag
    must not send the device back for a few seconds (it would update twice)."""
    agent = make_agent(tmp_path, DEVICE_GROUPS="blue")
    agent.status.running.tag = "4.0"
    for message in (flip(1, "4.0"), flip(2, "3.0", scope=Source.GROUP, group="blue")):
        agent.handle(message)
    agent.handle(RemoteReset())  # the new node: the device tag replayed, the group refused
    agent.handle(flip(1, "4.0", retained=True))
    desired = agent.resolve()
    assert desired is not None and agent._broker_hold(desired) is None  # confirmed, running
    agent.handle(RemoteTagMessage(Source.DEVICE, b"", "edge/device/tag", None, retained=False))  # cleared
    result = agent.check()
    assert result is not None and result.outcome is CheckOutcome.DEFERRED
    deferred = agent.status.deferred
    assert deferred is not None and deferred.reason is DeferReason.BROKER
    assert deferred.tag == "3.0" and "group blue" in deferred.detail
    assert agent._next_check <= time.monotonic() + VIEW_HOLD_MAX_S
    # the group's subscription granted: its replay brings the tag the rollout set
    agent.handle(flip(3, "4.0", scope=Source.GROUP, group="blue", retained=True))
    desired = agent.resolve()
    assert desired is not None and agent._broker_hold(desired) is None
    # a subscription refused for good holds a change back VIEW_HOLD_MAX_S at most
    agent.handle(RemoteReset())
    agent.handle(flip(4, "5.0", scope=Source.FLEET))  # live; the group above it unheard
    desired = agent.resolve()
    assert desired is not None and desired.tag == "4.0"  # the group still wins
    agent.handle(RemoteTagMessage(Source.GROUP, b"", "edge/group/tag", "blue", retained=False))
    desired = agent.resolve()
    assert desired is not None and desired.tag == "5.0"  # confirmed all the way up
    assert agent._broker_hold(desired) is not None  # the device tag above it: unheard
    assert agent.tags.session_at is not None
    agent.tags.session_at -= VIEW_HOLD_MAX_S
    assert agent._broker_hold(desired) is None
    agent.close()


def test_a_replay_after_a_live_tag_in_the_same_session_is_older_and_ignored(
    tmp_path: Path,
) -> None:
    """Seen on a NATS cluster after a node died: the new node granted the device's tag
    subscription late, after the rollout's live tag had come, and replayed the tag from
    before it."""
    agent = make_agent(tmp_path)
    device = (Source.DEVICE, None)
    agent.handle(flip(1, "2.0", retained=True))
    agent.handle(RemoteReset())
    agent.handle(flip(2, "4.0"))  # live: the rollout
    agent.handle(flip(1, "2.0", retained=True))  # the late replay
    assert agent.tags.current[device] == RemoteTag("4.0", "r2")
    agent.handle(RemoteTagMessage(Source.DEVICE, b"", "edge/device/tag", None, retained=False))  # live clear
    agent.handle(flip(1, "2.0", retained=True))
    assert device not in agent.tags.current
    agent.handle(RemoteReset())  # a new session replays what is current again
    agent.handle(flip(3, "5.0", retained=True))
    assert agent.tags.current[device] == RemoteTag("5.0", "r3")
    agent.close()


# -- fuzzing: any sequence of messages -------------------------------------------------------
valid_payloads = st.builds(
    lambda tag, request_id: json.dumps({"tag": tag, "request_id": request_id}).encode(),
    st.sampled_from(["1.0", "2.0", "3.0", "", None]),
    st.none() | st.sampled_from([f"r{n}" for n in range(8)]),
)
messages: st.SearchStrategy[Any] = st.one_of(
    st.builds(RemoteTagMessage, scope=st.sampled_from([Source.DEVICE, Source.GROUP, Source.FLEET]),
              payload=valid_payloads | hostile_payloads(), topic=st.just("edge/x/tag"),
              group=st.sampled_from([None, "blue", "red"]), retained=st.booleans()),
    st.builds(CheckRequest, request_id=st.none() | st.sampled_from(["c1", "c2"]),
              install=st.booleans()),
    st.builds(ContainerEvent, action=st.sampled_from(["die", "health_status", "start"])
              | st.text(max_size=10),
              attributes=st.dictionaries(st.sampled_from(["id", "exitCode", "name"])
                                         | st.text(max_size=8), st.text(max_size=12),
                                         max_size=4)),
    st.sampled_from([RemoteReset(), RemoteReady(), Wake()]),
)


def test_any_sequence_of_messages_is_handled_and_every_command_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    tracebacks = RecordsWithTracebacks()
    logging.getLogger("edge_agent").addHandler(tracebacks)

    def parsed(message: RemoteTagMessage) -> DesiredTag | None:
        try:
            return parse_tag_payload(message.payload)
        except TagError:
            return None

    @settings(max_examples=150, deadline=None)
    @given(st.lists(messages, max_size=30))
    def run(batch: list[Any]) -> None:
        with tempfile.TemporaryDirectory() as data:
            agent = make_agent(Path(data), DEVICE_GROUPS="blue,red")
            agent._next_check = time.monotonic() + 3600
            events: list[dict[str, Any]] = []
            agent.status.event_sinks.append(events.append)
            answers: list[dict[str, Any]] = []
            for message in batch:
                agent.inbox.put(dataclasses.replace(message, reply=answers.append)
                                if isinstance(message, CheckRequest) else message)
            agent.step(max_wait_s=0)
            # a retained tag waits for its siblings: one more step after that settle time
            settle = agent._next_check - time.monotonic()
            if settle <= REMOTE_SETTLE_S:
                agent.step(max_wait_s=max(settle, 0.0))
            assert tracebacks.records == [], tracebacks.records[0].getMessage()
            assert agent.inbox.empty() and not agent._backlog
            # every command answered, once
            asked = [m.request_id for m in batch if isinstance(m, CheckRequest)]
            assert sorted(a["request_id"] or "" for a in answers) == sorted(r or "" for r in asked)
            # only live requests are superseded, each once, never the one acted on
            superseded = [e["request_id"] for e in events if e["event"] == "tag_superseded"]
            tags = [(m, parsed(m)) for m in batch if isinstance(m, RemoteTagMessage)]
            live = {p.request_id for m, p in tags if p is not None and not m.retained}
            assert len(superseded) == len(set(superseded)) and set(superseded) <= live
            checked = asked or any(p is not None for _, p in tags) \
                or any(isinstance(m, RemoteReady) for m in batch)
            if checked:  # the check saw the latest desired state
                assert agent.status.desired == agent.resolve()
                desired = agent.status.desired
                assert desired is None or desired.request_id not in superseded
            for event in events:
                assert event.get("request_id") is None or is_request_id(event["request_id"])
            agent.close()

    try:
        run()
    finally:
        logging.getLogger("edge_agent").removeHandler(tracebacks)
