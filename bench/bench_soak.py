"""Soak: many desired-tag changes to 3 agents while the broker, the registry and the
agents fail at random, releases cannot start and clients misbehave; then the invariants.

Agents are real processes with MQTT (POLL_INTERVAL=0.05, HEALTH_TIMEOUT=1), each
with its own repository in a registry of its own (a ``PrivateRegistry``: stopping it
does not disturb anybody else) and its own container. Before a change, with
probability ``--chaos`` (default 0.12), one fault (``--faults`` picks among them):

- ``broker``: the broker restarts (SIGTERM, down 0.2-2 s);
- ``registry``: the registry stops for the next 1-3 changes;
- ``kill``: an agent is SIGKILLed;
- ``kill_at``: an agent is restarted with EDGE_AGENT_TEST_KILL_AT=<random step> so that
  it kills itself in the middle of its next update;
- ``bad_image``: a release whose image cannot start (ENTRYPOINT missing) is published as
  the fleet tag or one device's tag; every agent it reaches must answer (rolled back, or
  skipped as failed before) and keep serving a good version; then it is taken back;
- ``taken_port``: an agent's docker_config.json moves its app to a port that a socket
  holds; the agent must roll back and keep serving; then the file is put back;
- ``hostile``: junk, huge (up to 1 MiB) and deeply nested payloads: live from the
  operator on desired-tag topics (only what the agent's parser refuses), and from a
  device account on its own state and events topics (retained too) and on topics its
  ACL does not give it.

Dead agents are restarted (a restart policy); any exit but our SIGKILL is a crash and a
violation. Changes are a retained fleet tag, a retained device tag, or clearing a device
tag, 0.2-2.5 s apart, so many land in the middle of an update.

Afterwards (all back up): every agent runs exactly the last desired tag (container
label, registry digest, the app's answer, the state on the broker), exactly one app
container per agent (no ``-previous``/``-next``), the tag files agree with the
broker's retained tags, nothing pending in state.json, no image of an agent's
repository other than its current and previous one, every agent process alive and never
crashed; plus what the failed-start faults checked during the run.

``--restart-dockerd`` (opt-in) runs the agents and their containers on a private
dockerd (own socket, data root and bridge; tests/support/dockerd.py) and adds its
restart (SIGTERM, down 0.5-2 s; containers have restart policy ``always``) to the
faults. The shared daemon is never restarted.

Needs the stack (scripts/stack). Prints a summary and writes bench/results/soak.json
(soak-dockerd.json with --restart-dockerd); exit status 1 if an invariant is broken.
Run: python -m bench.bench_soak [--changes 200] [--seed N] [--restart-dockerd]
     [--faults broker,registry,kill,kill_at,bad_image,taken_port,hostile]
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

from bench.common import table, write_results
from tests.support.broker import Broker
from tests.support.chaos import ACTIONS, Soak
from tests.support.dockerd import PrivateDockerd, bridge_exists
from tests.support.registry import PrivateRegistry


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
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
    parser.add_argument("--faults", default=",".join(ACTIONS),
                        help="comma-separated faults to choose from (dockerd is added by "
                             "--restart-dockerd)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(ACTIONS))
    if unknown:
        parser.error(f"unknown fault(s): {', '.join(unknown)}")
    if args.restart_dockerd:
        faults.append("dockerd")
    client = docker.from_env(version="auto")
    broker = Broker()
    registry = PrivateRegistry()
    dockerd = PrivateDockerd() if args.restart_dockerd else None
    report: dict[str, Any] = {"seed": seed, "changes": args.changes, "agents": args.agents,
                              "chaos_probability": args.chaos, "faults_enabled": faults,
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
                        seed=seed, build_client=client, dockerd=dockerd, faults=faults,
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
    kinds = {*ACTIONS, "dockerd"}
    rows += [[f"fault: {k}", v] for k, v in sorted(report["faults"].items()) if k in kinds]
    rows += [[f"  detail: {k}", v] for k, v in sorted(report["faults"].items())
             if k not in kinds]
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
