"""Fleet: N agents (default 50) on this machine, each with its own real container, get
one fleet broadcast; how long until every state reports the new tag, and what the
broker and the agents cost meanwhile.

Every agent is a real process (``python -m edge_agent``) logged in to one Mosquitto
(the repository's config, one broker user per device) and managing its own busybox
container on the shared daemon; all use one repository of the shared registry
(v1 -> v2: a fresh pull, Docker shares the download between concurrent pulls of the
same layers). After all agents run v1 and have been quiet for a while, an operator
publishes the retained fleet tag v2; from just before that publish we time, per
device, the first state that shows v2 running and the first that shows it verified
(update idle after the HEALTH_TIMEOUT=2 "kept running" check), and take the CPU time
of the agents, of Mosquitto and of dockerd+containerd (shared with anything else
running on the machine) over the same window.

Needs the stack (scripts/stack). Prints a table and writes bench/results/fleet.json.
Run: python -m bench.bench_fleet [--agents 50]
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

from bench.common import (
    CpuWindow,
    is_settled,
    pids_named,
    remove_containers,
    rss_mb,
    state_of,
    summary,
    table,
    wait_for,
    write_results,
)
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.fleet import start_agents, stop_agents
from tests.support.images import build_and_push, remove_repo_images

OPERATOR = "fleet-operator"


def main() -> int:  # noqa: PLR0912, PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--quiet", type=float, default=15.0,
                        help="seconds of quiet after start-up, before the broadcast")
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"127.0.0.1:5000/fleet{run_id}/app"
    prefix = f"fleet{run_id}"
    topics = Topics(prefix)
    names = [f"edge-fleet-{run_id}-{i:03d}" for i in range(args.agents)]
    broker = Broker()
    agents: list[AgentProcess] = []
    watcher: MqttWatcher | None = None
    report: dict[str, Any] = {"agents": args.agents}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            build_and_push(repo, "v1", "v1")
            build_and_push(repo, "v2", "v2")
            remove_repo_images(repo)
            broker.start()
            broker.add_operator(OPERATOR)
            setup = time.monotonic()
            for name in names:
                broker.add_device(name)
            report["broker_users_s"] = time.monotonic() - setup
            watcher = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"])
            watcher.start()
            start = time.monotonic()
            agents = start_agents(broker, prefix, names, f"{repo}:v1", Path(tmp))
            wait_for(lambda: all(is_settled(state_of(watcher, topics, n), "v1") for n in names),
                     600, "every agent to run v1", interval_s=0.5)
            report["startup_all_settled_s"] = time.monotonic() - start
            print(f"{args.agents} agents run v1 after {report['startup_all_settled_s']:.1f} s",
                  file=sys.stderr)
            time.sleep(args.quiet)

            agent_pids = [a.proc.pid for a in agents if a.proc is not None]
            broker_proc = getattr(broker, "_proc", None)
            broker_pids = [broker_proc.pid] if broker_proc is not None else []
            docker_pids = pids_named("dockerd") + pids_named("containerd")
            window = CpuWindow(agent_pids + broker_pids + docker_pids).start()
            t0 = time.monotonic()
            watcher.publish(topics.fleet_tag, "v2", retain=True)
            running_at: dict[str, float] = {}
            verified_at: dict[str, float] = {}
            deadline = t0 + 600
            while len(verified_at) < len(names):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(verified_at)} of {len(names)} verified v2")
                for name in names:
                    if name in verified_at:
                        continue
                    for message in watcher.on(topics.state(name)):
                        if message.at < t0:
                            continue
                        state = message.json()
                        if state["running"]["tag"] == "v2":
                            running_at.setdefault(name, message.at - t0)
                        if is_settled(state, "v2"):
                            verified_at[name] = message.at - t0
                            break
                time.sleep(0.2)
            window.stop()
            rss = [rss_mb(pid) for pid in agent_pids]
            events = [m.json().get("event") for n in names
                      for m in watcher.on(topics.events(n)) if m.at >= t0]
            running = list(running_at.values())
            verified = list(verified_at.values())
            report.update({
                "all_running_s": max(running), "all_verified_s": max(verified),
                "running_s": summary(running), "verified_s": summary(verified),
                "cpu_window_s": window.seconds,
                "cpu_percent_of_one_core": {
                    "agents_total": window.percent(agent_pids),
                    "agent_mean": window.percent(agent_pids) / len(agent_pids),
                    "broker": window.percent(broker_pids),
                    "dockerd_containerd": window.percent(docker_pids),
                },
                "cpu_s": {"agents_total": window.cpu_s(agent_pids),
                          "broker": window.cpu_s(broker_pids),
                          "dockerd_containerd": window.cpu_s(docker_pids)},
                "agent_rss_mb": {"median": statistics.median(rss), "total": sum(rss)},
                "events": {e: events.count(e) for e in sorted(set(map(str, events)))},
                "broker_messages_seen_by_operator": len(watcher.messages),
            })
            containers = {c.name: c for c in client.containers.list(all=True)
                          if (c.name or "").startswith(f"edge-fleet-{run_id}-")}
            wrong = [n for n in names if n not in containers
                     or (containers[n].labels or {}).get("io.edge-agent.tag") != "v2"
                     or containers[n].status != "running"]
            report["containers_not_on_v2"] = wrong
            report["containers_total"] = len(containers)
        except BaseException:
            for agent in agents[:3]:
                print(agent.log()[-2000:], file=sys.stderr)
            raise
        finally:
            stop_agents(agents)
            if watcher is not None:
                watcher.close()
            broker.close()
            remove_containers(client, f"edge-fleet-{run_id}-")
            remove_repo_images(repo)
    cpu = report["cpu_percent_of_one_core"]
    print(table([
        ["first device running v2 s", report["running_s"]["min"]],
        ["median device running v2 s", report["running_s"]["median"]],
        ["all devices running v2 s", report["all_running_s"]],
        ["all devices verified v2 s", report["all_verified_s"]],
        ["agents CPU % of one core (total)", cpu["agents_total"]],
        ["  per agent", cpu["agent_mean"]],
        ["broker CPU % of one core", cpu["broker"]],
        ["dockerd+containerd CPU %", cpu["dockerd_containerd"]],
        ["agent RSS MiB median", report["agent_rss_mb"]["median"]],
        ["containers total / not on v2", f"{report['containers_total']} / "
                                         f"{len(report['containers_not_on_v2'])}"],
    ], [f"fleet of {args.agents}", "value"]))
    print(f"window {report['cpu_window_s']:.1f} s; events {report['events']}")
    path = write_results("fleet", report)
    print(f"wrote {path}")
    print(json.dumps({"all_running_s": round(report["all_running_s"], 2),
                      "all_verified_s": round(report["all_verified_s"], 2)}))
    return 0 if not report["containers_not_on_v2"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
