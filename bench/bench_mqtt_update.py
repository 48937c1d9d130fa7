"""Update latency and downtime from the MQTT tag publish to the new version serving,
next to the docker-py floor, in one run.

agent: a real agent process (``python -m edge_agent``) connected to a real Mosquitto
(the repository's config). An operator publishes the retained device tag; we time from
just before the publish until the new version answers on the app port, and take the
longest window in which the port did not answer (HTTP probe every 10 ms). The time the
agent's ``update_started`` event arrives back at the operator is recorded too, to show
where the time goes.
floor: the same work done directly with docker-py in this process on a second
container and port: pull, create, stop the old, start the new, first answer.

Both sides pull for real (the repository's local images are removed before every
round) from the shared registry; the rounds alternate agent, floor, agent, ...

Needs the stack (scripts/stack). Prints a table and writes bench/results/mqtt_update.json.
Run: python -m bench.bench_mqtt_update [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from bench.common import Probe, by_mode, summary, table, write_results
from edge_agent.protocol.topics import Topics
from tests.support import free_port, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.images import build_and_push, remove_repo_images

OPERATOR = "bench-operator"


def settled(tag: str) -> Any:
    def check(state: dict[str, Any]) -> bool:
        return bool(state["running"]["tag"] == tag and state["update"]["status"] == "idle"
                    and state["running"]["status"] == "running")
    return check


def agent_round(watcher: MqttWatcher, topics: Topics, device: Device, tag: str
                ) -> dict[str, float]:
    with Probe(device.port) as probe:
        start = time.monotonic()
        watcher.publish(topics.device_tag(device.name), tag, retain=True)
        published = time.monotonic()
        seen = probe.wait_for(tag)
        started = watcher.wait_for(
            topics.events(device.name),
            lambda m: m.json().get("event") == "update_started" and m.json().get("to_tag") == tag,
            since=start, message="update_started").at
        watcher.wait_for(topics.state(device.name), lambda m: settled(tag)(m.json()),
                         since=start, timeout=60, message=f"{tag} verified")
    return {"latency_s": seen - start, "downtime_s": probe.longest_gap,
            "publish_s": published - start, "to_update_started_s": started - start}


def floor_round(client: docker.DockerClient, repo: str, name: str, port: int,
                tag: str) -> dict[str, float]:
    with Probe(port) as probe:
        start = time.monotonic()
        client.api.pull(repo, tag=tag)
        new = client.containers.create(f"{repo}:{tag}", name=f"{name}-next",
                                       ports={"8080/tcp": port})
        old = client.containers.get(name)
        old.stop()
        new.start()
        seen = probe.wait_for(tag)
    old.remove(force=True)
    new.rename(name)
    return {"latency_s": seen - start, "downtime_s": probe.longest_gap}


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"127.0.0.1:5000/bench{run_id}/app"
    name = f"edge-bench-{run_id}"
    floor_name = f"edge-bench-{run_id}-floor"
    floor_port = free_port()
    prefix = f"bench{run_id}"
    topics = Topics(prefix)
    tags = [f"v{i}" for i in range(2 * args.rounds + 1)]
    results: dict[str, list[dict[str, float]]] = {"agent": [], "floor": []}
    broker = Broker()
    agent: AgentProcess | None = None
    watcher: MqttWatcher | None = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for tag in tags:
                build_and_push(repo, tag, tag)
            broker.start()
            broker.add_operator(OPERATOR)
            broker.add_device(name)
            watcher = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"])
            watcher.start()
            device = Device(repo, name, Path(tmp) / "data")
            env = device.agent_env(**{
                **broker.agent_env(name, prefix), "CONTAINER_IMAGE": f"{repo}:{tags[0]}",
                "POLL_INTERVAL": "30", "HEALTH_TIMEOUT": "2", "FALLBACK_TAG": "",
                "LOG_LEVEL": "INFO",
            })
            agent = AgentProcess(env, Path(tmp) / "agent.log").start()
            watcher.wait_for(topics.state(name), lambda m: settled(tags[0])(m.json()),
                             timeout=60, message="the agent to start")
            client.containers.run(f"{repo}:{tags[0]}", name=floor_name, detach=True,
                                  ports={"8080/tcp": floor_port})
            wait_until(lambda: Device(repo, floor_name, Path(tmp) / "floor",
                                      port=floor_port).serving() == tags[0],
                       timeout=30, message="the floor container")
            for i in range(args.rounds):
                remove_repo_images(repo)
                results["agent"].append(agent_round(watcher, topics, device, tags[2 * i + 1]))
                remove_repo_images(repo)
                results["floor"].append(
                    floor_round(client, repo, floor_name, floor_port, tags[2 * i + 2]))
                print(f"round {i + 1}: agent {results['agent'][-1]['latency_s']:.3f} s, "
                      f"floor {results['floor'][-1]['latency_s']:.3f} s", file=sys.stderr)
        except BaseException:
            if agent is not None:
                print(agent.log()[-4000:], file=sys.stderr)
            raise
        finally:
            if agent is not None and agent.alive:
                agent.stop()
            if watcher is not None:
                watcher.close()
            broker.close()
            remove_test_containers(client, run_id, name)
            remove_repo_images(repo)
    report: dict[str, Any] = {"rounds": args.rounds}
    rows = []
    for side, samples in results.items():
        latency = [s["latency_s"] for s in samples]
        downtime = [s["downtime_s"] for s in samples]
        report[side] = {"latency_s": summary(latency), "downtime_s": summary(downtime),
                        "samples": samples}
        rows.append([side, statistics.median(latency), min(latency), max(latency),
                     statistics.median(downtime), max(downtime)])
    to_started = statistics.median(s["to_update_started_s"] for s in results["agent"])
    report["agent"]["to_update_started_median_s"] = to_started
    ratio = report["agent"]["latency_s"]["median"] / report["floor"]["latency_s"]["median"]
    gap_ratio = report["agent"]["downtime_s"]["median"] / report["floor"]["downtime_s"]["median"]
    report["latency_ratio"] = ratio
    report["downtime_ratio"] = gap_ratio
    print(table(rows, ["", "latency median s", "min", "max", "downtime median s", "max"]))
    modes = by_mode(results)
    report["modes"] = modes
    mode_rows = []
    for side in results:
        for mode in ("fast", "slow"):
            m = modes[side][mode]
            mode_rows.append([f"{side} {mode}", m["n"], m["latency_median_s"] or "-",
                              m["downtime_median_s"] or "-"])
    print(table(mode_rows, ["rounds by mode", "n", "latency median s", "downtime median s"]))
    if modes["agent"]["fast"]["n"] and modes["floor"]["fast"]["n"]:
        fast_ratio = modes["agent"]["fast"]["latency_median_s"] / \
            modes["floor"]["fast"]["latency_median_s"]
        fast_gap = modes["agent"]["fast"]["downtime_median_s"] / \
            modes["floor"]["fast"]["downtime_median_s"]
        report["fast_latency_ratio"] = fast_ratio
        report["fast_downtime_ratio"] = fast_gap
        print(f"fast rounds only: latency agent/floor = {fast_ratio:.2f}x, "
              f"downtime agent/floor = {fast_gap:.2f}x")
    print(f"agent: publish -> update_started event back at the operator, median "
          f"{to_started:.3f} s")
    print(f"latency agent/floor = {ratio:.2f}x (target <= 1.3), "
          f"downtime agent/floor = {gap_ratio:.2f}x (target <= 1.05)")
    path = write_results("mqtt_update", report)
    print(f"wrote {path}")
    print(json.dumps({"latency_ratio": round(ratio, 3), "downtime_ratio": round(gap_ratio, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
