"""A fleet of real agents on one machine.

``AgentFleet``: N agents (``python -m edge_agent``), each logged in to the broker as
its own device user (with its groups), each managing its own busybox container on the
shared daemon; cheap settings (long POLL_INTERVAL, short HEALTH_TIMEOUT, no fallback).
``start_agents``/``stop_agents``: the same agents without the fleet's bookkeeping, for
the benches. Used by the rollout tests (tests/rollout) and benches; the bridge process
they talk to is ``tests.support.bridge_process.BridgeProcess``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import docker

from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.nats_cluster import NatsCluster

BRIDGE_TOKEN = "rollout-test-token-" + "y" * 20  # the bridge the rollout tests start


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
        self.agents = start_agents(
            self.broker, self.prefix, self.names, f"{self.repo}:{tag}", self.directory,
            pause_s=0.0, **{"POLL_INTERVAL": "600", "TELEMETRY_INTERVAL": "120",
                            "DEVICE_GROUPS": ",".join(self.groups), **self.env})
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
        stop_agents(self.agents)
        client = docker.from_env(version="auto")
        try:
            remove_test_containers(client, self.name_prefix, self.name_prefix, self.repo)
        finally:
            client.close()


# Cheap agents: a check only when told (long POLL_INTERVAL), a short "kept running" check.
FLEET_AGENT_ENV = {"POLL_INTERVAL": "30", "HEALTH_TIMEOUT": "2", "FALLBACK_TAG": "",
                   "LOG_LEVEL": "INFO", "TELEMETRY_INTERVAL": "60"}


def start_agents(broker: Broker | NatsCluster, prefix: str, names: Sequence[str], image: str,  # noqa: PLR0913
                 work: Path, *, pause_s: float = 0.1, **extra: str) -> list[AgentProcess]:
    """One agent process per name (each a broker user made with add-device, then its own
    container and DATA_DIR under ``work``), started ``pause_s`` apart, at ``image``."""
    agents = []
    for name in names:
        device = Device(image.rsplit(":", 1)[0], name, work / name)
        device.write_config({})  # no published port: nothing to collide
        env = device.agent_env(**{**broker.agent_env(name, prefix), "CONTAINER_IMAGE": image,
                                  **FLEET_AGENT_ENV, **extra})
        agents.append(AgentProcess(env, work / f"{name}.log").start())
        time.sleep(pause_s)
    return agents


def stop_agents(agents: Sequence[AgentProcess]) -> None:
    """SIGTERM to all at once, then wait for each."""
    for agent in agents:
        if agent.proc is not None and agent.alive:
            agent.proc.send_signal(signal.SIGTERM)
    for agent in agents:
        if agent.alive:
            agent.stop()
