"""The update algorithm on the real Docker daemon and registry (issue 2 acceptance)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.loop import Agent
from tests.support import wait_until
from tests.support.device import Device, publish
from tests.support.images import (
    Kind,
    build_image,
    container_image_id,
    push_image,
    remove_repo_images,
)
from tests.support.registry import RegistryLog


@pytest.fixture
def device(unique_repo: str, container_name: str, tmp_path: Path) -> Iterator[Device]:
    yield Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")


def events_of(agent: Agent, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.events if e["event"] == name]  # type: ignore[attr-defined]


def names(client: docker.DockerClient, prefix: str) -> list[str]:
    return sorted(c.name for c in client.containers.list(all=True, filters={"name": prefix})
                  if c.name and c.name.startswith(prefix))


def test_fresh_install_applies_docker_config(device: Device, docker_client: docker.DockerClient) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    device.write_config({
        "ports": {"8080/tcp": device.port},
        "environment": {"GREETING": "hello"},
        "restart_policy": {"Name": "always"},
        "detach": False,
        "name": "ignored",
    })
    agent = device.agent()
    result = agent.check()

    assert result is not None and result.outcome == "updated"
    assert device.serving() == "1.0"
    attrs = docker_client.containers.get(device.name).attrs
    assert "GREETING=hello" in attrs["Config"]["Env"]
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "always"
    assert attrs["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == str(device.port)
    assert [e["event"] for e in agent.events][:2] == ["update_started", "pull_progress"]  # type: ignore[attr-defined]
    status = device.status()
    assert status["running"]["tag"] == "1.0"
    assert status["desired"] == {"tag": "1.0", "source": "file", "group": None, "request_id": None}


def test_tag_change_swaps_and_keeps_previous_image(device: Device, docker_client: docker.DockerClient) -> None:
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    old_image = container_image_id(docker_client, device.name)

    device.write_tag("2.0")
    result = agent.check()

    assert result is not None and result.outcome == "updated"
    assert device.serving() == "2.0"
    assert names(docker_client, device.name) == [device.name]
    docker_client.images.get(old_image)  # kept for rollback
    assert agent.state.previous is not None and agent.state.previous.image_id == old_image
    assert agent.state.applied is not None and agent.state.applied.tag == "2.0"


def test_missing_tag_falls_back_then_moves_when_pushed(device: Device) -> None:
    publish(device.repo, "latest", "latest")
    device.write_tag("does-not-exist")
    agent = device.agent()

    agent.check()
    assert device.serving() == "latest"
    fallback = device.status()["fallback"]
    assert fallback["active"] is True
    assert fallback["requested_tag"] == "does-not-exist"
    assert "not found" in fallback["reason"]
    assert len(events_of(agent, "fallback")) == 1

    agent.check()  # retried, still missing: no second event, nothing recreated
    assert len(events_of(agent, "fallback")) == 1
    assert len(events_of(agent, "update_started")) == 1

    publish(device.repo, "does-not-exist", "finally")
    agent.check()
    assert device.serving() == "finally"
    assert device.status()["fallback"]["active"] is False


def test_no_pull_when_unchanged_and_new_digest_is_picked_up(
    device: Device, registry_log: RegistryLog, docker_client: docker.DockerClient
) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    container_id = docker_client.containers.get(device.name).id

    registry_log.sync()
    mark = registry_log.mark()
    result = agent.check()
    registry_log.sync()
    assert result is not None and result.outcome == "unchanged"
    assert registry_log.blob_gets(device.repo, since=mark) == 0
    assert registry_log.manifest_requests(device.repo, "HEAD", since=mark) == 1
    assert registry_log.manifest_requests(device.repo, "GET", since=mark) == 0
    assert docker_client.containers.get(device.name).id == container_id

    publish(device.repo, "1.0", "1.0-rebuilt")
    agent.check()
    assert device.serving() == "1.0-rebuilt"


@pytest.mark.parametrize("bad_kind", ["exits", "unhealthy"])
def test_bad_update_rolls_back_and_is_not_retried(
    device: Device, docker_client: docker.DockerClient, registry_log: RegistryLog, bad_kind: Kind
) -> None:
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0-bad", bad_kind)
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    good_id = docker_client.containers.get(device.name).id

    device.write_tag("2.0")
    result = agent.check()

    assert result is not None and result.outcome == "rolled_back"
    assert docker_client.containers.get(device.name).id == good_id
    assert wait_until(lambda: device.serving() == "1.0", timeout=10, message="1.0 serving again")
    assert names(docker_client, device.name) == [device.name]
    (rolled_back,) = events_of(agent, "rolled_back")
    assert rolled_back["tag"] == "2.0"
    assert rolled_back["reason"]

    registry_log.sync()
    mark = registry_log.mark()
    result = agent.check()
    registry_log.sync()
    assert result is not None and result.outcome == "skipped"
    assert registry_log.blob_gets(device.repo, since=mark) == 0
    assert docker_client.containers.get(device.name).id == good_id
    assert "failed verification" in device.status()["update"]["last_error"]

    publish(device.repo, "2.0", "2.0-fixed")  # a new digest is worth a try
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert device.serving() == "2.0-fixed"


def test_restart_adopts_container(device: Device, docker_client: docker.DockerClient) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    device.agent().check()
    container_id = docker_client.containers.get(device.name).id

    again = device.agent()
    result = again.check()

    assert result is not None and result.outcome == "unchanged"
    assert docker_client.containers.get(device.name).id == container_id
    assert events_of(again, "update_started") == []


def test_changed_docker_config_recreates(device: Device, docker_client: docker.DockerClient) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    device.write_config({"ports": {"8080/tcp": device.port}, "environment": {"NEW": "1"}})
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert "NEW=1" in docker_client.containers.get(device.name).attrs["Config"]["Env"]


def test_stopped_container_is_started_again(device: Device, docker_client: docker.DockerClient) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    docker_client.containers.get(device.name).stop(timeout=1)
    result = agent.check()
    assert result is not None and result.outcome == "started"
    assert wait_until(device.serving, timeout=5, message="app serving") == "1.0"


def test_faults_leave_the_container_alone_and_heal(
    device: Device, docker_client: docker.DockerClient
) -> None:
    publish(device.repo, "1.0", "1.0")
    publish(device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    container_id = docker_client.containers.get(device.name).id

    device.write_config({"ports": "not a mapping"})
    device.write_tag("2.0")
    agent.check()
    assert [e["error"] for e in events_of(agent, "config_error")]
    assert docker_client.containers.get(device.name).id == container_id
    assert device.serving() == "1.0"
    assert device.status()["update"]["status"] == "error"

    device.write_config({"ports": {"8080/tcp": device.port}, "bogus_kwarg": 1})
    agent.check()
    assert "bogus_kwarg" in device.status()["update"]["last_error"]
    assert device.serving() == "1.0"

    device.write_config({"ports": {"8080/tcp": device.port}})
    (device.data_dir / "tag").write_text("../../etc/passwd\n")
    agent.check()
    assert events_of(agent, "tag_rejected")
    assert device.serving() == "1.0"  # the invalid tag file is ignored, nothing moves

    device.write_tag("2.0")
    agent.check()
    assert device.serving() == "2.0"
    assert device.status()["update"]["last_error"] is None


def test_registry_down_keeps_serving_then_recovers(
    private_registry: Any, container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    reg = private_registry()
    dev = Device(repo=reg.repo("app"), name=container_name, data_dir=tmp_path / "data")
    publish(dev.repo, "1.0", "1.0")
    publish(dev.repo, "2.0", "2.0")
    dev.write_tag("1.0")
    agent = dev.agent()
    agent.check()
    container_id = docker_client.containers.get(dev.name).id

    reg.stop()
    dev.write_tag("2.0")
    agent.check()
    status = dev.status()
    assert status["update"]["status"] == "error"
    assert "unreachable" in status["update"]["last_error"]
    assert docker_client.containers.get(dev.name).id == container_id
    assert dev.serving() == "1.0"

    reg.start()
    agent.check()
    assert dev.serving() == "2.0"


def test_private_registry_with_docker_config_credentials(
    private_registry: Any, container_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = private_registry(username="fleet", password="s3cret-pw")
    dev = Device(repo=reg.repo("app"), name=container_name, data_dir=tmp_path / "data")
    build_image(dev.repo, "1.0", "private-1.0")
    push_image(dev.repo, "1.0", auth=reg.auth_config)
    remove_repo_images(dev.repo)
    monkeypatch.setenv("DOCKER_CONFIG", str(reg.docker_config_dir()))
    dev.write_tag("1.0")
    agent = dev.agent()
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert dev.serving() == "private-1.0"


def test_sigterm_stops_fast_and_leaves_the_app_running(
    device: Device, docker_client: docker.DockerClient
) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    proc = device.spawn()
    try:
        wait_until(lambda: device.serving() == "1.0", timeout=30, message="1.0 serving")
        wait_until(lambda: device.status()["update"]["status"] == "idle", timeout=15,
                   message="agent idle")
        started = time.monotonic()
        proc.terminate()
        code = proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert elapsed < 5, f"SIGTERM took {elapsed:.1f} s"
    assert docker_client.containers.get(device.name).status == "running"


def test_keeps_current_and_previous_images_and_prunes_older(
    device: Device, docker_client: docker.DockerClient
) -> None:
    for version in ("1.0", "2.0", "3.0"):
        publish(device.repo, version, version)
    agent = device.agent()
    image_ids = {}
    for version in ("1.0", "2.0", "3.0"):
        device.write_tag(version)
        agent.check()
        image_ids[version] = container_image_id(docker_client, device.name)

    local = {image.id for image in docker_client.images.list(name=device.repo)}
    assert local == {image_ids["2.0"], image_ids["3.0"]}


def test_digest_pin(device: Device, docker_client: docker.DockerClient) -> None:
    digest = publish(device.repo, "1.0", "pinned")
    publish(device.repo, "1.0", "moved-on")  # the tag moves; the pin must not
    device.write_tag(digest)
    agent = device.agent()
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert device.serving() == "pinned"
    assert docker_client.containers.get(device.name).attrs["Config"]["Image"] == f"{device.repo}@{digest}"
    again = agent.check()
    assert again is not None and again.outcome == "unchanged"
