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
- Failed starts: a release whose image cannot start (tag ``bad``, ENTRYPOINT missing) is
  published as the fleet tag or one device's tag, or an agent's docker_config.json moves
  its app to a port a socket holds. Every agent reached must roll back (or skip the image
  it knows failed) and keep its app serving; then the operator takes the change back.
- Hostile clients: junk, huge and deeply nested payloads live on desired-tag topics (an
  operator tool gone wrong), and from a device account on its own state and events
  topics (retained, too) and on topics the ACL does not give it.
- Agents must never crash: any exit but our own SIGKILL is a violation (with its log).
"""

from __future__ import annotations

import functools
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
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import parse_tag_payload
from edge_agent.protocol.topics import Topics
from tests.support import listening_port
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device
from tests.support.dockerd import PrivateDockerd
from tests.support.images import build_and_push, remove_registry_images, repo_image_ids
from tests.support.registry import PrivateRegistry, manifest_digest
from tests.support.updates import TakenPort

__all__ = ["ACTIONS", "BAD_TAG", "KILL_STEPS", "OPERATOR", "Soak", "SoakAgent", "hostile_payloads"]

OPERATOR = "chaos-operator"
KILL_STEPS = ("pulling", "created", "renamed_old", "renamed_new", "stopped", "started",
              "verified")
ACTIONS = ("broker", "registry", "kill", "kill_at", "bad_image", "taken_port", "hostile")
# needs published ports, which the agents on a private dockerd do not have
PORT_ACTIONS = frozenset({"taken_port"})
BAD_TAG = "bad"  # in every repository: an image whose ENTRYPOINT does not exist
ANSWER_TIMEOUT_S = 90.0


def hostile_payloads(rng: random.Random) -> list[tuple[str, bytes]]:
    """(kind, payload) of what a broken or hostile client sends: every kind once. Sizes
    around the agent's 4 KiB limit for desired tags, and far above it."""
    deep = rng.choice([1000, 2000, 5000, 20000])
    return [
        ("deep_array", b'{"tag": ' + b"[" * deep + b"]" * deep + b"}"),
        ("deep_object", b'{"a": ' * deep + b"1" + b"}" * deep),
        ("deep_bare", b"[" * deep),
        ("huge_text", b"v" * rng.choice([64 << 10, 256 << 10, 1 << 20])),
        ("huge_json", b'{"tag": "' + b"a" * (256 << 10) + b'"}'),
        ("binary", b"\x00" + rng.randbytes(rng.randint(64, 4096))),
        ("not_utf8", b"\xff\xfe\xfd" + rng.randbytes(16)),
        ("big_number", b'{"tag": 1' + b"0" * 5000 + b"}"),
        ("nan", b'{"tag": NaN, "request_id": Infinity}'),
        ("wrong_types", b'{"tag": {"x": [1, 2]}, "request_id": ["a"]}'),
        # (bare "42" or "null" would be valid plain-text tags: not junk)
        ("not_an_object", rng.choice([b"[]", b"{}", b'"v1"', b"[1, 2]"])),
        ("escapes", '{"tag": "v1\u001b[2J\u0007", "request_id": "\u202e\u0000"}'.encode()),
        ("bad_tag", rng.choice([b"../../etc/passwd", b"v1 v2", b"-v1", b"a" * 200])),
        ("bad_state", json.dumps({
            "device_id": "x" * 1000, "ts": rng.choice(["9999-12-31T23:59:59-23:59",
                                                       "0001-01-01T00:00:00+14:00", 1e308]),
            "running": {"tag": "\u001b[31mv9\u001b[0m", "status": "<script>"},
            "update": {"status": "</td><td>pwned", "last_error": "e" * 10000},
        }).encode()),
    ]


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
    faults: Sequence[str] | None = None  # the random faults to choose from; None: all
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
        # broken promises seen during the run (a crash, an app down after a failed start)
        self.problems: list[str] = []
        self.hostile_user = f"chaos-hostile-{self.run_id}"

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
        """The faults ``run`` picks from at random."""
        found = ACTIONS if self.dockerd is None else (
            *(a for a in ACTIONS if a not in PORT_ACTIONS), "dockerd")
        return tuple(a for a in found if self.faults is None or a in self.faults)

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
            build_and_push(repo, BAD_TAG, BAD_TAG, "bad_entrypoint",
                           registry=self.registry.address, client=self.build_client)
            # published ports must stay free for the whole soak: not an ephemeral one
            device = Device(repo, name, self.workdir / name, port=listening_port())
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
        self.broker.add_device(self.hostile_user)
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
        """One fault: broker, registry, kill, kill_at, dockerd, bad_image, taken_port or
        hostile."""
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
        elif action == "bad_image":
            self.bad_release()
        elif action == "taken_port":
            self.taken_port()
        elif action == "hostile":
            self.hostile()
        else:
            raise ValueError(f"unknown chaos action {action!r}")
        self.say(f"chaos: {action}")

    def supervise(self) -> None:
        """Restart every dead agent, without fault injection (a restart policy). Any exit
        but the SIGKILL of a fault is a crash: a broken promise."""
        for agent in self.agents:
            if not agent.process.alive:
                code = agent.process.proc.returncode if agent.process.proc else None
                if code != -signal.SIGKILL:
                    self.counts["crashes"] += 1
                    self.problems.append(f"{agent.name} exited with code {code}:\n"
                                         f"{agent.process.log()[-2000:]}")
                if agent.kill_at is not None:
                    self.counts[f"died_at_{agent.kill_at}"] += 1
                agent.kill_at = None
                agent.process.env = dict(agent.env)
                agent.process.start()
                agent.restarts += 1

    # -- failed starts ---------------------------------------------------------------
    def _registry_up(self) -> None:
        """A failed start needs the registry: the agent must get as far as starting."""
        if not self.registry.running:
            self.registry.start()
            self._registry_down_for = 0
            self.say("registry back (for a failed-start fault)")

    def bad_release(self) -> None:
        """The operator publishes a release that cannot start (fleet-wide or to one
        device); every agent it reaches answers (rolled back, or skipped as failed before)
        and keeps serving a good version; then the operator takes it back."""
        assert self.operator is not None
        self._registry_up()
        following_fleet = [a for a in self.agents if self.device_tags[a.name] is None]
        if following_fleet and self.rng.random() < 0.5:
            topic, before = self.topics.fleet_tag, self.fleet_tag
            reached = following_fleet
            self.counts["bad_image_fleet"] += 1
        else:
            agent = self.rng.choice(self.agents)
            topic, before = self.topics.device_tag(agent.name), self.device_tags[agent.name]
            reached = [agent]
        mark = time.monotonic()
        self.operator.publish(topic, BAD_TAG, retain=True)
        for agent in reached:
            if self._wait(functools.partial(self._refused_bad, agent, mark), f"{agent.name}: an "
                          f"answer to the release {BAD_TAG} that cannot start"):
                self.counts["failed_start_answered"] += 1
                self._check_serving(agent, f"after refusing {BAD_TAG}")
        self.operator.publish(topic, before or "", retain=True)

    def _refused_bad(self, agent: SoakAgent, since: float) -> bool:
        assert self.operator is not None
        for message in reversed(self.operator.on(self.topics.state(agent.name))):
            if message.at < since:
                return False
            state = _json(message.payload)
            if (_get(state, "desired", "tag") == BAD_TAG
                    and _get(state, "update", "status") == "idle"):
                return _get(state, "running", "tag") in self.versions
        return False

    def taken_port(self) -> None:
        """docker_config.json moves one agent's app to a port that something else holds:
        the new container cannot start; the old one serves on. Then the file goes back."""
        self._registry_up()
        agent = self.rng.choice(self.agents)
        path = agent.device.data_dir / "docker_config.json"
        original = path.read_text()
        with TakenPort() as taken:
            mark = time.monotonic()
            agent.device.write_config({**json.loads(original),
                                       "ports": {"8080/tcp": taken.port}})
            if self._wait(lambda: self._rolled_back(agent, mark, "already"),
                          f"{agent.name}: a rollback for the taken port {taken.port}"):
                self.counts["failed_start_answered"] += 1
                self._check_serving(agent, f"with port {taken.port} taken")
            path.write_text(original)

    def _rolled_back(self, agent: SoakAgent, since: float, reason: str) -> bool:
        assert self.operator is not None
        for message in self.operator.on(self.topics.events(agent.name)):
            event = _json(message.payload)
            if (message.at >= since and _get(event, "event") == "rolled_back"
                    and reason in str(_get(event, "reason"))):
                return True
        return False

    def _wait(self, done: Callable[[], bool], what: str,
              timeout: float = ANSWER_TIMEOUT_S) -> bool:
        """Until ``done`` (restarting dead agents meanwhile); a timeout is a violation."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                self.problems.append(f"no {what} within {timeout:g} s")
                return False
            self.supervise()
            time.sleep(0.1)
        return True

    def _check_serving(self, agent: SoakAgent, when: str) -> None:
        """The app serves a good version, from exactly one container."""
        served: list[str | None] = []

        def answers() -> bool:
            served.append(self.serving(agent))
            return served[-1] in self.versions
        if not self._wait(answers, f"{agent.name}: a good version served {when}", 20):
            self.problems[-1] += f" (it answers {served[-1]!r})"
        names = sorted(c.name or "" for c in self.client.containers.list(all=True)
                       if c.name == agent.name or (c.name or "").startswith(f"{agent.name}-"))
        if names != [agent.name]:
            self.problems.append(f"{agent.name} {when}: containers {names}")

    # -- hostile clients ------------------------------------------------------------
    def hostile(self) -> None:
        """Junk on every topic a client can reach. As the operator, live (unretained) on
        desired-tag topics: the agents reject it and carry on (a retained one would be
        the desired state). As a device account: on its own state and events topics,
        retained or not, and on desired-tag topics the ACL does not give it."""
        assert self.operator is not None
        payloads = hostile_payloads(self.rng)
        device = MqttWatcher(self.broker.settings(self.hostile_user, prefix=self.prefix),
                             []).start()
        try:
            for kind, payload in payloads:
                target = self.rng.choice(self.agents)
                own = self.rng.choice([self.topics.state(self.hostile_user),
                                       self.topics.events(self.hostile_user)])
                not_ours = self.rng.choice([self.topics.fleet_tag,
                                            self.topics.device_tag(target.name),
                                            self.topics.state(target.name)])
                sent = 0
                if is_junk(payload):
                    sent += _publish(self.operator, self.rng.choice(
                        [self.topics.fleet_tag, self.topics.device_tag(target.name)]), payload)
                sent += _publish(device, own, payload, retain=self.rng.random() < 0.5)
                sent += _publish(device, not_ours, payload, retain=True)
                self.counts[f"hostile_{kind}"] += 1
                self.counts["hostile_messages"] += sent
        finally:
            device.close()

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
        document = _json(last.payload) if last is not None else None
        return document if isinstance(document, dict) else None

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
        """Every broken promise, as text (empty: all hold), those seen during the run
        included."""
        self.supervise()  # a crash since the last look is a problem too
        problems: list[str] = list(self.problems)
        on_broker = self.broker_desired()
        client = self.client
        containers = client.containers.list(all=True)
        for agent in self.agents:
            name, tag = agent.name, self.expected(agent)
            where = f"{name} (expected {tag})"
            if on_broker[name] != tag:
                problems.append(f"{where}: the broker holds {on_broker[name]}")
            path = agent.device.data_dir / "tag"
            tag_file = path.read_text().strip() if path.exists() else None
            from_mqtt = self.device_tags[name] is not None or self.fleet_tag is not None
            # no MQTT tag ever: CONTAINER_IMAGE's tag rules, and nothing is written
            if tag_file != tag and (tag_file is not None or from_mqtt):
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
                event = _get(_json(message.payload), "event")
                counted[str(event) if event is not None else "<unreadable>"] += 1
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


def _json(payload: bytes) -> Any:
    """A payload as JSON, or None (hostile clients share the topics we read)."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None


def _get(document: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def is_junk(payload: bytes) -> bool:
    """Whether the agent's parser refuses ``payload`` as a desired tag. Anything it would
    accept is a desired-state change, not a fault: never sent live by the hostile fault."""
    try:
        parse_tag_payload(payload)
    except (TagError, ValueError, RecursionError):
        return True
    return False


def _publish(client: MqttWatcher, topic: str, payload: bytes, *, retain: bool = False) -> int:
    """Publish and count it; a broker that refuses (size limit: it may disconnect the
    client) is a fine answer to a hostile client."""
    try:
        client.publish(topic, payload, retain=retain)
    except (RuntimeError, ValueError, OSError):
        return 0
    return 1
