"""The Docker-events watcher: which events matter, and that it follows the real daemon,
ignoring look-alike names and surviving a daemon that cannot be reached."""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any

import docker
import pytest

import edge_agent.agent.watcher as watcher_module
from edge_agent.agent.engine import Engine
from edge_agent.agent.errors import DockerUnavailable
from edge_agent.agent.loop import ContainerEvent, Message
from edge_agent.agent.watcher import RESYNC, ContainerWatcher, container_event
from tests.support import wait_until
from tests.support.containers import TEST_LABEL
from tests.support.images import build_and_push


def event(action: str, name: str = "app", **attributes: str) -> dict[str, Any]:
    return {"Type": "container", "Action": action,
            "Actor": {"ID": "abc123", "Attributes": {"name": name, **attributes}}}


def test_die_and_health_changes_of_the_managed_container_matter() -> None:
    assert container_event(event("die", exitCode="137"), "app") == ContainerEvent(
        "die", {"name": "app", "exitCode": "137", "id": "abc123"})
    health = container_event(event("health_status: unhealthy"), "app")
    assert health is not None and health.action == "health_status"
    assert health.attributes["health_status"] == "unhealthy"


@pytest.mark.parametrize("raw", [
    event("die", name="app-previous"),  # Docker's filter matches name prefixes
    event("die", name="app-next"),
    event("exec_start: /bin/busybox wget -q"),  # every HEALTHCHECK run
    event("exec_die"),
    {"Type": "image", "Action": "pull", "Actor": {"Attributes": {"name": "app"}}},
    {"Type": "container", "Action": "die"},
    {"Type": "container", "Action": "die", "Actor": "junk"},
    {},
])
def test_other_events_are_ignored(raw: dict[str, Any]) -> None:
    assert container_event(raw, "app") is None


def test_follows_the_real_daemon_after_it_was_unreachable(
    docker_client: docker.DockerClient, unique_repo: str, container_name: str, test_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build_and_push(unique_repo, "1.0", "1.0")
    monkeypatch.setattr(watcher_module, "RETRY_BASE_S", 0.05)
    attempts: list[int] = []

    def flaky_connect() -> Engine:
        # The first two connections fail as they do while the daemon restarts.
        attempts.append(1)
        if len(attempts) <= 2:
            raise DockerUnavailable("connect to Docker: Docker daemon unreachable")
        return Engine.connect()

    inbox: queue.Queue[Message] = queue.Queue()
    following = ContainerWatcher(container_name, inbox, connect_engine=flaky_connect)
    following.start()
    try:
        first = wait_until(lambda: inbox.get(timeout=0.1) if len(attempts) >= 3 else None,
                           timeout=20, message="the resync after reconnecting")
        assert first == ContainerEvent(RESYNC)
        labels = {TEST_LABEL: test_id}
        look_alike = docker_client.containers.run(f"{unique_repo}:1.0", detach=True,
                                                  name=f"{container_name}-previous",
                                                  labels=labels)
        managed = docker_client.containers.run(f"{unique_repo}:1.0", detach=True,
                                               name=container_name, labels=labels)
        managed.kill()
        look_alike.kill()
        seen: list[ContainerEvent] = []

        def died() -> bool:
            while not inbox.empty():
                message = inbox.get_nowait()
                assert isinstance(message, ContainerEvent)
                seen.append(message)
            return any(m.action == "die" for m in seen)

        wait_until(died, timeout=20, message="the die event")
        assert all(m.attributes.get("id") == managed.id for m in seen), seen
        die = next(m for m in seen if m.action == "die")
        assert die.attributes["exitCode"] == "137"
        assert following.alive
    finally:
        following.stop()


def test_stop_ends_a_watcher_that_never_reached_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watcher_module, "RETRY_BASE_S", 0.05)

    def unreachable() -> Engine:
        raise DockerUnavailable("connect to Docker: Docker daemon unreachable")

    inbox: queue.Queue[Message] = queue.Queue()
    stuck: Callable[[], Engine] = unreachable
    following = ContainerWatcher("app", inbox, connect_engine=stuck)
    following.start()
    following.stop(timeout_s=5)
    assert not following.alive
    assert inbox.empty()
