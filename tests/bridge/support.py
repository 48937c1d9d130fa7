"""Helpers for the bridge's tests and bench: an in-process bridge on the real broker,
simulated devices, and real agents as subprocesses.

``SimulatedDevices`` is one MQTT client that plays many devices: it publishes their
retained ``state``/``availability`` (documents built by the agent's own ``Status``)
and answers desired-tag messages at once, as an agent that had nothing to pull would.
It logs in as an operator whose ACL section also lets it write device telemetry.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import jsonschema  # type: ignore[import-untyped]  # ships no type hints
import requests
from paho.mqtt.client import Client, MQTTMessage

from edge_agent.agent.reconcile import Desired
from edge_agent.agent.status import RunningView, Status
from edge_agent.bridge.api import openapi_document
from edge_agent.bridge.server import Bridge, ServerLimits
from edge_agent.bridge.settings import NO_REGISTRY_CHECK, BridgeSettings
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.mqtt import connect_client, disconnect_client
from edge_agent.protocol.state import Source
from edge_agent.protocol.tags import parse_tag_payload
from edge_agent.protocol.topics import Topics
from edge_agent.registry_probe import ProbeSettings
from tests.support import DEFAULT_REGISTRY, REPO_ROOT, free_port, wait_until
from tests.support.broker import Broker
from tests.support.containers import remove_test_containers
from tests.support.images import Kind, build_and_push, remove_repo_images

TOKEN = "test-token-" + "x" * 20
SIMULATOR_ACL = (
    "topic write +/devices/+/state\n"
    "topic write +/devices/+/availability\n"
    "topic write +/devices/+/events\n"
)


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def add_simulator_user(broker: Broker, name: str = "simulator") -> str:
    """An operator that may also write device telemetry (test-only ACL lines)."""
    broker.add_operator(name)
    acl = broker.config_dir / "acl"
    text = acl.read_text()
    marker = f"# <<< user {name}\n"
    acl.write_text(text.replace(marker, SIMULATOR_ACL + marker))
    broker.reload()
    return name


@contextmanager
def running_bridge(broker: Broker, prefix: str, *, user: str = "bridge",  # noqa: PLR0913
                   max_wait_s: float = 120.0, token: str = TOKEN,
                   limits: ServerLimits | None = None,
                   data_dir: Path | None = None,
                   registry: ProbeSettings = NO_REGISTRY_CHECK) -> Iterator[Bridge]:
    """An in-process bridge on a free port, connected to ``broker`` as ``user``; the
    HTTP server's ``limits`` are the shipped ones unless given; rollouts on with a
    ``data_dir``; no registry check
    before a desired tag is published unless ``registry`` asks for one."""
    settings = BridgeSettings(token=token, host="127.0.0.1", port=0, max_wait_s=max_wait_s,
                              mqtt=broker.settings(user, prefix=prefix), log_level="INFO",
                              log_format="text", data_dir=data_dir,
                              registry=registry)
    bridge = Bridge(settings, limits)
    bridge.start()
    try:
        wait_until(lambda: bridge.link.connected, timeout=10, message="bridge connected")
        yield bridge
    finally:
        bridge.stop()


class ApiClient(requests.Session):
    """requests.Session with the base URL and the bearer token."""

    def __init__(self, base: str, token: str = TOKEN) -> None:
        super().__init__()
        self.base = base
        self.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str | bytes, url: str | bytes, *args: Any,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 150)
        return super().request(method, f"{self.base}{url!s}", *args, **kwargs)


def state_document(device_id: str, tag: str, request_id: str | None = None,
                   source: Source = Source.DEVICE) -> dict[str, Any]:
    """What an agent publishes when it runs ``tag`` and is idle (the agent's own code)."""
    status = Status(device_id=device_id, image="127.0.0.1:5000/sim/app")
    status.desired = Desired(tag, source, request_id)
    status.running = RunningView(tag=tag, digest="sha256:" + "0" * 64,
                                 container_id=uuid.uuid4().hex, status="running",
                                 health="healthy", started_at="2024-01-01T00:00:00Z")
    status.latest_version = tag
    return status.document()


class SimulatedDevices:
    """Many devices on one MQTT connection; answers desired tags at once."""

    def __init__(self, broker: Broker, prefix: str, user: str = "simulator",
                 *, answer_any: bool = False) -> None:
        self.topics = Topics(prefix)
        self.settings = broker.settings(user, prefix=prefix)
        self.answer_any = answer_any
        self.devices: dict[str, str] = {}  # id -> running tag
        self._lock = threading.Lock()
        self._client: Client | None = None

    def start(self) -> SimulatedDevices:
        ready = threading.Event()
        self._client = connect_client(
            self.settings, f"sim-{uuid.uuid4().hex[:8]}",
            subscriptions=[self.topics.device_tag("+")], on_message=self._on_message,
            on_subscribed=lambda _c: ready.set())
        if not ready.wait(10):
            raise TimeoutError("simulator: no SUBACK")
        return self

    def add(self, device_ids: Iterable[str], tag: str = "1.0") -> None:
        for device_id in device_ids:
            with self._lock:
                self.devices[device_id] = tag
            self._publish(self.topics.availability(device_id), b"online")
            self._publish(self.topics.state(device_id),
                          json.dumps(state_document(device_id, tag)).encode())

    def _publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def _on_message(self, client: Client, message: MQTTMessage) -> None:
        device_id = self.topics.device_of(message.topic)
        if device_id is None or not message.payload:
            return
        with self._lock:
            known = device_id in self.devices
        if not (known or self.answer_any):
            return
        try:
            desired = parse_tag_payload(bytes(message.payload))
        except TagError:
            return
        if desired.tag is None:
            return
        with self._lock:
            self.devices[device_id] = desired.tag
        document = state_document(device_id, desired.tag, desired.request_id)
        client.publish(self.topics.state(device_id), json.dumps(document), qos=1, retain=True)

    def close(self) -> None:
        if self._client is not None:
            disconnect_client(self._client)
            self._client = None


@dataclass
class AgentProcess:
    """A real agent (``python -m edge_agent``) with its own container and port."""

    device_id: str
    repo: str
    data_dir: Path
    app_port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def serving(self) -> str | None:
        try:
            response = requests.get(f"http://127.0.0.1:{self.app_port}/version", timeout=1)
        except requests.RequestException:
            return None
        return response.text.strip() if response.ok else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def spawn_agent(broker: Broker, prefix: str, device_id: str, repo: str, tag: str,  # noqa: PLR0913, PLR0917
                work_dir: Path, groups: Iterable[str] = (), **extra: str) -> AgentProcess:
    """Register ``device_id`` with the broker (add-device) and start its agent."""
    groups = list(groups)
    broker.add_device(device_id, groups)
    data_dir = work_dir / device_id
    data_dir.mkdir(parents=True, exist_ok=True)
    app_port = free_port()
    (data_dir / "docker_config.json").write_text(
        json.dumps({"ports": {"8080/tcp": app_port}}))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "CONTAINER_IMAGE": f"{repo}:{tag}",
        "CONTAINER_NAME": device_id,
        "DATA_DIR": str(data_dir),
        "DEVICE_ID": device_id,
        "DEVICE_GROUPS": ",".join(groups),
        "POLL_INTERVAL": "10",
        "HEALTH_TIMEOUT": "20",
        "TELEMETRY_INTERVAL": "30",
        "FALLBACK_TAG": "",
        **broker.agent_env(device_id, prefix),
        **extra,
    }
    log_path = work_dir / f"{device_id}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent"], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return AgentProcess(device_id, repo, data_dir, app_port, proc, log_path)


