"""Every step of an update failing for real, on a real daemon (issue 9, finding 1).

Faults are real: an image whose ENTRYPOINT does not exist, a published port that a socket
of the test holds, the image removed from the daemon between two steps, and a private
Docker daemon stopped (SIGTERM) at a step of the update. A test-only hook of the updater
(``step_hook``, called at each failpoint) picks the moment; it does not fake anything.

Each test ends with the previous version serving, one container named CONTAINER_NAME
(no ``-next``/``-previous``), nothing pending, and either the failure remembered (the
image or the docker_config.json is at fault: no second pull or create at the next check)
or, when Docker was gone and nothing is known about the image, the update done once the
daemon is back.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from edge_agent.agent.loop import Agent
from edge_agent.agent.updater import Updater
from edge_agent.bridge.fleet import wait_answer
from edge_agent.protocol.answers import judge_event, judge_state
from tests.support import wait_until
from tests.support.device import Device
from tests.support.dockerd import PrivateDockerd
from tests.support.images import Kind, build_and_push, remove_repo_images
from tests.support.registry import PrivateRegistry, RegistryLog
from tests.support.updates import (
    DockerMark,
    TakenPort,
    ask,
    container_names,
    created_since,
)


@pytest.fixture
def device(unique_repo: str, container_name: str, tmp_path: Path) -> Iterator[Device]:
    yield Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")


def publish(client: docker.DockerClient, repo: str, tag: str, version: str,
            kind: Kind = "ok") -> str:
    """Push a test image and forget it locally (built with the shared daemon's client)."""
    digest = build_and_push(repo, tag, version, kind, client=client)
    remove_repo_images(repo, client=client)
    return digest


def events_of(agent: Agent, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.events if e["event"] == name]  # type: ignore[attr-defined]


def updater(agent: Agent) -> Updater:
    return agent._ensure_updater()  # the test hook lives on the agent's own updater


def state_file(device: Device) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((device.data_dir / "state.json").read_text())
    return state


def assert_not_tried_again(agent: Agent, device: Device, client: docker.DockerClient,
                           registry_log: RegistryLog) -> None:
    """The next check skips the failed image: no pull, no container created."""
    started = len(events_of(agent, "update_started"))
    registry_log.sync()
    mark, docker_mark = registry_log.mark(), DockerMark()
    result = agent.check()
    registry_log.sync()
    assert result is not None and result.outcome == "skipped"
    assert registry_log.blob_gets(device.repo, since=mark) == 0
    assert registry_log.manifest_requests(device.repo, "GET", since=mark) == 0
    assert created_since(client, device.name, docker_mark) == []
    assert len(events_of(agent, "update_started")) == started
    assert "failed verification before" in device.status()["update"]["last_error"]


# -- the new container cannot start -----------------------------------------------------
@pytest.mark.parametrize("fault", ["bad_entrypoint", "taken_port"])
def test_a_container_that_cannot_start_is_rolled_back_and_not_retried(
    fault: str, device: Device, docker_client: docker.DockerClient, registry_log: RegistryLog,
) -> None:
    publish(docker_client, device.repo, "1.0", "1.0")
    publish(docker_client, device.repo, "2.0", "2.0",
            "bad_entrypoint" if fault == "bad_entrypoint" else "ok")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    good_id = docker_client.containers.get(device.name).id
    assert device.serving() == "1.0"

    with TakenPort() as taken:
        if fault == "taken_port":
            device.write_config({"ports": {"8080/tcp": taken.port}})
        ask(agent, "2.0", "req-1")
        result = agent.check()

        assert result is not None and result.outcome == "rolled_back"
        assert docker_client.containers.get(device.name).id == good_id
        assert device.serving() == "1.0"
        assert container_names(docker_client, device.name) == [device.name]
        (event,) = events_of(agent, "rolled_back")
        assert event["request_id"] == "req-1" and event["tag"] == "2.0"
        assert event["restored"] is True
        expected = "no such file" if fault == "bad_entrypoint" else "already"
        assert "did not start" in event["reason"] and expected in event["reason"], event
        assert events_of(agent, "update_failed") == []
        # the request is answered, for the bridge's ?wait and edge-ctl --wait alike
        answer = judge_event(event, "req-1", "2.0")
        assert answer is not None and answer.outcome == "rolled_back" and not answer.ok
        state = wait_answer(judge_state(device.status(), "req-1", "2.0"))
        assert state is not None and not state.ok and "rolled back" in state.reason
        saved = state_file(device)
        assert saved["pending"] is None
        (failed,) = saved["failed"]
        assert failed["desired"] == "2.0" and failed["config"]

        assert_not_tried_again(agent, device, docker_client, registry_log)
        assert device.serving() == "1.0"

    if fault == "taken_port":
        # the port is free now, but this image with this docker_config.json failed:
        # only a change of digest, desired tag or docker_config.json is worth a new try
        assert_not_tried_again(agent, device, docker_client, registry_log)
        device.write_config({"ports": {"8080/tcp": device.port}, "environment": {"A": "1"}})
    else:
        publish(docker_client, device.repo, "2.0", "2.0-fixed")
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert device.serving() == ("2.0" if fault == "taken_port" else "2.0-fixed")
    assert container_names(docker_client, device.name) == [device.name]


@pytest.mark.parametrize("fault", ["bad_entrypoint", "taken_port"])
def test_a_first_install_that_cannot_start_is_started_again_until_it_can(  # noqa: PLR0913, PLR0917
    fault: str, unique_repo: str, container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient, registry_log: RegistryLog,
) -> None:
    """Nothing to go back to: the container stays in place and each check starts it
    again (no pull, no new container, the error reported once); once its port is free,
    the app comes up by itself."""
    with TakenPort() as taken:
        device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
        if fault == "taken_port":  # publish the port that the socket holds
            device = Device(repo=unique_repo, name=container_name,
                            data_dir=tmp_path / "data", port=taken.port)
        publish(docker_client, device.repo, "1.0", "1.0",
                "bad_entrypoint" if fault == "bad_entrypoint" else "ok")
        device.write_tag("1.0")
        agent = device.agent()
        assert agent.check() is None
        (failed,) = events_of(agent, "update_failed")
        assert ("no such file" if fault == "bad_entrypoint" else "already") in failed["error"]
        created = docker_client.containers.get(device.name)
        assert created.status == "created"
        assert container_names(docker_client, device.name) == [device.name]
        assert state_file(device)["pending"] is None

        registry_log.sync()
        mark, docker_mark = registry_log.mark(), DockerMark()
        for _ in range(2):
            assert agent.check() is None
        registry_log.sync()
        assert registry_log.blob_gets(device.repo, since=mark) == 0
        assert created_since(docker_client, device.name, docker_mark) == []
        assert len(events_of(agent, "update_started")) == 1
        assert len(events_of(agent, "update_failed")) == 1  # the same error, reported once
        assert len(events_of(agent, "container_exited")) == 1  # "starting it", once
        assert docker_client.containers.get(device.name).id == created.id

    result = agent.check()  # the port is free now
    if fault == "bad_entrypoint":
        assert result is None
        assert docker_client.containers.get(device.name).status == "created"
    else:
        assert result is not None and result.outcome == "started"
        assert wait_until(lambda: device.serving() == "1.0", timeout=10,
                          message="1.0 serving")
    assert container_names(docker_client, device.name) == [device.name]


def test_a_rollback_to_a_container_that_cannot_start_does_not_block_later_updates(
    device: Device, docker_client: docker.DockerClient,
) -> None:
    """The container to go back to cannot start either (a first install kept in place):
    the rollback goes as far as it can, the failure is remembered, and the next image
    that works is installed; recovery does not fail at every check."""
    publish(docker_client, device.repo, "1.0", "1.0-bad", "bad_entrypoint")
    publish(docker_client, device.repo, "2.0", "2.0-bad", "bad_entrypoint")
    device.write_tag("1.0")
    agent = device.agent()
    assert agent.check() is None  # kept in place, created

    device.write_tag("2.0")
    result = agent.check()
    assert result is not None and result.outcome == "rolled_back"
    (event,) = events_of(agent, "rolled_back")
    assert event["restored"] is False
    assert state_file(device)["pending"] is None
    assert container_names(docker_client, device.name) == [device.name]
    result = agent.check()
    assert result is not None and result.outcome == "skipped"

    publish(docker_client, device.repo, "2.0", "2.0-fixed")
    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert device.serving() == "2.0-fixed"
    assert container_names(docker_client, device.name) == [device.name]


def test_a_failed_start_after_a_config_change_keeps_the_old_config_serving(
    device: Device, docker_client: docker.DockerClient, registry_log: RegistryLog,
) -> None:
    """Same image, new docker_config.json whose port is taken: the old container (old
    config) serves again and the combination is not retried; the tag is not to blame."""
    publish(docker_client, device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    good_id = docker_client.containers.get(device.name).id
    with TakenPort() as taken:
        device.write_config({"ports": {"8080/tcp": taken.port}})
        result = agent.check()
        assert result is not None and result.outcome == "rolled_back"
        assert docker_client.containers.get(device.name).id == good_id
        assert device.serving() == "1.0"
        assert_not_tried_again(agent, device, docker_client, registry_log)
    device.write_config({"ports": {"8080/tcp": device.port}})  # back to what runs
    result = agent.check()
    assert result is not None and result.outcome == "unchanged"
    assert docker_client.containers.get(device.name).id == good_id


def test_a_failed_image_is_not_tried_again_while_the_registry_is_away(
    private_registry: Callable[..., PrivateRegistry], container_name: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    """With the registry away the agent decides by the local image: the image that just
    failed to start must still count as failed, not be tried at every check."""
    reg = private_registry()
    dev = Device(repo=reg.repo("app"), name=container_name, data_dir=tmp_path / "data")
    publish(docker_client, dev.repo, "1.0", "1.0")
    publish(docker_client, dev.repo, "2.0", "2.0", "bad_entrypoint")
    dev.write_tag("1.0")
    agent = dev.agent()
    agent.check()
    dev.write_tag("2.0")
    result = agent.check()
    assert result is not None and result.outcome == "rolled_back"

    reg.stop()
    mark = DockerMark()
    result = agent.check()
    assert result is not None and result.outcome == "skipped", result
    # that check also pruned the failed image: now there is nothing to decide with
    assert agent.check() is None
    assert "registry unreachable" in dev.status()["update"]["last_error"]
    assert created_since(docker_client, dev.name, mark) == []
    assert dev.serving() == "1.0"
    assert container_names(docker_client, dev.name) == [dev.name]


# -- the image goes away mid-update -------------------------------------------------------
def remove_image_at(agent: Agent, step: str, client: docker.DockerClient,
                    reference: str) -> list[str]:
    """At ``step`` of the update, remove the image ``reference`` (``repo:tag``): every
    reference of its repository to it. Test images of the same content share an id across
    tests, so the id itself may stay, used elsewhere; for the agent the image is gone."""
    done: list[str] = []
    repo = reference.rsplit(":", 1)[0]

    def hook(at: str) -> None:
        if at == step and not done:
            image = client.images.get(reference)
            refs = [*image.tags, *image.attrs.get("RepoDigests", [])]
            for ref in refs:
                if ref.startswith((f"{repo}:", f"{repo}@")):
                    with contextlib.suppress(docker.errors.ImageNotFound):  # gone with the tag
                        client.images.remove(ref, force=True)
            done.append(at)
    updater(agent).step_hook = hook
    return done


def test_image_removed_between_pull_and_create_keeps_the_old_container_serving(
    device: Device, docker_client: docker.DockerClient,
) -> None:
    """Before the old container is stopped: Docker refuses the create, the old container
    never stops, nothing is left behind, and the next check pulls again."""
    publish(docker_client, device.repo, "1.0", "1.0")
    publish(docker_client, device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    good_id = docker_client.containers.get(device.name).id

    device.write_tag("2.0")
    done = remove_image_at(agent, "pulled", docker_client, f"{device.repo}:2.0")
    result = agent.check()
    assert done == ["pulled"]
    assert result is None  # the check failed and says so
    assert events_of(agent, "config_error") or events_of(agent, "update_failed")
    assert docker_client.containers.get(device.name).id == good_id
    assert docker_client.containers.get(device.name).status == "running"
    assert device.serving() == "1.0"
    assert container_names(docker_client, device.name) == [device.name]
    assert state_file(device)["pending"] is None
    assert state_file(device)["failed"] == []

    result = agent.check()
    assert result is not None and result.outcome == "updated"
    assert device.serving() == "2.0"
    assert container_names(docker_client, device.name) == [device.name]


def test_image_removed_between_create_and_start_does_not_matter(
    device: Device, docker_client: docker.DockerClient,
) -> None:
    """Once created, a container keeps its image's layers: Docker starts it anyway."""
    publish(docker_client, device.repo, "1.0", "1.0")
    publish(docker_client, device.repo, "2.0", "2.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    device.write_tag("2.0")
    done = remove_image_at(agent, "stopped", docker_client, f"{device.repo}:2.0")
    result = agent.check()
    assert done == ["stopped"]
    assert result is not None and result.outcome == "updated"
    assert device.serving() == "2.0"
    assert container_names(docker_client, device.name) == [device.name]


# -- the daemon goes away mid-update --------------------------------------------------------
DAEMON_STEPS = ["created", "renamed_old", "renamed_new", "stopped", "started", "verified"]
# steps after which the journal says the old container may be stopped (the stop is the
# next call): such a broken-off update counts towards the limit of attempts without a
# verdict
OLD_STOPPED = {"renamed_new", "stopped", "started", "verified"}


@pytest.fixture(scope="module")
def dockerd() -> Iterator[PrivateDockerd]:
    with PrivateDockerd() as daemon:
        yield daemon


@pytest.mark.parametrize("step", DAEMON_STEPS)
def test_daemon_stopped_mid_update_is_undone_when_it_is_back(  # noqa: PLR0913, PLR0917
    step: str, dockerd: PrivateDockerd, unique_repo: str, container_name: str,
    tmp_path: Path, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The daemon stops (SIGTERM, as an init system stops it) at ``step``. The check fails
    and says so; once the daemon is back, recovery puts the old version back in service
    with nothing left behind, and the update is done again (nothing is known against the
    image: the daemon went away, the image did not fail)."""
    publish(docker_client, unique_repo, "1.0", "1.0")
    publish(docker_client, unique_repo, "2.0", "2.0")
    dockerd.start()
    monkeypatch.setenv("DOCKER_HOST", dockerd.base_url)  # the agent's daemon
    device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    device.write_config({})  # no published ports on the private daemon: served via exec
    device.write_tag("1.0")
    agent = device.agent()
    try:
        agent.check()
        assert dockerd.serving(device.name) == "1.0"

        device.write_tag("2.0")
        stopped_at: list[str] = []

        def stop_daemon(at: str) -> None:
            if at == step and not stopped_at:
                stopped_at.append(at)
                dockerd.stop()
        updater(agent).step_hook = stop_daemon
        assert agent.check() is None
        assert stopped_at == [step]
        (failed,) = events_of(agent, "update_failed")
        assert "unreachable" in failed["error"], failed
        assert state_file(device)["pending"] is not None  # journalled for recovery

        dockerd.start()
        client = dockerd.client
        assert client is not None
        updater(agent).recover()
        assert wait_until(lambda: dockerd.serving(device.name) == "1.0", timeout=15,
                          message="1.0 serving again")
        assert container_names(client, device.name) == [device.name]
        saved = state_file(device)
        assert saved["pending"] is None and saved["failed"] == []
        assert len(saved["interrupted"]) == (1 if step in OLD_STOPPED else 0)

        result = agent.check()
        assert result is not None and result.outcome == "updated"
        assert dockerd.serving(device.name) == "2.0"
        assert container_names(client, device.name) == [device.name]
        assert state_file(device)["interrupted"] == []
    finally:
        if dockerd.client is not None:
            for container in dockerd.client.containers.list(all=True):
                if (container.name or "").startswith(container_name):
                    container.remove(force=True)
