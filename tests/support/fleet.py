"""A fleet of real agents on one machine, and edge-bridge as its own process.

``AgentFleet``: N agents (``python -m edge_agent``), each logged in to the broker as
its own device user (with its groups), each managing its own busybox container on the
shared daemon; cheap settings (long POLL_INTERVAL, short HEALTH_TIMEOUT, no fallback).
``BridgeProcess``: ``python -m edge_agent.bridge.cli`` on a free port, that a test may
SIGKILL and start again on the same ``BRIDGE_DATA_DIR``. Used by the rollout tests
(tests/rollout) and benches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import docker
import requests

from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.nats_cluster import NatsCluster

BRIDGE_TOKEN = "rollout-test-token-" + "y" * 20


def settled_on(state: dict[str, Any] | None, tag: str) -> bool:
    """The agent runs ``tag`` in a running container and is idle."""
    return bool(state and (state.get("running") or {}).get("tag") == tag
                and (state.get("running") or {}).get("status") == "running"
                and (state.get("update") or {}).get("status") == "idle")


class AgentFleet:
    """``count`` agents named ``<name_prefix>-NN`` on ``repo``, starting on ``tag``."""

    def __init__(self, broker: Broker | NatsCluster, prefix: str, repo: str,  # noqa: PLR0913
                 name_prefix: str,
                 directory: Path, *, count: int = 12, groups: Sequence[str] = (),
                 **env: str) -> None:
        self.broker = broker
        self.topics = Topics(prefix)
        self.prefix = prefix
        self.repo = repo
        self.name_prefix = name_prefix
        self.directory = directory
        self.names = [f"{name_prefix}-{i:02d}" for i in range(count)]
        self.groups = tuple(groups)
        self.env = env
        self.agents: list[AgentProcess] = []

    def start(self, tag: str, watcher: MqttWatcher, timeout: float = 240) -> Self:
        for name in self.names:
            self.broker.add_device(name, self.groups)
        for name in self.names:
            device = Device(self.repo, name, self.directory / name)
            device.write_config({})  # no published port: nothing to collide
            env = device.agent_env(**{
                **self.broker.agent_env(name, self.prefix),
                "CONTAINER_IMAGE": f"{self.repo}:{tag}", "POLL_INTERVAL": "600",
                "HEALTH_TIMEOUT": "2", "FALLBACK_TAG": "", "LOG_LEVEL": "INFO",
                "TELEMETRY_INTERVAL": "120", "DEVICE_GROUPS": ",".join(self.groups),
                **self.env,
            })
            self.agents.append(AgentProcess(env, self.directory / f"{name}.log").start())
        wait_until(lambda: all(settled_on(self.state(watcher, n), tag) for n in self.names),
                   timeout=timeout, interval=0.5, message=f"every agent to run {tag}")
        return self

    def state(self, watcher: MqttWatcher, name: str) -> dict[str, Any] | None:
        last = watcher.last(self.topics.state(name))
        if last is None or not last.payload:
            return None
        document: dict[str, Any] = last.json()
        return document

    def logs(self, limit: int = 3) -> str:
        return "\n".join(a.log()[-3000:] for a in self.agents[:limit])

    def close(self) -> None:
        for agent in self.agents:
            if agent.alive and agent.proc is not None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents:
            if agent.alive:
                agent.stop()
        client = docker.from_env(version="auto")
        try:
            remove_test_containers(client, self.name_prefix, self.name_prefix, self.repo)
        finally:
            client.close()


class BridgeProcess:
    """edge-bridge as its own process, its output in a log file."""

    def __init__(self, broker: Broker | NatsCluster, prefix: str, data_dir: Path | None,
                 log_path: Path,
                 user: str = "bridge") -> None:
        settings = broker.settings(user, prefix=prefix)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MQTT_"))},
            "BRIDGE_TOKEN": BRIDGE_TOKEN, "BRIDGE_PORT": "0", "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1", "MQTT_HOST": settings.host,
            "MQTT_PORT": str(settings.port), "MQTT_USERNAME": user,
            "MQTT_PASSWORD": broker.passwords[user], "MQTT_TOPIC_PREFIX": prefix,
        }
        if data_dir is not None:
            self.env["BRIDGE_DATA_DIR"] = str(data_dir)
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {BRIDGE_TOKEN}"

    def start(self) -> Self:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent.bridge.cli"],
                                         env=self.env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                         stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("edge-bridge listening on "):
            raise RuntimeError(f"the bridge did not start: {line!r}\n{self.log()}")
        self.url = line.split()[-1]
        wait_until(lambda: self.get("/healthz").status_code == 200, timeout=15,
                   message="the bridge's broker connection")
        return self

    def wait_devices(self, count: int, timeout: float = 20) -> None:
        """Until the bridge shows ``count`` devices with their groups (retained states
        arrive a moment after it connects)."""
        def known() -> bool:
            devices = self.get("/api/v1/devices").json()["devices"]
            return sum(1 for d in devices if "groups" in (d.get("state") or {})) >= count
        wait_until(known, timeout=timeout, interval=0.2, message=f"{count} devices known")

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: Any = None, data: bytes | None = None) -> requests.Response:
        if data is not None:
            return self.session.post(f"{self.url}{path}", data=data, timeout=30)
        return self.session.post(f"{self.url}{path}", json=body, timeout=30)

    def wait_rollout(self, rollout_id: str, states: Sequence[str], timeout: float
                     ) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            document: dict[str, Any] = self.get(f"/api/v1/rollouts/{rollout_id}").json()
            return document if document.get("state") in states else None
        return wait_until(ended, timeout=timeout, interval=0.5,
                          message=f"rollout {rollout_id} to be {' or '.join(states)}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

