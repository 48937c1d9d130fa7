"""The agent updates itself (issue 16, docs/SELF-UPDATE.md): real agent containers built
from the repository's Dockerfile, the real daemon, registry and broker.

Agent versions are images of one repository tagged 0.1, 0.2, ... that differ only in
EDGE_AGENT_VERSION (and, for the broken ones, their command).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.agent_image import build_agent_image, push_variant
from tests.support.broker import OPERATOR, Broker, MqttWatcher
from tests.support.images import build_and_push, remove_repo_images

pytestmark = pytest.mark.stack

DOCKER_SOCKET = "/var/run/docker.sock"
AGENT_UID = 10001
PREFIX = "su"
TOPICS = Topics(PREFIX)


@pytest.fixture(scope="module")
def agent_repo(docker_client: docker.DockerClient, registry: str) -> Iterator[str]:
    """0.1, 0.2 (good), 0.3 (exits at once), 0.4 (cannot reach the broker), 0.5 (good)."""
    base = build_agent_image(docker_client)
    repo = f"{registry}/selfupdate{uuid.uuid4().hex[:8]}/agent"
    try:
        for version, variant in (("0.1", "ok"), ("0.2", "ok"), ("0.3", "exits"),
                                 ("0.4", "no_broker"), ("0.5", "ok")):
            push_variant(docker_client, base, repo, version, variant)  # type: ignore[arg-type]
        yield repo
    finally:
        remove_repo_images(repo, client=docker_client)
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(base)


class Device:
    """One device: its app, its agent container(s), its DATA_DIR, an MQTT watcher."""

    def __init__(self, client: docker.DockerClient, broker: Broker, name: str, app_repo: str,
                 data: Path) -> None:
        self.client = client
        self.broker = broker
        self.name = name
        self.app_repo = app_repo
        self.agent_name = f"{name}-agent"
        self.data = data
        broker.add_device(name)
        self.watcher = MqttWatcher(broker.settings(OPERATOR),
                                   [TOPICS.state(name), TOPICS.events(name)]).start()

    def run_agent(self, image: str, **env: str) -> Any:
        return self.client.containers.run(  # type: ignore[call-overload]
            image, name=self.agent_name, detach=True,
            environment={"CONTAINER_IMAGE": f"{self.app_repo}:1.0", "CONTAINER_NAME": self.name,
                         "DEVICE_ID": self.name, "TELEMETRY_INTERVAL": "2",
                         "AGENT_UPDATE_TIMEOUT": "25", "POLL_INTERVAL": "5",
                         **self.broker.agent_env(self.name, PREFIX), **env},
            volumes={DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
                     str(self.data): {"bind": "/app/data", "mode": "rw"}},
            group_add=[str(os.stat(DOCKER_SOCKET).st_gid)], network_mode="host",
            restart_policy={"Name": "unless-stopped"}, labels={"io.edge-agent.test.device": self.name})

    def agents(self) -> list[Any]:
        """Every agent container of this device that is running or about to restart."""
        found = self.client.containers.list(
            all=True, filters={"label": f"io.edge-agent.test.device={self.name}"})
        return [c for c in found if c.status in ("running", "restarting", "created")]

    def state(self) -> dict[str, Any]:
        last = self.watcher.last(TOPICS.state(self.name))
        return last.json() if last is not None else {}

    def events(self) -> list[dict[str, Any]]:
        return [m.json() for m in self.watcher.on(TOPICS.events(self.name))]

    def app(self) -> tuple[str, str]:
        app = self.client.containers.get(self.name)
        return str(app.id), str(app.attrs["State"]["StartedAt"])

    def set_agent(self, version: str, request_id: str) -> None:
        self.watcher.publish(TOPICS.device_agent(self.name),
                             json.dumps({"tag": version, "request_id": request_id}), retain=True)

    def phase(self) -> str | None:
        try:
            return str(json.loads((self.data / "handover.json").read_text())["phase"])
        except (OSError, ValueError, KeyError):
            return None

    def logs(self) -> str:
        out = []
        for c in self.client.containers.list(all=True, filters={
                "label": f"io.edge-agent.test.device={self.name}"}):
            out.append(f"--- {c.name} {c.status}\n" + c.logs().decode(errors="replace")[-4000:])
        return "\n".join(out)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.watcher.publish(TOPICS.device_agent(self.name), b"", retain=True)
        self.watcher.close()
        for c in self.client.containers.list(all=True, filters={
                "label": f"io.edge-agent.test.device={self.name}"}):
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)


@pytest.fixture
def device(docker_client: docker.DockerClient, broker: Broker, unique_repo: str,
           container_name: str, tmp_path: Path) -> Iterator[Device]:
    build_and_push(unique_repo, "1.0", f"1.0 {unique_repo}")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, AGENT_UID, AGENT_UID)
    made = Device(docker_client, broker, container_name, unique_repo, data)
    try:
        yield made
    finally:
        made.close()


def _settled(device: Device, version: str, timeout: float = 90, *,
             desired: str | None = None) -> dict[str, Any]:
    """The device runs agent ``version`` with one agent container and the app running
    (and, given ``desired``, shows that desired agent version: a new agent's first state
    may come before the retained one reaches it)."""
    def check() -> dict[str, Any] | None:
        state = device.state()
        agent = state.get("agent") or {}
        if (state.get("agent_version") == version and len(device.agents()) == 1
                and (state.get("running") or {}).get("status") == "running"
                and agent.get("status") in ("idle", "failed")
                and (desired is None or agent.get("desired") == desired)):
            return state
        return None
    try:
        return wait_until(check, timeout=timeout, interval=0.5,
                          message=f"agent {version} settled")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nstate: {device.state()}\n{device.logs()}") from None


def _event(device: Device, name: str, request_id: str, timeout: float = 90) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for event in device.events():
            if event.get("event") == name and event.get("request_id") == request_id:
                return event
        return None
    try:
        return wait_until(find, timeout=timeout, interval=0.5, message=f"event {name}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\nevents: {device.events()}\n{device.logs()}") from None


def test_agent_updates_itself_over_mqtt_and_leaves_the_app_alone(
        device: Device, agent_repo: str) -> None:
    old = device.run_agent(f"{agent_repo}:0.1")
    _settled(device, "0.1")
    app_before = device.app()
    device.set_agent("0.2", "up-0.2")
    _event(device, "agent_update_succeeded", "up-0.2")
    state = _settled(device, "0.2", desired="0.2")
    assert state["agent"]["source"] == "device"
    with pytest.raises(docker.errors.NotFound):
        device.client.containers.get(old.id)
    [new] = device.agents()
    assert new.name == device.agent_name  # took the old one's name
    assert new.attrs["Config"]["Image"] == f"{agent_repo}:0.2"
    assert new.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert device.app() == app_before


@pytest.mark.parametrize(("version", "reason"), [
    ("0.3", "did not prove itself"), ("0.4", "cannot reach the broker")])
def test_a_new_agent_that_fails_to_prove_itself_is_removed_and_not_retried(
        device: Device, agent_repo: str, version: str, reason: str) -> None:
    device.run_agent(f"{agent_repo}:0.2")
    _settled(device, "0.2")
    app_before = device.app()
    device.set_agent(version, f"up-{version}")
    failed = _event(device, "agent_update_failed", f"up-{version}")
    assert reason in failed["reason"], failed
    state = _settled(device, "0.2")
    assert state["agent"]["status"] == "failed"
    assert reason in state["agent"]["last_error"]
    assert device.app() == app_before
    starts = [e for e in device.events() if e.get("event") == "agent_update_started"]
    wait_until(lambda: device.state().get("ts", "") > state["ts"], timeout=10)
    assert len([e for e in device.events() if e.get("event") == "agent_update_started"]) \
        == len(starts) == 1  # not retried


@pytest.mark.parametrize(("phase", "victim"), [
    ("started", "old"), ("released", "old"), ("started", "new"), ("proven", "new")])
def test_kill_9_of_either_agent_during_the_handover_converges(
        device: Device, agent_repo: str, phase: str, victim: str) -> None:
    old = device.run_agent(f"{agent_repo}:0.1")
    _settled(device, "0.1")
    app_before = device.app()
    device.set_agent("0.5", "up-0.5")
    try:
        wait_until(lambda: device.phase() == phase, timeout=60, interval=0.02,
                   message=f"handover phase {phase}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{device.logs()}") from None
    if victim == "old":
        target = device.client.containers.get(old.id)
    else:
        target = device.client.containers.get(f"{device.agent_name}-next")
    pid = target.attrs["State"]["Pid"]
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _settled(device, "0.5", timeout=120)
    assert device.app() == app_before


def test_app_update_and_agent_update_requested_together_do_not_interleave(
        device: Device, agent_repo: str) -> None:
    build_and_push(device.app_repo, "2.0", f"2.0 {device.app_repo}")
    device.run_agent(f"{agent_repo}:0.1")
    _settled(device, "0.1")
    device.watcher.publish(TOPICS.device_tag(device.name),
                           json.dumps({"tag": "2.0", "request_id": "app-2.0"}), retain=True)
    device.set_agent("0.2", "up-0.2")
    _event(device, "agent_update_succeeded", "up-0.2")
    _event(device, "update_succeeded", "app-2.0")
    names = [e["event"] for e in device.events()
             if e.get("request_id") in ("app-2.0", "up-0.2") and e.get("event") in ("update_started", "update_succeeded", "agent_update_started",
                                   "agent_update_succeeded")]
    # one at a time: each update's start is followed by its own end
    assert names in (
        ["update_started", "update_succeeded", "agent_update_started", "agent_update_succeeded"],
        ["agent_update_started", "agent_update_succeeded", "update_started", "update_succeeded"],
    ), names
