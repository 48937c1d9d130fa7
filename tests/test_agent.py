"""The agent loop's resilience: faults outside Docker's happy path never crash it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_agent.agent import (
    REMOTE_SETTLE_S,
    RETRY_BASE_S,
    Agent,
    CheckRequest,
    RemoteTagMessage,
)
from edge_agent.config import load_settings
from edge_agent.reconcile import Source


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
    assert agent.remote == {}
    assert events[0]["event"] == "tag_rejected"
    assert events[0]["topic"] == "edge/devices/d/tag"


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
