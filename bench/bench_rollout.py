"""Rollout vs broadcast: N agents (default 50) on this machine, as in bench_fleet, get a
new tag twice in one run: first by the single fleet broadcast (the retained fleet tag),
then by a rollout of the bridge (waves 1, 10%, 50%, 100%; at most 10 updating at once).
For each: the time until every device runs the new tag verified, the peak of pulls at
the registry, the most devices updating at once, and dockerd+containerd CPU.

Pulls are counted at the registry: the agents' image names point at a counting proxy in
front of the shared registry (tests/support/throttle.py, not throttling), which records
every request (each agent resolves the new tag's digest with a HEAD), every manifest
and blob GET (a pull) and the most GETs served at once. All agents share one Docker
daemon here, which downloads a layer once for concurrent pulls and not again once it
has it: per device the registry mostly sees the digest check; on a real fleet (a
daemon per device) every device also fetches every blob, so the rollout's pacing
matters more there than these figures show. "Updating at
once" comes from the agents' own events (update_started until update_succeeded,
update_failed or rolled_back).

The bridge runs as its own process with BRIDGE_DATA_DIR (it drives the rollout); the
broadcast goes through the broker directly, as edge-ctl set-tag --fleet would.
Needs the stack (scripts/stack). Prints a table and writes bench/results/rollout.json.
Run: python -m bench.bench_rollout [--agents 50]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import requests

from bench.common import (
    CpuWindow,
    is_settled,
    pids_named,
    remove_containers,
    state_of,
    table,
    wait_for,
    write_results,
)
from edge_agent.protocol.events import EventName
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.bridge_process import BRIDGE_USER, BridgeProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.fleet import start_agents, stop_agents
from tests.support.images import build_and_push, remove_repo_images
from tests.support.throttle import ThrottledRegistry

OPERATOR = "rollout-operator"
TOKEN = "bench-token-" + "r" * 24
DEADLINE_S = 900.0
UPDATE_ENDS = (EventName.UPDATE_SUCCEEDED, EventName.UPDATE_FAILED, EventName.ROLLED_BACK)
DEFAULT_WAVES: list[int | str] = [1, "10%", "50%", "100%"]


def nonempty_waves(waves: list[Any], devices: int) -> list[Any]:
    """``waves`` without the shares that a fleet of ``devices`` has already reached (the
    bridge refuses an empty wave: 10% of 10 devices is the canary's 1)."""
    kept: list[Any] = []
    reached = 0
    for wave in waves:
        if isinstance(wave, str) and wave.endswith("%"):
            upto = math.ceil(float(wave[:-1]) * devices / 100)
            if upto <= reached:
                continue
            reached = upto
        elif isinstance(wave, int):
            reached += wave
        else:
            reached += len(wave)
        kept.append(wave)
    return kept


def peak_per_second(starts: list[float]) -> int:
    """The most pulls that started within any one second."""
    ordered = sorted(starts)
    best = first = 0
    for last, at in enumerate(ordered):
        while at - ordered[first] >= 1.0:
            first += 1
        best = max(best, last - first + 1)
    return best


def peak_updating(watcher: MqttWatcher, topics: Topics, names: list[str], t0: float) -> int:
    """The most devices between update_started and its end at once, from their events."""
    marks: list[tuple[float, int]] = []
    for name in names:
        started: float | None = None
        for message in watcher.on(topics.events(name)):
            if message.at < t0:
                continue
            event = message.json().get("event")
            if event == EventName.UPDATE_STARTED and started is None:
                started = message.at
            elif event in UPDATE_ENDS and started is not None:
                marks += [(started, 1), (message.at, -1)]
                started = None
        if started is not None:
            marks.append((started, 1))
    busy = best = 0
    for _, step in sorted(marks, key=lambda mark: (mark[0], mark[1])):
        busy += step
        best = max(best, busy)
    return best


def measure(what: str, trigger: Callable[[], None], tag: str, names: list[str],  # noqa: PLR0913, PLR0917
            watcher: MqttWatcher, topics: Topics, proxy: ThrottledRegistry) -> dict[str, Any]:
    """Run ``trigger`` and time it until every device runs ``tag`` verified."""
    docker_pids = pids_named("dockerd") + pids_named("containerd")
    proxy.reset_counts()
    window = CpuWindow(docker_pids).start()
    t0 = time.monotonic()
    trigger()
    verified_at: dict[str, float] = {}
    deadline = t0 + DEADLINE_S
    while len(verified_at) < len(names):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: only {len(verified_at)} of {len(names)} verified {tag}")
        for name in names:
            if name not in verified_at and is_settled(state_of(watcher, topics, name), tag):
                verified_at[name] = time.monotonic() - t0
        time.sleep(0.2)
    window.stop()
    starts = [at for at, _ in proxy.pull_gets if at >= t0]
    every = [at for at, _, _ in proxy.requests if at >= t0]
    return {
        "registry_requests": len(every),
        "registry_peak_requests_per_s": peak_per_second(every),
        "all_verified_s": max(verified_at.values()),
        "first_verified_s": min(verified_at.values()),
        "registry_pull_gets": len(starts),
        "registry_manifest_gets": sum(1 for at, path in proxy.pull_gets
                                      if at >= t0 and "/manifests/" in path),
        "registry_peak_concurrent_gets": proxy.peak_in_flight,
        "registry_peak_gets_per_s": peak_per_second(starts),
        "peak_devices_updating": peak_updating(watcher, topics, names, t0),
        "dockerd_containerd_cpu_s": window.cpu_s(),
        "dockerd_containerd_cpu_percent": window.percent(),
        "window_s": window.seconds,
    }


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--waves", default=json.dumps(DEFAULT_WAVES),
                        help="the rollout's waves, as JSON (waves that would be empty for "
                        "a small fleet are left out)")
    parser.add_argument("--max-updating", type=int, default=10)
    parser.add_argument("--quiet", type=float, default=10.0,
                        help="seconds of quiet after start-up and between the two updates")
    args = parser.parse_args()
    waves = nonempty_waves(json.loads(args.waves), args.agents)
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"127.0.0.1:5000/rollout{run_id}/app"
    prefix = f"rollout{run_id}"
    topics = Topics(prefix)
    name_prefix = f"edge-rollout-{run_id}-"
    names = [f"{name_prefix}{i:03d}" for i in range(args.agents)]
    broker = Broker()
    proxy = ThrottledRegistry(min_bytes=None)
    agents: list[AgentProcess] = []
    watcher: MqttWatcher | None = None
    bridge: BridgeProcess | None = None
    report: dict[str, Any] = {"agents": args.agents, "waves": waves,
                              "max_updating": args.max_updating}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            for version in ("v1", "v2", "v3"):
                build_and_push(repo, version, version)
            remove_repo_images(repo)
            proxy.start()
            image = proxy.repo(repo)
            broker.start()
            broker.add_operator(OPERATOR)
            broker.add_operator(BRIDGE_USER)
            for name in names:
                broker.add_device(name)
            watcher = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"])
            watcher.start()
            (work / "bridge").mkdir()
            bridge = BridgeProcess(broker, prefix, TOKEN, work / "bridge.log",
                                   data_dir=work / "bridge", log_level="WARNING").start()
            agents = start_agents(broker, prefix, names, f"{image}:v1", work)
            wait_for(lambda: all(is_settled(state_of(watcher, topics, n), "v1") for n in names),
                     600, "every agent to run v1", interval_s=0.5)
            print(f"{args.agents} agents run v1", file=sys.stderr)
            time.sleep(args.quiet)

            def broadcast() -> None:
                assert watcher is not None
                watcher.publish(topics.fleet_tag, "v2", retain=True)

            report["broadcast"] = measure("broadcast", broadcast, "v2", names, watcher,
                                          topics, proxy)
            print(f"broadcast: all on v2 after {report['broadcast']['all_verified_s']:.1f} s",
                  file=sys.stderr)
            time.sleep(args.quiet)

            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {TOKEN}"
            started: dict[str, Any] = {}

            def rollout() -> None:
                response = session.post(f"{bridge.url}/api/v1/rollouts", timeout=30, json={
                    "tag": "v3", "target": {"fleet": True}, "waves": waves,
                    "max_updating": args.max_updating})
                if response.status_code != 201:  # noqa: PLR2004 - created
                    raise RuntimeError(f"rollout refused: {response.status_code} "
                                       f"{response.text}")
                started.update(response.json())

            report["rollout"] = measure("rollout", rollout, "v3", names, watcher, topics,
                                        proxy)
            url = f"{bridge.url}/api/v1/rollouts/{started['id']}"
            wait_for(lambda: session.get(url, timeout=30).json()["state"] == "succeeded", 120,
                     "the rollout to end succeeded", interval_s=0.5)
            final = session.get(url, timeout=30).json()
            report["rollout"]["state"] = final["state"]
            report["rollout"]["waves"] = [
                {"devices": len(w["devices"]), "started_at": w["started_at"],
                 "ended_at": w["ended_at"]} for w in final["waves"]]
            session.close()
        except BaseException:
            for agent in agents[:3]:
                print(agent.log()[-2000:], file=sys.stderr)
            if bridge is not None:
                print(bridge.log()[-3000:], file=sys.stderr)
            raise
        finally:
            stop_agents(agents)
            if bridge is not None:
                bridge.stop()
            if watcher is not None:
                watcher.close()
            broker.close()
            proxy.close()
            remove_containers(client, name_prefix)
            remove_repo_images(repo)
            remove_repo_images(proxy.repo(repo))
    sent, rolled = report["broadcast"], report["rollout"]
    rows = [[label, sent[key], rolled[key]] for label, key in (
        ("all devices verified s", "all_verified_s"),
        ("first device verified s", "first_verified_s"),
        ("registry requests (HEAD checks too)", "registry_requests"),
        ("registry peak requests in 1 s", "registry_peak_requests_per_s"),
        ("registry peak concurrent GETs", "registry_peak_concurrent_gets"),
        ("registry peak GETs in 1 s", "registry_peak_gets_per_s"),
        ("registry GETs (manifests+blobs)", "registry_pull_gets"),
        ("registry manifest GETs", "registry_manifest_gets"),
        ("peak devices updating at once", "peak_devices_updating"),
        ("dockerd+containerd CPU s", "dockerd_containerd_cpu_s"),
        ("dockerd+containerd CPU % of a core", "dockerd_containerd_cpu_percent"),
    )]
    print(table(rows, [f"fleet of {args.agents}", "broadcast", f"rollout {waves} "
                                                               f"max {args.max_updating}"]))
    path = write_results("rollout", report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
