"""Wire cost of one idle agent per day at default settings, counted at the packet level
(IP, TCP and TLS included), MQTT and registry apart.

A real agent process talks MQTT over TLS to its own Mosquitto (the shipped config's TLS
listener, a throwaway CA) and checks its own registry (docker-registry on a port of its
own); an nftables table counts the IP bytes and packets of each port in each direction
on this host (``up``: device to server, ``down``: server to device). Nothing else uses
those ports: the bench's MQTT watcher reads the plaintext listener.

Each periodic item is measured on its own and a day is extrapolated from the default
intervals (the defaults are read from the agent's settings table):

- connect: agent start until its first state (TLS handshake, subscriptions, retained
  replay, the first check's publishes); once per connection, not per day;
- idle window: ``--window`` seconds at all defaults, extrapolated to a day (exact only
  when the window spans every MQTT period, as it does for the 60 s / 30 s defaults
  before issue 13; after it the periods are longer and the per-item figures count);
- one state publish: an agent at TELEMETRY_INTERVAL=HEARTBEAT_INTERVAL=1 s, bytes over
  the number of states its broker delivered;
- one keepalive ping: an agent with nothing to publish at MQTT_KEEPALIVE=5 (an older
  agent keeps its fixed 30 s), bytes over PINGRESPs (the only packets coming down);
- one registry check: the agent's own RegistryClient, a new connection per check (after
  30 idle minutes no server or NAT keeps it), over plain HTTP and over HTTPS (TLS 1.3).

Per day: states = 86400 / state period (TELEMETRY_INTERVAL before issue 13; after it,
the shorter of POLL_INTERVAL, whose checks change ``last_check_at``, and
HEARTBEAT_INTERVAL); pings = states x (ceil(state period / keepalive) - 1) (paho pings
only when nothing was sent for a keepalive); checks = 86400 / POLL_INTERVAL, each over
HTTPS as a real registry is reached.

Loopback's 64 KiB MTU lets a TLS handshake's certificate flight go as one packet; on a
1500-byte link it takes one or two more (52 bytes of headers each): noted, not added.

Needs root, nft and the stack (scripts/stack). Writes bench/results/wire.json.
Run: python -m bench.bench_wire [--window 130]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

from bench.common import table, wait_for, write_results
from edge_agent.agent import config as agent_config
from edge_agent.agent.registry import RegistryClient, RepositoryLocation
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.images import build_and_push, remove_repo_images
from tests.support.registry import PrivateRegistry

DAY_S = 86400.0
OPERATOR = "operator"
Counts = dict[str, dict[str, list[int]]]  # label -> up/down -> [packets, bytes]


class PortCounters:
    """An nftables table of its own counting each port's packets both ways on this host."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.table = f"edge_wire_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> PortCounters:
        rules = "".join(
            f'  tcp dport {port} counter comment "{label} up"\n'
            f'  tcp sport {port} counter comment "{label} down"\n'
            for label, port in self.ports.items())
        script = (f"table inet {self.table} {{\n chain out {{\n"
                  f"  type filter hook output priority 0; policy accept;\n{rules} }}\n}}\n")
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["nft", "delete", "table", "inet", self.table], check=False)

    def read(self) -> Counts:
        listed = json.loads(subprocess.run(
            ["nft", "-j", "list", "table", "inet", self.table], capture_output=True,
            text=True, check=True).stdout)
        counts: Counts = {label: {"up": [0, 0], "down": [0, 0]} for label in self.ports}
        for item in listed["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            label, direction = rule["comment"].rsplit(" ", 1)
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts[label][direction] = [expr["counter"]["packets"],
                                                expr["counter"]["bytes"]]
        return counts


def delta(after: Counts, before: Counts) -> Counts:
    return {label: {d: [after[label][d][i] - before[label][d][i] for i in (0, 1)]
                    for d in ("up", "down")} for label in after}


def total_bytes(counts: Counts, label: str) -> int:
    return counts[label]["up"][1] + counts[label]["down"][1]


def default_of(name: str) -> float | None:
    """A setting's documented default as a number, or None if this agent lacks it."""
    for setting in agent_config.SETTINGS:
        if setting.name == name:
            return float(setting.default)
    return None


def day_model() -> dict[str, float]:
    """Items per day at this agent's defaults (see the module docstring)."""
    poll_s = (default_of("POLL_INTERVAL") or 30.0) * 60.0
    telemetry_s = default_of("TELEMETRY_INTERVAL") or 60.0
    heartbeat_s = default_of("HEARTBEAT_INTERVAL")
    keepalive_s = default_of("MQTT_KEEPALIVE") or 30.0  # fixed 30 s before issue 13
    state_period = telemetry_s if heartbeat_s is None else min(poll_s, heartbeat_s)
    states = DAY_S / state_period
    return {"poll_s": poll_s, "telemetry_s": telemetry_s, "heartbeat_s": heartbeat_s or 0.0,
            "keepalive_s": keepalive_s, "state_period_s": state_period, "states": states,
            "pings": states * (math.ceil(state_period / keepalive_s) - 1),
            "checks": DAY_S / poll_s}


class Rig:
    """The broker, the registries, the watcher and the counters of one run."""

    def __init__(self, work: Path, run_id: str) -> None:
        self.work = work
        self.run_id = run_id
        self.prefix = f"wire{run_id}"
        self.broker = Broker()
        self.registry = PrivateRegistry()
        self.repo = self.registry.repo(f"wire{run_id}/app")
        self.name = f"edge-bench-{run_id}-wire"
        self.device = Device(self.repo, self.name, work / "data")
        self.watcher: MqttWatcher | None = None

    def start(self) -> None:
        self.broker.start()
        self.broker.add_operator(OPERATOR)
        self.broker.add_device(self.name)
        build_and_push(self.repo, "1.0", "1.0", registry=self.registry.address)
        self.watcher = MqttWatcher(self.broker.settings(OPERATOR, prefix=self.prefix),
                                   [f"{self.prefix}/#"]).start()

    def agent_env(self, **extra: str) -> dict[str, str]:
        env = self.device.agent_env(
            CONTAINER_IMAGE=f"{self.repo}:1.0", LOG_LEVEL="INFO", MQTT_HOST="127.0.0.1",
            MQTT_PORT=str(self.broker.tls_port), MQTT_TLS="true",
            MQTT_CA_FILE=str(self.broker.pki.ca_cert), MQTT_USERNAME=self.name,
            MQTT_PASSWORD=self.broker.passwords[self.name], MQTT_TOPIC_PREFIX=self.prefix,
            **extra)
        if "POLL_INTERVAL" not in extra:
            env.pop("POLL_INTERVAL")  # Device's 3 s test default: the real default here
        return env

    def states(self, since: float) -> int:
        assert self.watcher is not None
        topic = f"{self.prefix}/devices/{self.name}/state"
        return sum(1 for m in self.watcher.on(topic) if m.at >= since)

    def settled(self, since: float) -> Callable[[], bool]:
        assert self.watcher is not None
        topic = f"{self.prefix}/devices/{self.name}/state"

        def check() -> bool:
            found = [m.json() for m in self.watcher.on(topic) if m.at >= since] \
                if self.watcher else []
            return any(s["running"]["status"] == "running" and s["update"]["status"] == "idle"
                       for s in found)
        return check

    def close(self, client: docker.DockerClient) -> None:
        if self.watcher is not None:
            self.watcher.close()
        remove_test_containers(client, self.run_id, self.name)
        remove_repo_images(self.repo)
        self.broker.close()
        self.registry.close()


def run_agent(rig: Rig, counters: PortCounters, label: str, window_s: float,
              settle_s: float, **extra: str) -> dict[str, Any]:
    """One agent: bytes from start to its first settled state, then over ``window_s``."""
    agent = AgentProcess(rig.agent_env(**extra), rig.work / f"{label}.log")
    start = time.monotonic()
    before = counters.read()
    agent.start()
    try:
        wait_for(rig.settled(start), 60, f"{label}: a settled state")
        time.sleep(settle_s)
        settled = counters.read()
        mark = time.monotonic()
        time.sleep(window_s)
        after = counters.read()
        states = rig.states(mark)
    except BaseException:
        print(agent.log()[-3000:], file=sys.stderr)
        raise
    finally:
        agent.stop()
    return {"connect": delta(settled, before), "window": delta(after, settled),
            "window_s": window_s, "states": states}


def registry_checks(location: RepositoryLocation, n: int, counters: PortCounters,
                    label: str) -> dict[str, Any]:
    """``n`` checks, each by a new client (a new connection), as after 30 idle minutes."""
    before = counters.read()
    for _ in range(n):
        client = RegistryClient("127.0.0.1:1/unused")
        client.location = location
        client.digest("1.0")
        client.close()
    counted = delta(counters.read(), before)[label]
    return {"checks": n, "up": counted["up"], "down": counted["down"],
            "bytes_per_check": (counted["up"][1] + counted["down"][1]) / n}


def tls_registry(rig: Rig) -> PrivateRegistry:
    """A second registry with the first one's storage, serving HTTPS."""
    served = PrivateRegistry(start=False)
    shutil.rmtree(served.storage)
    shutil.copytree(rig.registry.storage, served.storage)
    saved = dict(os.environ)
    os.environ.update(REGISTRY_HTTP_TLS_CERTIFICATE=str(rig.broker.pki.server_cert),
                      REGISTRY_HTTP_TLS_KEY=str(rig.broker.pki.server_key))
    try:
        served.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return served


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=float, default=130.0,
                        help="seconds of the idle window at defaults (default 130)")
    parser.add_argument("--checks", type=int, default=5, help="registry checks per scheme")
    args = parser.parse_args()
    if shutil.which("nft") is None or os.geteuid() != 0:
        print("needs root and nft (nftables) to count packets", file=sys.stderr)
        return 2
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    report: dict[str, Any] = {"model": day_model()}
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp), run_id)
        secure: PrivateRegistry | None = None
        try:
            rig.start()
            secure = tls_registry(rig)
            ports = {"mqtt": rig.broker.tls_port, "registry": rig.registry.port,
                     "registry_tls": secure.port}
            with PortCounters(ports) as counters:
                idle = run_agent(rig, counters, "defaults", args.window, 3.0)
                state = run_agent(rig, counters, "state", 10.0, 3.0, TELEMETRY_INTERVAL="1",
                                  HEARTBEAT_INTERVAL="1")
                ping = run_agent(rig, counters, "ping", 32.0, 3.0, TELEMETRY_INTERVAL="100000",
                                 HEARTBEAT_INTERVAL="100000", MQTT_KEEPALIVE="5")
                name = f"wire{run_id}/app"
                http = registry_checks(
                    RepositoryLocation(rig.registry.address, f"http://{rig.registry.address}",
                                       name), args.checks, counters, "registry")
                os.environ["REQUESTS_CA_BUNDLE"] = str(rig.broker.pki.ca_cert)
                https = registry_checks(
                    RepositoryLocation(secure.address, f"https://{secure.address}", name),
                    args.checks, counters, "registry_tls")
        finally:
            if secure is not None:
                secure.close()
            rig.close(client)

    model = report["model"]
    per_state = total_bytes(state["window"], "mqtt") / max(state["states"], 1)
    pings_seen = ping["window"]["mqtt"]["down"][0]
    per_ping = total_bytes(ping["window"], "mqtt") / max(pings_seen, 1)
    idle_bytes = total_bytes(idle["window"], "mqtt")
    mqtt_day = {"state": model["states"] * per_state, "keepalive": model["pings"] * per_ping}
    registry_day = {"https": model["checks"] * https["bytes_per_check"],
                    "http": model["checks"] * http["bytes_per_check"]}
    total_day = sum(mqtt_day.values()) + registry_day["https"]
    report.update({
        "per_item_bytes": {"state_publish": per_state, "keepalive_ping": per_ping,
                           "registry_check_http": http["bytes_per_check"],
                           "registry_check_https": https["bytes_per_check"],
                           "connect_mqtt_tls": total_bytes(idle["connect"], "mqtt")},
        "measured": {"defaults": idle, "state": state, "ping": ping,
                     "registry_http": http, "registry_https": https},
        "idle_window": {"seconds": args.window, "mqtt_bytes": idle_bytes,
                        "states": idle["states"],
                        "mqtt_bytes_per_day": idle_bytes * DAY_S / args.window},
        "per_day_bytes": {"mqtt": mqtt_day, "mqtt_total": sum(mqtt_day.values()),
                          "registry": registry_day, "total": total_day},
    })
    rows = [
        ["MQTT state publish", per_state, model["states"], mqtt_day["state"] / 1e3],
        ["MQTT keepalive ping", per_ping, model["pings"], mqtt_day["keepalive"] / 1e3],
        ["registry check (HTTPS, new conn.)", https["bytes_per_check"], model["checks"],
         registry_day["https"] / 1e3],
        ["registry check (HTTP, new conn.)", http["bytes_per_check"], model["checks"],
         registry_day["http"] / 1e3],
    ]
    print(table(rows, ["item", "bytes each", "per day", "kB/day"]))
    print(f"defaults: POLL_INTERVAL {model['poll_s']:.0f} s, state every "
          f"{model['state_period_s']:.0f} s, keepalive {model['keepalive_s']:.0f} s")
    print(f"MQTT connect (TLS handshake, subscriptions, first states): "
          f"{report['per_item_bytes']['connect_mqtt_tls']} bytes, once per connection")
    print(f"idle window at defaults: {idle_bytes} MQTT bytes in {args.window:.0f} s "
          f"({idle['states']} states) = {idle_bytes * DAY_S / args.window / 1e3:.1f} kB/day "
          "if the window spans every period")
    print(f"per day: MQTT {sum(mqtt_day.values()) / 1e3:.1f} kB + registry (HTTPS) "
          f"{registry_day['https'] / 1e3:.1f} kB = {total_day / 1e3:.1f} kB "
          f"({total_day / 1e6:.3f} MB)")
    path = write_results("wire", report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
