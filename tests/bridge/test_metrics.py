"""``GET /metrics``: the collector on a Fleet fed synthetic and hostile states (pure), the
route's auth, and a real Prometheus (Debian's package, an instance of the test's own)
scraping a real bridge every second while two real agents update and roll back; then
PromQL through Prometheus' HTTP API, and every expression of the Grafana dashboard.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edge_agent.bridge.api import Api, Request
from edge_agent.bridge.fleet import DeviceSnapshot, Fleet, FleetSnapshot
from edge_agent.bridge.metrics import FleetMetrics
from edge_agent.bridge.server import Bridge
from edge_agent.bridge.settings import BridgeSettings, load_bridge_settings
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.topics import Topics
from tests.bridge.support import (
    TOKEN,
    AgentProcess,
    ApiClient,
    clean_up_agents,
    hostile_events,
    hostile_states,
    spawn_agent,
    state_document,
    unique_prefix,
)
from tests.support import DEFAULT_REGISTRY, REPO_ROOT, free_port, wait_until
from tests.support.broker import Broker, MqttWatcher
from tests.support.images import build_and_push

METRICS_TOKEN = "metrics-token-" + "m" * 20
DASHBOARD = REPO_ROOT / "grafana" / "edge-agent-fleet.json"
# what Grafana puts in place of its interval variables (the panels' step is ~1 m)
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
UPDATE_TIMEOUT_S = 60


# -- the collector, no I/O --------------------------------------------------------------
def scrape(fleet: Fleet, connected: bool = True) -> list[Sample]:
    text = FleetMetrics(fleet, lambda: connected).render().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def of_device(samples: list[Sample], device_id: str) -> list[Sample]:
    return sorted((s for s in samples if s.labels.get("device") == device_id),
                  key=lambda s: (s.name, sorted(s.labels.items())))


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def new_fleet(cls: type[Fleet] = Fleet) -> Fleet:
    return cls(Topics("p"), clock=lambda: 1_700_000_000.0)


def feed_good(fleet: Fleet) -> None:
    for device_id, tag in (("good-1", "1.0"), ("good-2", "2.0")):
        document = state_document(device_id, tag)
        document["update"]["last_check_at"] = "2024-05-01T10:00:00Z"
        document["running"]["restart_count"] = 3
        fleet.handle(f"p/devices/{device_id}/state", json.dumps(document).encode(), True)
        fleet.handle(f"p/devices/{device_id}/availability", b"online", True)
    fleet.handle("p/devices/good-2/availability", b"offline")
    fleet.handle("p/devices/good-1/events", json.dumps(
        {"event": "rolled_back", "ts": "2024-05-01T10:00:00Z", "tag": "9"}).encode())
    fleet.handle("p/devices/good-1/events", json.dumps(
        {"event": "update_succeeded", "ts": "2024-05-01T10:00:00Z", "tag": "1.0"}).encode())


def test_collector_shows_each_device_and_the_fleet() -> None:
    fleet = new_fleet()
    feed_good(fleet)
    samples = scrape(fleet)
    assert value(samples, "edge_agent_devices") == 2
    assert value(samples, "edge_agent_device_online", device="good-1") == 1
    assert value(samples, "edge_agent_device_online", device="good-2") == 0
    info = [s for s in samples if s.name == "edge_agent_device_info"]
    assert {s.labels["device"]: (s.labels["running_tag"], s.labels["desired_tag"],
                                 s.labels["desired_source"]) for s in info} == {
        "good-1": ("1.0", "1.0", "device"), "good-2": ("2.0", "2.0", "device")}
    assert value(samples, "edge_agent_device_update_status", device="good-1",
                 status="idle") == 1
    assert value(samples, "edge_agent_device_update_status", device="good-1",
                 status="pulling") == 0
    assert value(samples, "edge_agent_device_health", device="good-1", health="healthy") == 1
    assert value(samples, "edge_agent_device_fallback_active", device="good-1") == 0
    assert value(samples, "edge_agent_device_restart_count", device="good-1") == 3
    assert value(samples, "edge_agent_device_last_check_timestamp_seconds",
                 device="good-1") == 1714557600
    assert value(samples, "edge_agent_rollbacks_total") == 1
    assert value(samples, "edge_agent_events_total", event="rolled_back") == 1
    assert value(samples, "edge_agent_events_total", event="update_succeeded") == 1
    assert value(samples, "edge_agent_events_total", event="update_failed") == 0
    assert value(samples, "edge_agent_bridge_broker_connected") == 1
    assert value(scrape(fleet, connected=False), "edge_agent_bridge_broker_connected") == 0


def test_hostile_devices_do_not_break_metrics_or_other_devices_series() -> None:
    """Acceptance 3: junk, huge, deep, wrongly typed and markup states and events from
    other devices leave the good devices' series exactly as they were, and the number of
    series of any device is bounded."""
    clean = new_fleet()
    feed_good(clean)
    fleet = new_fleet()
    feed_good(fleet)
    for name, payload in hostile_states().items():
        fleet.handle(f"p/devices/evil-{name}/availability", b"online", True)
        fleet.handle(f"p/devices/evil-{name}/state", payload, True)
        for event in hostile_events():
            fleet.handle(f"p/devices/evil-{name}/events", event)
    # valid but awkward: label text with quotes, backslashes, newlines, non-ASCII
    awkward = state_document("evil-text", "T" * 128)
    awkward["agent_version"] = 'v"1\\\n\u00e9\u4e2d' + "x" * 100
    awkward["running"]["restart_count"] = 2**31 - 1
    awkward["update"]["last_success_at"] = "8999-12-31T23:59:59Z"
    fleet.handle("p/devices/evil-text/state", json.dumps(awkward).encode(), True)

    samples = scrape(fleet)
    for device_id in ("good-1", "good-2"):
        assert of_device(samples, device_id) == of_device(scrape(clean), device_id)
    devices = {s.labels["device"] for s in samples if "device" in s.labels}
    assert {f"evil-{name}" for name in hostile_states()} <= devices
    for device_id in devices:
        assert len(of_device(samples, device_id)) <= 25, device_id
    text_info = [s for s in samples if s.name == "edge_agent_device_info"
                 and s.labels["device"] == "evil-text"]
    assert text_info[0].labels["agent_version"] == awkward["agent_version"][:63] + "…"
    assert text_info[0].labels["running_tag"] == "T" * 128


class UncheckedFleet(Fleet):
    """A fleet whose snapshot carries a state that skipped ``device_data`` (a bug)."""

    def snapshot(self) -> FleetSnapshot:
        real = super().snapshot()
        junk = DeviceSnapshot("junk", {"update": {"status": "idle", "progress": 10**400},
                                       "running": {"restart_count": 10**400}}, "online", None)
        return FleetSnapshot([junk, *real.devices], real.events, real.throttled)


def test_a_device_the_collector_cannot_show_leaves_the_others_whole() -> None:
    fleet = new_fleet(UncheckedFleet)
    feed_good(fleet)
    clean = new_fleet()
    feed_good(clean)
    samples = scrape(fleet)
    for device_id in ("good-1", "good-2"):
        assert of_device(samples, device_id) == of_device(scrape(clean), device_id)


class Offline:
    connected = False

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        raise AssertionError("nothing is published")


def test_metrics_token_opens_metrics_only() -> None:
    api = Api(TOKEN, Topics("p"), Fleet(Topics("p")), Offline(), metrics_token=METRICS_TOKEN)

    def get(target: str, token: str | None) -> int:
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        return api.handle(Request("GET", target, headers)).status

    assert get("/metrics", None) == 401
    assert get("/metrics", "wrong") == 401
    assert get("/metrics", TOKEN) == 200
    assert get("/metrics", METRICS_TOKEN) == 200
    assert get("/%6detrics", METRICS_TOKEN) == 200
    assert get("/api/v1/devices", METRICS_TOKEN) == 401
    assert Api.needs_token("/metrics") and Api.needs_token("/metrics?x")
    without = Api(TOKEN, Topics("p"), Fleet(Topics("p")), Offline())
    assert without.handle(Request("GET", "/metrics", {
        "authorization": f"Bearer {METRICS_TOKEN}"})).status == 401
    response = api.handle(Request("GET", "/metrics", {"authorization": f"Bearer {TOKEN}"}))
    assert response.content_type.startswith("text/plain; version=0.0.4")
    assert b"edge_agent_bridge_broker_connected 0.0" in response.body


# -- a real Prometheus, real agents -----------------------------------------------------
class Prometheus:
    """Debian's prometheus on a free port with its own data dir, scraping ``target``
    every second with the metrics token."""

    def __init__(self, work: Path, target: str, token: str) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: scripts/stack installs Debian's package"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (work / "token").write_text(token)
        (work / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "edge-bridge", "scrape_interval": "1s", "scrape_timeout": "1s",
                "metrics_path": "/metrics",
                "authorization": {"type": "Bearer",
                                  "credentials_file": str(work / "token")},
                "static_configs": [{"targets": [target]}],
            }],
        }))
        self.log_path = work / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={work / 'prometheus.yml'}",
                 f"--storage.tsdb.path={work / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
        try:
            wait_until(self._ready, timeout=30, interval=0.2, message="prometheus ready")
        except TimeoutError:
            self.stop()
            raise AssertionError(self.log_path.read_text(errors="replace")[-3000:]) from None

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series (None while it yields none)."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Stack:
    bridge: Bridge
    api: ApiClient
    prometheus: Prometheus
    updated: AgentProcess  # 1.0 -> 2.0
    rolled_back: AgentProcess  # 1.0 -> bad (exits at once) -> back on 1.0


def installed(api: ApiClient, agent: AgentProcess) -> str | None:
    response = api.get(f"/api/v1/devices/{agent.device_id}")
    state = (response.json().get("state") or {}) if response.status_code == 200 else {}
    if (state.get("update") or {}).get("status") != "idle":
        return None
    tag: str | None = state.get("installed_version")
    return tag


def runs(api: ApiClient, agent: AgentProcess, tag: str) -> bool:
    """The bridge shows the agent idle on ``tag`` and its app answers with it."""
    return installed(api, agent) == tag and agent.serving() == tag


@pytest.fixture(scope="module")
def stack(broker: Broker) -> Iterator[Stack]:
    docker_client = docker.from_env(version="auto")
    test_id = uuid.uuid4().hex[:8]
    prefix = unique_prefix()
    repos = [f"{DEFAULT_REGISTRY}/t{test_id}/metrics{i}" for i in range(2)]
    build_and_push(repos[0], "1.0", "1.0", "healthy")
    build_and_push(repos[0], "2.0", "2.0", "healthy")
    build_and_push(repos[1], "1.0", "1.0", "healthy")
    build_and_push(repos[1], "bad", "bad", "exits")
    work = Path(tempfile.mkdtemp(prefix="edge-metrics-"))
    name_prefix = f"edge-test-{test_id}"
    agents: list[AgentProcess] = []
    settings = BridgeSettings(token=TOKEN, host="127.0.0.1", port=0, max_wait_s=120,
                              mqtt=broker.settings("bridge", prefix=prefix), log_level="INFO",
                              log_format="text", metrics_token=METRICS_TOKEN)
    bridge = Bridge(settings)
    bridge.start()
    prometheus: Prometheus | None = None
    hostile: MqttWatcher | None = None
    try:
        hostile = MqttWatcher(broker.settings("simulator", prefix=prefix), []).start()
        wait_until(lambda: bridge.link.connected, timeout=10, message="bridge connected")
        (work / "prometheus").mkdir()
        prometheus = Prometheus(work / "prometheus", f"127.0.0.1:{bridge.port}", METRICS_TOKEN)
        topics = Topics(prefix)
        # a compromised device beside the real ones (acceptance 3, through Prometheus)
        for name, payload in hostile_states().items():
            if len(payload) < 100_000:
                hostile.publish(topics.availability(f"evil-{name}"), b"online", retain=True)
                hostile.publish(topics.state(f"evil-{name}"), payload, retain=True)
        with ApiClient(bridge.url) as api:
            for i, repo in enumerate(repos):
                agents.append(spawn_agent(broker, prefix, f"{name_prefix}-m{i}", repo, "1.0",
                                          work))
            for agent in agents:
                wait_until(functools.partial(runs, api, agent, "1.0"),
                           timeout=UPDATE_TIMEOUT_S, interval=0.2,
                           message=f"{agent.device_id} on 1.0")
            yield Stack(bridge, api, prometheus, agents[0], agents[1])
    finally:
        if hostile is not None:
            hostile.close()
        if prometheus is not None:
            prometheus.stop()
        bridge.stop()
        clean_up_agents(docker_client, agents, test_id, name_prefix, repos, work)


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard, rows' panels included."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))
    document = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(document["panels"])
            for target in panel.get("targets", [])]


@pytest.mark.broker
@pytest.mark.stack
def test_prometheus_sees_a_real_update_and_rollback_and_every_panel_has_data(
    stack: Stack,
) -> None:
    """Acceptance 2 (and 3 through Prometheus' own parser)."""
    prom, updated, bad = stack.prometheus, stack.updated, stack.rolled_back
    # (each agent's first start counts as an update too)
    succeeded_before = stack.bridge.fleet.snapshot().events["update_succeeded"]
    # Prometheus must hold a sample of the counters from before the update: with only the
    # samples after it, increase() and rate() (the dashboard's panels) have nothing to say
    wait_until(lambda: prom.value("edge_agent_rollbacks_total") == 0, timeout=30,
               interval=0.5, message="a first scrape before the update")
    response = stack.api.put(f"/api/v1/devices/{updated.device_id}/tag?wait=60",
                             json={"tag": "2.0"})
    assert response.status_code == 200, response.text
    response = stack.api.put(f"/api/v1/devices/{bad.device_id}/tag?wait=60",
                             json={"tag": "bad"})
    assert response.status_code == 409 and response.json()["event"] == "rolled_back", \
        response.text
    assert updated.serving() == "2.0" and bad.serving() == "1.0"

    def scraped() -> bool:
        info = prom.query(f'edge_agent_device_info{{device="{updated.device_id}"}}')
        return (bool(info) and info[0]["metric"]["running_tag"] == "2.0"
                and prom.value("edge_agent_rollbacks_total") == 1
                and prom.value('edge_agent_events_total{event="update_succeeded"}')
                == succeeded_before + 1)
    wait_until(scraped, timeout=30, interval=0.5, message="prometheus scraped the update")

    assert prom.value('up{job="edge-bridge"}') == 1
    info = prom.query(f'edge_agent_device_info{{device="{bad.device_id}"}}')
    assert (info[0]["metric"]["running_tag"], info[0]["metric"]["desired_tag"]) == \
        ("1.0", "bad")
    assert prom.value(f'edge_agent_device_online{{device="{updated.device_id}"}}') == 1
    assert prom.value(f'edge_agent_device_update_status{{device="{updated.device_id}",'
                      'status="idle"}') == 1
    assert prom.value(f'edge_agent_device_health{{device="{updated.device_id}",'
                      'health="healthy"}') == 1
    assert (prom.value("increase(edge_agent_rollbacks_total[5m])") or 0) > 0
    assert prom.value("edge_agent_bridge_broker_connected") == 1
    assert prom.value(f'edge_agent_device_last_success_timestamp_seconds{{device='
                      f'"{updated.device_id}"}} > time() - 300') is not None
    # the compromised device's junk is in the registry but breaks no scrape
    assert prom.value('count(edge_agent_device_online{device=~"evil-.*"})') is not None

    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    for expr in expressions:
        query = expr
        for variable, duration in GRAFANA_VARIABLES.items():
            query = query.replace(variable, duration)
        assert "$" not in query, expr
        assert prom.query(query), f"dashboard query returned no data: {expr}"


def test_metrics_token_setting(tmp_path: Path) -> None:
    base = {"MQTT_HOST": "b", "BRIDGE_TOKEN": TOKEN}
    assert load_bridge_settings(base).metrics_token is None
    assert load_bridge_settings({**base, "BRIDGE_METRICS_TOKEN": METRICS_TOKEN}
                                ).metrics_token == METRICS_TOKEN
    path = tmp_path / "token"
    path.write_text(METRICS_TOKEN + "\n")
    assert load_bridge_settings({**base, "BRIDGE_METRICS_TOKEN_FILE": str(path)}
                                ).metrics_token == METRICS_TOKEN
    path.write_text("")
    for env in ({"BRIDGE_METRICS_TOKEN": "  "}, {"BRIDGE_METRICS_TOKEN_FILE": str(path)},
                {"BRIDGE_METRICS_TOKEN": "a b"},
                {"BRIDGE_METRICS_TOKEN": "x", "BRIDGE_METRICS_TOKEN_FILE": str(path)}):
        with pytest.raises(ConfigError, match="BRIDGE_METRICS_TOKEN"):
            load_bridge_settings({**base, **env})
    assert METRICS_TOKEN not in repr(load_bridge_settings(
        {**base, "BRIDGE_METRICS_TOKEN": METRICS_TOKEN}))
