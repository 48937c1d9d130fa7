"""Soak: many desired-tag changes to 3 agents while the broker, the registry and the
agents fail at random; then the invariants.

Agents are real processes with MQTT (POLL_INTERVAL=0.05, HEALTH_TIMEOUT=1), each
with its own repository in a registry of its own (a ``PrivateRegistry``: stopping it
does not disturb anybody else) and its own container. Before a change, with
probability ``--chaos`` (default 0.12), one fault: the broker restarts (SIGTERM, down
0.2-2 s), the registry stops for the next 1-3 changes, an agent is SIGKILLed, or an
agent is restarted with EDGE_AGENT_TEST_KILL_AT=<random step> so that it kills itself
in the middle of its next update. Dead agents are restarted (a restart policy). Changes
are a retained fleet tag, a retained device tag, or clearing a device tag, 0.2-2.5 s
apart, so many land in the middle of an update.

Afterwards (all back up): every agent runs exactly the last desired tag (container
label, registry digest, the app's answer, the state on the broker), exactly one app
container per agent (no ``-previous``/``-next``), the tag files agree with the
broker's retained tags, nothing pending in state.json, and no image of an agent's
repository other than its current and previous one.

``--restart-dockerd`` (opt-in) runs the agents and their containers on a private
dockerd (own socket, data root and bridge; tests/support/dockerd.py) and adds its
restart (SIGTERM, down 0.5-2 s; containers have restart policy ``always``) to the
faults. The shared daemon is never restarted.

Needs the stack (scripts/stack). Prints a summary and writes bench/results/soak.json
(soak-dockerd.json with --restart-dockerd); exit status 1 if an invariant is broken.
Run: python bench/bench_soak.py [--changes 200] [--seed N] [--restart-dockerd]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table, write_results
from tests.support.broker import Broker
from tests.support.chaos import Soak
from tests.support.dockerd import PrivateDockerd, bridge_exists
from tests.support.registry import PrivateRegistry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--versions", type=int, default=6)
    parser.add_argument("--chaos", type=float, default=0.12,
                        help="probability of a fault before each change")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--restart-dockerd", action="store_true",
                        help="run on a private dockerd and restart it too (opt-in)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    client = docker.from_env(version="auto")
    broker = Broker()
    registry = PrivateRegistry()
    dockerd = PrivateDockerd() if args.restart_dockerd else None
    report: dict[str, Any] = {"seed": seed, "changes": args.changes, "agents": args.agents,
                              "chaos_probability": args.chaos,
                              "restart_dockerd": args.restart_dockerd}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        soak: Soak | None = None
        try:
            broker.start()
            if dockerd is not None:
                dockerd.start()
            soak = Soak(broker=broker, registry=registry, workdir=Path(tmp),
                        agents_n=args.agents, versions=[f"v{i}" for i in range(args.versions)],
                        seed=seed, build_client=client, dockerd=dockerd,
                        say=(lambda s: print(s, file=sys.stderr)) if args.verbose
                        else (lambda s: None))
            print(f"soak: seed {seed}, {args.changes} changes, {args.agents} agents",
                  file=sys.stderr)
            soak.start()
            soak.converge(timeout=120)
            start = time.monotonic()
            soak.run(args.changes, chaos_probability=args.chaos)
            report["run_s"] = time.monotonic() - start
            soak.finish_chaos()
            report["converge_s"] = soak.converge(timeout=300)
            problems = soak.invariants()
            report["events"] = dict(soak.events())
            report["faults"] = {k: v for k, v in soak.counts.items() if k != "changes"}
            report["agent_restarts"] = {a.name: a.restarts for a in soak.agents}
            report["final"] = {a.name: soak.expected(a) for a in soak.agents}
        except BaseException:
            if soak is not None:
                print(soak.logs(), file=sys.stderr)
            raise
        finally:
            if soak is not None:
                soak.close()
            broker.close()
            registry.close()
            if dockerd is not None:
                dockerd.close()
    report["invariant_violations"] = problems
    report["docker0_intact"] = bridge_exists("docker0")
    rows = [["tag changes", args.changes], ["run time s", report["run_s"]],
            ["converged after the last change s", report["converge_s"]]]
    rows += [[f"fault: {k}", v] for k, v in sorted(report["faults"].items())]
    rows += [[f"event: {k}", v] for k, v in sorted(report["events"].items())]
    rows += [["agent restarts", sum(report["agent_restarts"].values())],
             ["invariant violations", len(problems)]]
    print(table(rows, [f"soak (seed {seed}{', dockerd restarts' if dockerd else ''})", ""]))
    for problem in problems:
        print(f"VIOLATION: {problem}")
    path = write_results("soak-dockerd" if dockerd else "soak", report)
    print(f"wrote {path}")
    print(json.dumps({"violations": len(problems), "seed": seed}))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
