"""Idle cost: RSS and CPU of agents that have nothing to do, and what each check costs
at the registry.

Two agent processes run side by side for ``--seconds`` (default 300) after a warm-up,
each with its own repository, container and port, at POLL_INTERVAL=0.1 (a check every
6 s): one standalone (tag file only), one connected to Mosquitto (MQTT, state and
telemetry published). For each: RSS (median and max of samples every 5 s; PSS too),
CPU over the window as a percentage of one core, and per check (checks counted from
``update.last_check_at`` in status.json) the requests the registry logged for its
repository: manifest HEADs/GETs and blob GETs.

For comparison, measured in the same run: bare Python processes that import docker-py
(and use it once), and one that imports everything the agent needs.

Needs the stack (scripts/stack). Prints a table and writes bench/results/idle.json.
Run: python -m bench.bench_idle [--seconds 300]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from bench.common import CpuWindow, pss_mb, rss_mb, table, wait_for, write_results
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.images import build_and_push, remove_repo_images
from tests.support.registry import RegistryLog, repo_path

BARE = {
    "python -c 'import docker' (idle)": "import docker, time\n",
    "python, docker-py client + ping (idle)":
        "import docker, time\nc = docker.from_env(version='auto')\nc.ping()\n",
    "python importing the agent's libraries (docker, paho, yaml)":
        "import docker, paho.mqtt.client, yaml, time\n",
}


def last_check(device: Device) -> str | None:
    try:
        return str(device.status()["update"]["last_check_at"])
    except (OSError, ValueError, KeyError):
        return None


def main() -> int:  # noqa: PLR0912, PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for both agents (e.g. MALLOC_ARENA_MAX=2)")
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    prefix = f"idle{run_id}"
    registry_log = RegistryLog()
    broker = Broker()
    agents: dict[str, tuple[AgentProcess, Device]] = {}
    bare: dict[str, subprocess.Popen[bytes]] = {}
    repos = {kind: f"127.0.0.1:5000/idle{run_id}/{kind}" for kind in ("standalone", "mqtt")}
    report: dict[str, Any] = {"seconds": args.seconds, "poll_interval_min": 0.1,
                              "extra_env": args.env}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            broker.start()
            for kind, repo in repos.items():
                build_and_push(repo, "v1", "v1")
                name = f"edge-bench-{run_id}-{kind}"
                device = Device(repo, name, Path(tmp) / kind)
                device.write_tag("v1")
                env = device.agent_env(POLL_INTERVAL="0.1", LOG_LEVEL="INFO",
                                       HEALTH_TIMEOUT="2",
                                       **dict(item.split("=", 1) for item in args.env))
                if kind == "mqtt":
                    broker.add_device(name)
                    env.update(broker.agent_env(name, prefix))
                agents[kind] = (AgentProcess(env, Path(tmp) / f"{kind}.log").start(), device)
            def settled(device: Device) -> bool:
                return device.serving() == "v1" and device.status()["update"]["status"] == "idle"

            for kind, (_agent, device) in agents.items():
                wait_for(functools.partial(settled, device), 60, f"{kind} settled")
            for label, code in BARE.items():
                bare[label] = subprocess.Popen(
                    [sys.executable, "-c", code + "time.sleep(100000)\n"],
                    stdin=subprocess.DEVNULL)
            time.sleep(args.warmup)

            pids = {kind: agent.proc.pid for kind, (agent, _) in agents.items()
                    if agent.proc is not None}
            mark = registry_log.mark()
            window = CpuWindow(list(pids.values())).start()
            rss: dict[str, list[float]] = {kind: [] for kind in pids}
            pss: dict[str, list[float]] = {kind: [] for kind in pids}
            checks: dict[str, set[str]] = {kind: set() for kind in pids}
            next_sample = 0.0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                for kind, (_, device) in agents.items():
                    seen = last_check(device)
                    if seen:
                        checks[kind].add(seen)
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + 5
                    for kind, pid in pids.items():
                        rss[kind].append(rss_mb(pid))
                        pss[kind].append(pss_mb(pid) or 0.0)
                time.sleep(0.5)
            window.stop()
            registry_log.sync()
            for kind, pid in pids.items():
                repo = repos[kind]
                requests_ = registry_log.matching(path=f"/v2/{repo_path(repo)}/", since=mark)
                head = sum(1 for r in requests_ if r.method == "HEAD" and "/manifests/" in r.path)
                get_manifest = sum(1 for r in requests_
                                   if r.method == "GET" and "/manifests/" in r.path)
                blobs = sum(1 for r in requests_ if "/blobs/" in r.path)
                # the first value seen may predate the window
                n_checks = max(len(checks[kind]) - 1, 1)
                report[kind] = {
                    "rss_mb": {"median": statistics.median(rss[kind]), "max": max(rss[kind]),
                               "samples": rss[kind]},
                    "pss_mb_median": statistics.median(pss[kind]),
                    "cpu_percent": window.percent([pid]),
                    "cpu_s": window.cpu_s([pid]),
                    "checks": n_checks,
                    "registry": {"manifest_head": head, "manifest_get": get_manifest,
                                 "blob_requests": blobs, "all": len(requests_)},
                    "manifest_requests_per_check": (head + get_manifest) / n_checks,
                    "blob_requests_per_check": blobs / n_checks,
                }
            report["bare"] = {label: rss_mb(proc.pid) for label, proc in bare.items()}
        except BaseException:
            for agent, _ in agents.values():
                print(agent.log()[-3000:], file=sys.stderr)
            raise
        finally:
            for proc in bare.values():
                proc.kill()
                proc.wait()
            for agent, device in agents.values():
                if agent.alive:
                    agent.stop()
                remove_test_containers(client, run_id, device.name)
            for repo in repos.values():
                remove_repo_images(repo)
            broker.close()
    rows = []
    for kind in ("standalone", "mqtt"):
        r = report[kind]
        rows.append([f"agent ({kind})", r["rss_mb"]["median"], r["rss_mb"]["max"],
                     r["pss_mb_median"], r["cpu_percent"], r["checks"],
                     r["manifest_requests_per_check"], r["blob_requests_per_check"]])
    for label, value in report["bare"].items():
        rows.append([label, value, "", "", "", "", "", ""])
    print(table(rows, ["process", "RSS MiB median", "max", "PSS MiB", "CPU %", "checks",
                       "manifest req/check", "blob req/check"]))
    print(f"window {args.seconds:.0f} s at POLL_INTERVAL=0.1 (targets: RSS <= 33 MB, CPU < 0.5%, "
          "1 manifest request and 0 blob requests per check)")
    path = write_results("idle", report)
    print(f"wrote {path}")
    print(json.dumps({k: {"rss_mb": round(report[k]["rss_mb"]["median"], 1),
                          "cpu_percent": round(report[k]["cpu_percent"], 3)}
                      for k in ("standalone", "mqtt")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
