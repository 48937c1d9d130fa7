"""Start-up: from starting the agent process to its first retained state on the broker.

A real agent process (``python -m edge_agent``) with MQTT, restarted ``--rounds`` times
(default 7) next to a container it already manages (the usual restart: it adopts the
container and changes nothing). From ``Popen`` we time the ``online`` availability,
the first state document, and the first state that shows the container settled
(running, update idle), as an operator subscribed to the broker receives them. The
first round is a cold start (no container yet: pull, create, start, verify) and is
reported on its own.

For comparison, the bare interpreter start (``python -c pass``) and ``import docker``.

Needs the stack (scripts/stack). Prints a table and writes bench/results/startup.json.
Run: python -m bench.bench_startup [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker

from bench.common import summary, table, write_results
from edge_agent.protocol.topics import Topics
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.images import build_and_push, remove_repo_images

OPERATOR = "startup-operator"


def timed(command: list[str], rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        start = time.monotonic()
        subprocess.run(command, check=True)
        samples.append(time.monotonic() - start)
    return min(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"127.0.0.1:5000/startup{run_id}/app"
    name = f"edge-bench-{run_id}"
    prefix = f"startup{run_id}"
    topics = Topics(prefix)
    broker = Broker()
    watcher: MqttWatcher | None = None
    agent: AgentProcess | None = None
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            build_and_push(repo, "v1", "v1")
            remove_repo_images(repo)
            broker.start()
            broker.add_operator(OPERATOR)
            broker.add_device(name)
            watcher = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"])
            watcher.start()
            device = Device(repo, name, Path(tmp) / "data")
            env = device.agent_env(**{**broker.agent_env(name, prefix),
                                      "CONTAINER_IMAGE": f"{repo}:v1", "POLL_INTERVAL": "30",
                                      "HEALTH_TIMEOUT": "2", "LOG_LEVEL": "INFO"})
            agent = AgentProcess(env, Path(tmp) / "agent.log")
            for _ in range(args.rounds):
                start = time.monotonic()
                agent.start()
                online = watcher.wait_for(topics.availability(name),
                                          lambda m: m.text == "online", since=start)
                first = watcher.wait_for(topics.state(name), since=start, timeout=60)
                settled = watcher.wait_for(
                    topics.state(name),
                    lambda m: m.json()["running"]["tag"] == "v1"
                    and m.json()["update"]["status"] == "idle"
                    and m.json()["running"]["status"] == "running",
                    since=start, timeout=60)
                rounds.append({"online_s": online.at - start, "first_state_s": first.at - start,
                               "settled_s": settled.at - start})
                agent.stop()
        finally:
            if agent is not None and agent.alive:
                agent.stop()
            if watcher is not None:
                watcher.close()
            broker.close()
            remove_test_containers(client, run_id, name)
            remove_repo_images(repo)
    warm = rounds[1:]
    report: dict[str, Any] = {
        "cold": rounds[0],
        "warm": {key: summary([r[key] for r in warm]) for key in rounds[0]},
        "rounds": rounds,
        "python_c_pass_s": timed([sys.executable, "-c", "pass"]),
        "python_import_docker_s": timed([sys.executable, "-c", "import docker"]),
    }
    rows = [["restart (adopts its container), median", *[report["warm"][k]["median"]
                                                        for k in rounds[0]]],
            ["restart, max", *[report["warm"][k]["max"] for k in rounds[0]]],
            ["cold start (pull, create, verify)", *[rounds[0][k] for k in rounds[0]]]]
    print(table(rows, ["from process start, s", "online", "first state", "settled state"]))
    print(f"python -c pass: {report['python_c_pass_s']:.3f} s, "
          f"python -c 'import docker': {report['python_import_docker_s']:.3f} s")
    path = write_results("startup", report)
    print(f"wrote {path}")
    print(json.dumps({"first_state_median_s": round(report["warm"]["first_state_s"]["median"], 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