@contextmanager
def agents_behind_a_bridge(broker: Broker, versions: Iterable[str], extra: tuple[str, Kind],
                           group: str) -> Iterator[tuple[Bridge, list[AgentProcess]]]:
    """A bridge of its own on ``broker`` and three real agents at 1.0, each on a
    repository of its own (the first two in ``group``): every repository has a healthy
    image of each of ``versions``, the first also ``extra`` (tag, kind). No image is
    left local, so the agents pull. Everything is removed afterwards."""
    docker_client = docker.from_env(version="auto")
    test_id = uuid.uuid4().hex[:8]
    prefix = unique_prefix()
    repos = [f"{DEFAULT_REGISTRY}/t{test_id}/app{i}" for i in range(3)]
    for repo in repos:
        for version in versions:
            build_and_push(repo, version, version, "healthy")
    build_and_push(repos[0], extra[0], extra[0], extra[1])
    for repo in repos:
        remove_repo_images(repo, client=docker_client)  # the agents must pull
    work = Path(tempfile.mkdtemp(prefix="edge-bridge-agents-"))
    name_prefix = f"edge-test-{test_id}"
    agents: list[AgentProcess] = []
    try:
        with running_bridge(broker, prefix) as bridge:
            for i, repo in enumerate(repos):
                agents.append(spawn_agent(broker, prefix, f"{name_prefix}-d{i}", repo, "1.0",
                                          work, groups=[group] if i < 2 else []))
            yield bridge, agents
    finally:
        clean_up_agents(docker_client, agents, test_id, name_prefix, repos, work)


