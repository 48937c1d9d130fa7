"""SIGKILL at every step of an update, then a restart converges (issue 2, acceptance 6).

The agent runs as its own process with EDGE_AGENT_TEST_KILL_AT naming the step at
which it SIGKILLs itself: a real kill -9, not a simulated exception.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.reconcile import MAX_INTERRUPTED
from edge_agent.bridge.fleet import wait_answer
from edge_agent.protocol.answers import judge_event, judge_state
from tests.support.device import Device, publish
from tests.support.images import Kind
from tests.support.updates import DockerMark, ask, container_names, created_since

STEPS = ["pulling", "created", "renamed_old", "renamed_new", "stopped", "started", "verified"]


@pytest.mark.parametrize("step", STEPS)
def test_killed_mid_update_converges_on_restart(
    step: str, unique_repo: str, container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    publish(device.repo, "1.0", "1.0")
    # content of its own: an image that another repository on the daemon shares would
    # be "pulled" without a layer to download, and the "pulling" step would never come
    new_version = f"2.0 {container_name}"
    publish(device.repo, "2.0", new_version)
    device.write_tag("1.0")
    device.agent().check()
    assert device.serving() == "1.0"

    device.write_tag("2.0")
    killed_at(device, step)

    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome in ("updated", "unchanged")
    assert device.serving() == new_version
    containers = docker_client.containers.list(all=True, filters={"name": container_name})
    assert [c.name for c in containers] == [container_name]
    assert containers[0].status == "running"
    assert agent.state.pending is None


def test_image_of_an_interrupted_update_is_pruned_later(
    unique_repo: str, container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    for version in ("1.0", "2.0", "3.0"):
        publish(device.repo, version, version)
    agent = device.agent()
    for version in ("1.0", "2.0"):
        device.write_tag(version)
        agent.check()
    kept = {image.id for image in docker_client.images.list(name=device.repo)}

    device.write_tag("3.0")
    killed_at(device, "created")  # 3.0 pulled, then killed
    device.write_tag("2.0")  # back to what runs: nothing to update, 3.0 left behind
    result = device.agent().check()

    assert result is not None and result.outcome == "unchanged"
    assert {image.id for image in docker_client.images.list(name=device.repo)} == kept


def killed_at(device: Device, step: str) -> None:
    """Run the agent as its own process until it SIGKILLs itself at ``step``."""
    proc = device.spawn(EDGE_AGENT_TEST_KILL_AT=step)
    try:
        output = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:  # never reached the step
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output


def converged(device: Device, client: docker.DockerClient,
              caplog: pytest.LogCaptureFixture) -> None:
    """One more check changes nothing: no recovery, no container created, still 1.0."""
    caplog.clear()
    mark = DockerMark()
    agent = device.agent()
    result = agent.check()
    assert result is not None and result.outcome == "skipped"
    assert "interrupted update" not in caplog.text
    assert created_since(client, device.name, mark) == []
    assert agent.events == []  # type: ignore[attr-defined]
    assert device.serving() == "1.0"
    assert container_names(client, device.name) == [device.name]


@pytest.fixture
def device(unique_repo: str, container_name: str, tmp_path: Path) -> Device:
    return Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")


def test_a_failed_start_left_half_done_is_undone_once_and_remembered(
    device: Device, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """What issue 9 found: ``<name>`` Created (its image cannot start), ``<name>-previous``
    Exited, the update journalled. Recovery puts 1.0 back once; the new attempt fails to
    start, is rolled back and remembered; after that nothing moves."""
    caplog.set_level(logging.INFO)
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0", "bad_entrypoint")
    device.write_tag("1.0")
    device.agent().check()
    device.write_tag("2.0")
    killed_at(device, "stopped")
    left = {c.name: c.status for c in docker_client.containers.list(
        all=True, filters={"name": device.name})}
    assert left == {device.name: "created", f"{device.name}-previous": "exited"}

    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome == "rolled_back"
    assert caplog.text.count("found an interrupted update") == 1
    assert device.serving() == "1.0"
    assert container_names(docker_client, device.name) == [device.name]
    (event,) = [e for e in agent.events if e["event"] == "rolled_back"]  # type: ignore[attr-defined]
    assert "no such file" in event["reason"]
    assert agent.state.pending is None and len(agent.state.failed) == 1
    converged(device, docker_client, caplog)


def test_killed_during_a_rollback_finishes_it_at_restart(
    device: Device, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed after judging the new container failed, before undoing it: the restarted
    agent finishes the rollback, remembers the failure and answers once."""
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0", "bad_entrypoint")
    device.write_tag("1.0")
    device.agent().check()
    device.write_tag("2.0")
    killed_at(device, "rolling_back")

    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome == "skipped"
    assert device.serving() == "1.0"
    assert container_names(docker_client, device.name) == [device.name]
    events = [e["event"] for e in agent.events]  # type: ignore[attr-defined]
    assert events.count("rolled_back") == 1 and "update_started" not in events
    assert agent.state.pending is None and len(agent.state.failed) == 1
    converged(device, docker_client, caplog)


def test_an_update_broken_off_again_and_again_gives_up(
    device: Device, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    """An update killed every time after the old container stopped (as an image that
    takes the device down at start would) is tried MAX_INTERRUPTED times, then rolled
    back for good: the device serves the old version instead of going down forever."""
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    device.agent().check()
    device.write_tag("2.0")
    for _ in range(MAX_INTERRUPTED):
        killed_at(device, "stopped")

    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome == "skipped"
    assert device.serving() == "1.0"
    assert container_names(docker_client, device.name) == [device.name]
    (event,) = [e for e in agent.events if e["event"] == "rolled_back"]  # type: ignore[attr-defined]
    assert f"broken off {MAX_INTERRUPTED} times" in event["reason"]
    converged(device, docker_client, caplog)


@pytest.mark.parametrize("kind", ["ok", "exits"])
def test_recovering_an_older_update_does_not_answer_a_new_request(
    kind: Kind, device: Device, docker_client: docker.DockerClient,
) -> None:
    """The agent is killed while verifying 2.0 (a file tag, no request id); meanwhile an
    operator asks for 3.0 (request r-2). The check that follows first finishes or undoes
    the 2.0 update: nothing it publishes on the way may answer r-2 (no idle state showing
    r-2 on another tag, no rolled_back carrying r-2); r-2 is answered by 3.0 only."""
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0", kind)
    publish(device.repo, "3.0", "3.0")
    device.write_tag("1.0")
    device.agent().check()
    device.write_tag("2.0")
    killed_at(device, "started")

    agent = device.agent()
    states: list[dict[str, Any]] = []
    agent.status.state_sinks.append(states.append)
    ask(agent, "3.0", "r-2")
    result = agent.check()

    assert result is not None and result.outcome == "updated"
    assert device.serving() == "3.0"
    answers = [wait_answer(judge_state(s, "r-2", "3.0")) for s in states]
    answers += [judge_event(e, "r-2", "3.0") for e in agent.events]  # type: ignore[attr-defined]
    given = [a for a in answers if a is not None]
    assert given, "r-2 was never answered"
    assert all(a.ok for a in given), [a.reason for a in given if not a.ok]
