"""SIGKILL at every step of an update, then a restart converges (issue 2, acceptance 6).

The agent runs as its own process with EDGE_AGENT_TEST_KILL_AT naming the step at
which it SIGKILLs itself: a real kill -9, not a simulated exception.
"""

from __future__ import annotations

import signal
from pathlib import Path

import docker
import pytest

from tests.support.device import Device, publish

STEPS = ["pulling", "created", "renamed_old", "renamed_new", "stopped", "started"]


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