def clean_up_agents(docker_client: docker.DockerClient, agents: Iterable[AgentProcess],  # noqa: PLR0913, PLR0917 - what the fixture made
                    test_id: str, name_prefix: str, repos: Iterable[str], work: Path) -> None:
    """Stop the agents, remove their containers, the repositories' local images and the
    work directory, and close ``docker_client``."""
    for agent in agents:
        agent.stop()
    remove_test_containers(docker_client, test_id, name_prefix)
    for repo in repos:
        remove_repo_images(repo, client=docker_client)
    docker_client.close()
    shutil.rmtree(work, ignore_errors=True)


# -- what a compromised device may publish ---------------------------------------------
HTML = ('<img src=x onerror="document.title=\'pwned\'">'
        '<script>document.title="pwned"</script>"\'><b>bold</b>')


def hostile_states() -> dict[str, bytes]:
    """Retained state payloads of a compromised device, by a name usable in a device id:
    out-of-range timestamps, deep and huge JSON, wrong types in every field, numbers JSON
    cannot carry, bytes that are not UTF-8, lone surrogates and markup."""
    good = state_document("x", "1.0")
    wrong_types = {
        "device_id": 7, "agent_version": [], "ts": {"a": 1}, "image": None, "desired": "x",
        "running": {"tag": {"x": 1}, "digest": 5, "container_id": [], "status": 3,
                    "health": True, "started_at": 1, "restart_count": "many"},
        "fallback": {"active": "yes", "requested_tag": 1, "reason": []},
        "update": {"status": ["idle"], "progress": "50", "last_check_at": 3,
                   "last_success_at": {}, "last_error": {"a": 1}},
        "installed_version": 2.0, "latest_version": True, "in_progress": "no",
        "update_percentage": "1", "extra": {"nested": [1, 2, 3]},
    }
    markup = json.loads(json.dumps(good).replace('"1.0"', json.dumps(HTML)))
    markup["update"]["status"] = "idle x-evil"
    markup["running"]["health"] = HTML
    markup["running"]["status"] = "running\" onmouseover=\"x"
    markup["update"]["last_error"] = HTML
    markup["device_id"] = HTML
    return {
        "ts-future": json.dumps({**good, "ts": "9999-12-31T23:59:59-23:59"}).encode(),
        "ts-year-one": json.dumps({**good, "ts": "0001-01-01T00:00:00+14:00"}).encode(),
        "ts-naive-max": json.dumps({**good, "ts": "9999-12-31T23:59:59.999999"}).encode(),
        "deep": b'{"desired":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        "huge": json.dumps({**good, "image": "x" * 1_000_000}).encode(),
        "types": json.dumps(wrong_types).encode(),
        "numbers": (b'{"update": {"status": "pulling", "progress": 1e999}, '
                    b'"update_percentage": -1e999, "running": {"restart_count": 1'
                    + b"0" * 4000 + b"}}"),
        "nan": b'{"update": {"status": "pulling", "progress": NaN}, "in_progress": true}',
        "not-utf8": b'{"image": "\xff\xfe\xfd", "ts": "2024-01-01T00:00:00Z"}',
        "surrogates": b'{"image": "\\ud800", "update": {"last_error": "\\udfff x"}}',
        "markup": json.dumps(markup).encode(),
        "not-object": b'["a", 1]',
    }


def hostile_events() -> list[bytes]:
    """Event payloads of a compromised device."""
    return [
        json.dumps({"event": "rolled_back", "ts": "9999-12-31T23:59:59-23:59",
                    "reason": HTML, "request_id": HTML}).encode(),
        json.dumps({"event": {"x": 1}, "ts": 5, "tag": [], "error": {"a": 1}}).encode(),
        json.dumps({"event": HTML, "ts": "0001-01-01T00:00:00+14:00"}).encode(),
        b'{"event": "x", "reason": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"event": "update_failed", "error": "\\ud800", "tag": 1e999}',
        b"\xff\xfe{}",
        json.dumps({"event": "rolled_back", "reason": "r" * 1_000_000}).encode(),
    ]


def strict_json(text: str | bytes) -> Any:
    """JSON as a browser's JSON.parse reads it: NaN and Infinity are errors."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _openapi_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schemas as JSON Schema: ``nullable: true`` becomes a null type."""
    if isinstance(node, list):
        return [_openapi_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        if "$ref" in out:
            out = {"anyOf": [{"$ref": out.pop("$ref")}, {"type": "null"}], **out}
        elif "type" in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
    return out


def schema_validator(name: str) -> Callable[[Any], None]:
    """Raises jsonschema.ValidationError unless a value fits the bridge's own OpenAPI
    schema ``name`` (components/schemas)."""
    schemas = _openapi_to_json_schema(openapi_document(300.0)["components"]["schemas"])
    validator = jsonschema.Draft202012Validator(
        {"components": {"schemas": schemas}, "$ref": f"#/components/schemas/{name}"})
    validate: Callable[[Any], None] = validator.validate
    return validate
