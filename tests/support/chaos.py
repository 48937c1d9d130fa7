"""A chaos harness: agents (real processes) receive desired tags over MQTT while the
broker restarts, the registry goes away, agents are SIGKILLed (also at chosen update
steps, ``EDGE_AGENT_TEST_KILL_AT``) and, optionally, a private Docker daemon restarts.
Afterwards ``invariants()`` lists every violation of what the agent promises.

Used at CI size by ``tests/test_chaos.py`` and at soak size by ``bench/bench_soak.py``.

- Each agent has its own repository in a ``PrivateRegistry`` (so "only the current and
  the previous image remain" is a per-repository statement, as on a real device) and all
  versions are pushed to every repository (a fleet tag must exist for everybody).
- Desired tags are retained device or fleet tags; a device tag is sometimes cleared, so
  the fleet tag (or the tag in CONTAINER_IMAGE) wins again. ``expected()`` is the model.
- A supervisor restarts dead agents (as a restart policy would) after every step.
- The broker restarts with SIGTERM (Mosquitto saves its retained messages, as in
  production with ``persistence true``); the operator publishes only while it is up.
"""

from __future__ import annotations

import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from edge_agent.agent.engine import LABEL_DIGEST, LABEL_TAG
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device
from tests.support.dockerd import PrivateDockerd
from tests.support.images import build_and_push, remove_registry_images, repo_image_ids
from tests.support.registry import PrivateRegistry, manifest_digest

__all__ = ["KILL_STEPS", "OPERATOR", "Soak", "SoakAgent"]

OPERATOR = "chaos-operator"
KILL_STEPS = ("pulling", "created", "renamed_old", "renamed_new", "stopped", "started")
ACTIONS = ("broker", "registry", "kill", "kill_at")


@dataclass
class SoakAgent:
    name: str
    repo: str
    device: Device
    process: AgentProcess
    env: dict[str, str]
    kill_at: str | None = None
    restarts: int = 0


