"""SIGKILL at every step of an update, then a restart converges (issue 2, acceptance 6).

The agent runs as its own process with EDGE_AGENT_TEST_KILL_AT naming the step at
which it SIGKILLs itself: a real kill -9, not a simulated exception.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import docker
import pytest

from edge_agent.reconcile import MAX_INTERRUPTED
from tests.support.device import Device, publish
from tests.support.updates import DockerMark, container_names, created_since

STEPS = ["pulling", "created", "renamed_old", "renamed_new", "stopped", "started", "verified"]


@pytest.mark.parametrize("step", STEPS)
def test_killed_mid_update_converges_on_restart(
    step: str, unique_repo: str, container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    device.agent().check()
    assert device.serving() == "1.0"

    device.write_tag("2.0")
    proc = device.spawn(EDGE_AGENT_TEST_KILL_AT=step)
    output = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == -signal.SIGKILL, output

    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome in ("updated", "unchanged")
    assert device.serving() == "2.0"
    containers = docker_client.containers.list(all=True, filters={"name": container_name})
    assert sorted(c.name for c in containers) == [container_name]
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
    proc = device.spawn(EDGE_AGENT_TEST_KILL_AT="created")  # 3.0 pulled, then killed
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
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
