"""Update latency and downtime of a tag change, next to the floor, in one run.

agent: the tag file changes, ``Agent.check()`` runs; we time from the check's start
until the new version answers on the app port, and the longest window the port did
not answer (an HTTP probe every 10 ms).
floor: the same work done directly with docker-py (pull, create, stop old, start new,
first answer), no agent.

Needs the stack (scripts/stack). Prints a table and writes bench/results/update.json.
Run: python -m bench.bench_update [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

from bench.common import Probe, by_mode
from edge_agent.agent.config import load_settings
from edge_agent.agent.loop import Agent
from tests.support import free_port
from tests.support.images import build_and_push, remove_repo_images

RESULTS = Path(__file__).resolve().parent / "results"


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.005)


def agent_round(repo: str, name: str, port: int, data: Path, tag: str) -> tuple[float, float]:
    (data / "tag").write_text(tag + "\n")
    settings = load_settings({"CONTAINER_IMAGE": repo, "CONTAINER_NAME": name,
                              "DATA_DIR": str(data), "HEALTH_TIMEOUT": "2", "DEVICE_ID": name})
    agent = Agent(settings)
    with Probe(port) as probe:
        start = time.monotonic()
        agent.check()
        wait_for(lambda: tag in probe.first_seen)
    agent.close()
    return probe.first_seen[tag] - start, probe.longest_gap


def floor_round(client: docker.DockerClient, repo: str, name: str, port: int,
                tag: str) -> tuple[float, float]:
    with Probe(port) as probe:
        start = time.monotonic()
        client.api.pull(repo, tag=tag)
        new = client.containers.create(f"{repo}:{tag}", name=f"{name}-floor-next",
                                       ports={"8080/tcp": port})
        old = client.containers.get(name)
        old.stop()
        new.start()
        wait_for(lambda: tag in probe.first_seen)
        old.remove(force=True)
        new.rename(name)
    return probe.first_seen[tag] - start, probe.longest_gap


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"127.0.0.1:5000/bench{run_id}/app"
    name = f"edge-bench-{run_id}"
    port = free_port()
    tags = [f"v{i}" for i in range(2 * args.rounds + 2)]
    results: dict[str, list[tuple[float, float]]] = {"agent": [], "floor": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "docker_config.json").write_text(json.dumps({"ports": {"8080/tcp": port}}))
        try:
            for tag in tags:
                build_and_push(repo, tag, tag)
            remove_repo_images(repo)
            agent_round(repo, name, port, data, tags[0])
            for i in range(args.rounds):
                remove_repo_images(repo)  # both sides pull for real
                results["agent"].append(agent_round(repo, name, port, data, tags[2 * i + 1]))
                remove_repo_images(repo)
                results["floor"].append(
                    floor_round(client, repo, name, port, tags[2 * i + 2]))
                # hand the container back to the agent: it adopts nothing it did not make
                client.containers.get(name).remove(force=True)
                agent_round(repo, name, port, data, tags[2 * i + 2])
        finally:
            for container in client.containers.list(all=True, filters={"name": name}):
                container.remove(force=True)
            remove_repo_images(repo)
    summary: dict[str, Any] = {}  # written as JSON
    print(f"{'':8} {'latency median s':>18} {'downtime median s':>18} {'downtime max s':>15}")
    for side, rows in results.items():
        latency = statistics.median(r[0] for r in rows)
        gaps = [r[1] for r in rows]
        summary[side] = {"latency_median_s": latency, "downtime_median_s": statistics.median(gaps),
                         "downtime_max_s": max(gaps), "rounds": rows}
        print(f"{side:8} {latency:18.3f} {statistics.median(gaps):18.3f} {max(gaps):15.3f}")
    ratio = summary["agent"]["latency_median_s"] / summary["floor"]["latency_median_s"]
    floor_gap = max(summary["floor"]["downtime_median_s"], 1e-9)
    gap_ratio = summary["agent"]["downtime_median_s"] / floor_gap
    print(f"latency agent/floor = {ratio:.2f}x, downtime agent/floor = {gap_ratio:.2f}x")
    modes = by_mode({side: [{"latency_s": r[0], "downtime_s": r[1]} for r in rows]
                     for side, rows in results.items()})
    summary["modes"] = modes
    for side, mode in modes.items():
        for name_ in ("fast", "slow"):
            m = mode[name_]
            if m["n"]:
                print(f"{side:6} {name_} rounds: {m['n']}, latency median "
                      f"{m['latency_median_s']:.3f} s, "
                      f"downtime median {m['downtime_median_s']:.3f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "update.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