@dataclass
class Soak:
    """Agents, their broker and registry, a model of the desired tags, and chaos."""

    broker: Broker
    registry: PrivateRegistry
    workdir: Path
    agents_n: int
    versions: Sequence[str]
    seed: int
    build_client: docker.DockerClient
    dockerd: PrivateDockerd | None = None
    say: Callable[[str], None] = lambda _message: None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.prefix = f"chaos{self.run_id}"
        self.topics = Topics(self.prefix)
        self.agents: list[SoakAgent] = []
        self.fleet_tag: str | None = None
        self.device_tags: dict[str, str | None] = {}
        self.counts: Counter[str] = Counter()
        self.operator: MqttWatcher | None = None
        self._registry_down_for = 0

    # -- setup ------------------------------------------------------------------------
    @property
    def client(self) -> docker.DockerClient:
        """The daemon the agents use (the private one, if any)."""
        if self.dockerd is not None:
            assert self.dockerd.client is not None, "the private dockerd is not running"
            return self.dockerd.client
        return self.build_client

    @property
    def actions(self) -> tuple[str, ...]:
        return (*ACTIONS, "dockerd") if self.dockerd is not None else ACTIONS

    def start(self) -> None:
        self.broker.add_operator(OPERATOR)
        self.operator = MqttWatcher(self.broker.settings(OPERATOR, prefix=self.prefix),
                                    [f"{self.prefix}/#"]).start()
        for i in range(self.agents_n):
            name = f"edge-chaos-{self.run_id}-{i}"
            repo = self.registry.repo(f"{self.prefix}/app{i}")
            for version in self.versions:
                build_and_push(repo, version, version, registry=self.registry.address,
                               client=self.build_client)
            device = Device(repo, name, self.workdir / name)
            if self.dockerd is not None:  # no published ports there: serving() uses exec
                device.write_config({"restart_policy": {"Name": "always"}})
            self.broker.add_device(name)
            env = device.agent_env(**{
                **self.broker.agent_env(name, self.prefix),
                "CONTAINER_IMAGE": f"{repo}:{self.versions[0]}",
                "POLL_INTERVAL": "0.05", "HEALTH_TIMEOUT": "1", "FALLBACK_TAG": "",
                "LOG_LEVEL": "INFO", "TELEMETRY_INTERVAL": "30", **self.extra_env,
            })
            if self.dockerd is not None:
                env["DOCKER_HOST"] = self.dockerd.base_url
            process = AgentProcess(dict(env), self.workdir / f"{name}.log")
            agent = SoakAgent(name, repo, device, process, env)
            self.agents.append(agent)
            self.device_tags[name] = None
        # built in the shared daemon only to be pushed: the agents must pull them
        remove_registry_images(self.registry.address, client=self.build_client)
        for agent in self.agents:
            agent.process.start()

    # -- the model --------------------------------------------------------------------
    def expected(self, agent: SoakAgent) -> str:
        return self.device_tags[agent.name] or self.fleet_tag or self.versions[0]

    # -- steps ------------------------------------------------------------------------
    def change(self) -> str:
        """One random desired-tag change; returns what it did."""
        assert self.operator is not None
        tag = self.rng.choice(self.versions)
        roll = self.rng.random()
        if roll < 0.45:
            self.operator.publish(self.topics.fleet_tag, tag, retain=True)
            self.fleet_tag = tag
            done = f"fleet -> {tag}"
        elif roll < 0.85:
            agent = self.rng.choice(self.agents)
            self.operator.publish(self.topics.device_tag(agent.name), tag, retain=True)
            self.device_tags[agent.name] = tag
            done = f"{agent.name} -> {tag}"
        else:
            agent = self.rng.choice(self.agents)
            self.operator.publish(self.topics.device_tag(agent.name), "", retain=True)
            self.device_tags[agent.name] = None
            done = f"{agent.name} cleared"
        self.counts["changes"] += 1
        if self._registry_down_for:
            self._registry_down_for -= 1
            if not self._registry_down_for:
                self.registry.start()
                self.say("registry back")
        return done

    def chaos(self, action: str) -> None:
        """One fault: broker, registry, kill, kill_at or dockerd."""
        self.counts[action] += 1
        if action == "broker":
            self.broker.stop()
            time.sleep(self.rng.uniform(0.2, 2.0))
            self.broker.start()
            self.wait_operator()
        elif action == "registry":
            if self.registry.running:
                self.registry.stop()
                self._registry_down_for = self.rng.randint(1, 3)  # changes until it is back
        elif action == "kill":
            agent = self.rng.choice(self.agents)
            if agent.process.alive:
                agent.process.kill()
        elif action == "kill_at":
            agent = self.rng.choice(self.agents)
            step = self.rng.choice(KILL_STEPS)
            if agent.process.alive:
                agent.process.kill()
            agent.kill_at = step
            agent.process.env = {**agent.env, "EDGE_AGENT_TEST_KILL_AT": step}
            agent.process.start()
            agent.restarts += 1
        elif action == "dockerd":
            assert self.dockerd is not None
            self.dockerd.stop()
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.dockerd.start()
        else:
            raise ValueError(f"unknown chaos action {action!r}")
        self.say(f"chaos: {action}")

    def supervise(self) -> None:
        """Restart every dead agent, without fault injection (a restart policy)."""
        for agent in self.agents:
            if not agent.process.alive:
                if agent.kill_at is not None:
                    self.counts[f"died_at_{agent.kill_at}"] += 1
                agent.kill_at = None
                agent.process.env = dict(agent.env)
                agent.process.start()
                agent.restarts += 1

    def wait_operator(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.operator and self.operator.client and self.operator.client.is_connected()):
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not reconnect to the broker")
            time.sleep(0.05)

    def run(self, changes: int, *, chaos_probability: float = 0.12,
            schedule: Mapping[int, str] | None = None,
            pause_s: tuple[float, float] = (0.2, 2.5)) -> None:
        """``changes`` tag changes; before each, a fault from ``schedule`` (change index ->
        action) or, without a schedule, one at random with ``chaos_probability``."""
        for i in range(changes):
            if schedule is not None:
                action = schedule.get(i)
            elif self.rng.random() < chaos_probability:
                action = self.rng.choice(self.actions)
            else:
                action = None
            if action is not None:
                self.chaos(action)
            self.supervise()
            done = self.change()
            self.say(f"change {i + 1}/{changes}: {done}")
            time.sleep(self.rng.uniform(*pause_s))
            self.supervise()

    def finish_chaos(self) -> None:
        """Everything back up; agents still armed with a kill step restarted without it."""
        if not self.registry.running:
            self.registry.start()
        self._registry_down_for = 0
        if not self.broker.running:
            self.broker.start()
        if self.dockerd is not None and not self.dockerd.running:
            self.dockerd.start()
        for agent in self.agents:
            if agent.kill_at is not None and agent.process.alive:
                agent.process.kill()
        self.supervise()
        self.wait_operator()

    # -- convergence and invariants --------------------------------------------------
    def state_of(self, agent: SoakAgent) -> dict[str, Any] | None:
        assert self.operator is not None
        last = self.operator.last(self.topics.state(agent.name))
        if last is None:
            return None
        try:
            document: dict[str, Any] = last.json()
        except ValueError:
            return None
        return document

    def settled(self, agent: SoakAgent) -> bool:
        state = self.state_of(agent)
        tag = self.expected(agent)
        return bool(state and state["running"]["tag"] == tag and state["desired"]
                    and state["desired"]["tag"] == tag and state["update"]["status"] == "idle"
                    and state["running"]["status"] == "running")

    def converge(self, timeout: float = 120.0) -> float:
        """Seconds until every agent's state shows its expected tag, settled."""
        start = time.monotonic()
        while not all(self.settled(a) for a in self.agents):
            if time.monotonic() - start > timeout:
                late = {a.name: (self.expected(a), self.state_of(a)) for a in self.agents
                        if not self.settled(a)}
                raise TimeoutError(f"not converged after {timeout} s: {late}")
            self.supervise()
            time.sleep(0.1)
        return time.monotonic() - start

    def broker_desired(self, timeout: float = 5.0) -> dict[str, str]:
        """Each agent's desired tag as the broker holds it (a fresh subscription's retained
        messages), resolved like the agent does: device > fleet > CONTAINER_IMAGE's tag."""
        reader = MqttWatcher(self.broker.settings(OPERATOR, prefix=self.prefix),
                             [self.topics.fleet_tag, f"{self.prefix}/devices/+/tag"]).start()
        try:
            time.sleep(min(timeout, 1.0))  # retained messages follow the SUBACK at once
            fleet = reader.last(self.topics.fleet_tag)
            fleet_tag = fleet.text if fleet is not None and fleet.payload else None
            out = {}
            for agent in self.agents:
                own = reader.last(self.topics.device_tag(agent.name))
                device_tag = own.text if own is not None and own.payload else None
                out[agent.name] = device_tag or fleet_tag or self.versions[0]
            return out
        finally:
            reader.close()

    def serving(self, agent: SoakAgent) -> str | None:
        if self.dockerd is not None:
            return self.dockerd.serving(agent.name)
        return agent.device.serving()

    def invariants(self) -> list[str]:
        """Every broken promise, as text (empty: all hold)."""
        problems: list[str] = []
        on_broker = self.broker_desired()
        client = self.client
        containers = client.containers.list(all=True)
        for agent in self.agents:
            name, tag = agent.name, self.expected(agent)
            where = f"{name} (expected {tag})"
            if on_broker[name] != tag:
                problems.append(f"{where}: the broker holds {on_broker[name]}")
            tag_file = (agent.device.data_dir / "tag").read_text().strip()
            if tag_file != tag:
                problems.append(f"{where}: tag file says {tag_file!r}")
            mine = sorted(c.name or "" for c in containers
                          if c.name == name or (c.name or "").startswith(f"{name}-")
                          or str(c.attrs.get("Config", {}).get("Image", "")).startswith(
                              (f"{agent.repo}:", f"{agent.repo}@")))
            if mine != [name]:
                problems.append(f"{where}: containers {mine}, want exactly [{name}]")
            try:
                app = client.containers.get(name)
            except docker.errors.NotFound:
                problems.append(f"{where}: no container")
                continue
            labels = app.attrs["Config"].get("Labels") or {}
            if app.status != "running":
                problems.append(f"{where}: container is {app.status}")
            if labels.get(LABEL_TAG) != tag:
                problems.append(f"{where}: container runs {labels.get(LABEL_TAG)}")
            digest = manifest_digest(agent.repo, tag, registry=self.registry.address)
            image = client.images.get(str(app.attrs["Image"]))
            digests = {ref.split("@", 1)[1] for ref in image.attrs.get("RepoDigests") or ()}
            if digest != labels.get(LABEL_DIGEST) and digest not in digests:
                problems.append(f"{where}: runs digest {labels.get(LABEL_DIGEST)}, "
                                f"registry has {digest}")
            served = self.serving(agent)
            if served != tag:
                problems.append(f"{where}: serves {served!r}")
            state = json.loads((agent.device.data_dir / "state.json").read_text())
            if state.get("pending") is not None:
                problems.append(f"{where}: an update is still pending: {state['pending']}")
            previous = (state.get("previous") or {}).get("image_id")
            allowed = {str(app.attrs["Image"]), previous}
            extra = repo_image_ids(agent.repo, self.registry.address, client=client) - allowed
            if extra:
                problems.append(f"{where}: images other than current and previous: "
                                f"{sorted(extra)}")
            if not agent.process.alive:
                problems.append(f"{where}: the agent is not running")
        return problems

    def events(self) -> Counter[str]:
        """How many of each event the agents published."""
        assert self.operator is not None
        counted: Counter[str] = Counter()
        for agent in self.agents:
            for message in self.operator.on(self.topics.events(agent.name)):
                try:
                    counted[str(message.json().get("event"))] += 1
                except ValueError:
                    counted["<unreadable>"] += 1
        return counted

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"===== {a.name}\n{a.process.log()[-tail:]}" for a in self.agents)

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Kill the agents, remove their containers and images, close the operator."""
        for agent in self.agents:
            if agent.process.alive:
                agent.process.stop(signal.SIGKILL)
        if self.operator is not None:
            self.operator.close()
            self.operator = None
        clients = [self.build_client]
        if self.dockerd is not None and self.dockerd.client is not None:
            clients.append(self.dockerd.client)
        for client in clients:
            try:
                for container in client.containers.list(all=True):
                    if (container.name or "").startswith(f"edge-chaos-{self.run_id}-"):
                        container.remove(force=True)
                remove_registry_images(self.registry.address, client=client)
            except (docker.errors.DockerException, requests.RequestException):
                continue
