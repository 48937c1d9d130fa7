"""edge-bridge throughput and end-to-end latency, on the real broker.

1. ``GET /api/v1/devices`` with 100 devices: requests per second and latency, with
   keep-alive clients at several concurrencies and once without keep-alive. The
   devices are simulated (one MQTT client publishing 100 retained agent-shaped states);
   the bridge runs as its own process (``edge-bridge``), the load comes from separate
   client processes, all on this machine.
2. ``PUT /api/v1/devices/<id>/tag?wait=60`` end to end with a real agent
   (``python -m edge_agent``, real Docker and registry): from sending the request to the
   bridge's 200, i.e. publish, the agent's update (container swap and HEALTHCHECK
   verification; the two images alternate and are local after the first round), and the
   state coming back. Also the same tag again ("nothing to change"), which is the bare
   bridge -> broker -> agent -> broker -> bridge round trip.

Needs the stack (scripts/stack). Prints a table and writes bench/results/bridge.json.
Run: python -m bench.bench_bridge [--seconds 5] [--rounds 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker

from tests.bridge.support import (
    TOKEN,
    ApiClient,
    SimulatedDevices,
    add_simulator_user,
    spawn_agent,
    unique_prefix,
)
from tests.support import DEFAULT_REGISTRY, wait_until
from tests.support.bridge_process import BridgeProcess
from tests.support.broker import Broker
from tests.support.containers import remove_test_containers
from tests.support.images import build_and_push, remove_repo_images

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = 100


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0-100) of a non-empty list."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values),
            "mean": statistics.fmean(values)}


# -- part 1: GET /api/v1/devices ----------------------------------------------------------
def _load_worker(url: str, seconds: float, keepalive: bool, out: Any) -> None:
    parts = urlsplit(url)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if not keepalive:
        headers["Connection"] = "close"
    latencies: list[float] = []
    errors = 0
    conn: http.client.HTTPConnection | None = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if conn is None:
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                              timeout=10)
        start = time.perf_counter()
        try:
            conn.request("GET", "/api/v1/devices", headers=headers)
            response = conn.getresponse()
            body = response.read()
            ok = response.status == HTTPStatus.OK and body.count(b'"id":') == DEVICES
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = None
        latencies.append(time.perf_counter() - start)
        errors += not ok
        if not keepalive and conn is not None:
            conn.close()
            conn = None
    out.put((latencies, errors))


def load(url: str, clients: int, seconds: float, keepalive: bool = True) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_load_worker, args=(url, seconds, keepalive, queue))
               for _ in range(clients)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    latencies = [lat for lats, _ in results for lat in lats]
    errors = sum(err for _, err in results)
    return {"clients": clients, "keepalive": keepalive, "seconds": elapsed,
            "requests": len(latencies), "errors": errors,
            "rps": len(latencies) / seconds,
            "latency_ms": {k: v * 1000 if k != "n" else v
                           for k, v in summary(latencies).items()}}


# -- part 2: PUT ?wait with a real agent ----------------------------------------------------
def put_wait_rounds(api: ApiClient, device_id: str, rounds: int) -> dict[str, Any]:
    changed: list[float] = []
    unchanged: list[float] = []
    statuses: list[int] = []
    tags = ("2.0", "1.0")
    for i in range(rounds):
        tag = tags[i % 2]
        for bucket in (changed, unchanged):  # the new tag, then the same tag again
            start = time.perf_counter()
            response = api.put(f"/api/v1/devices/{device_id}/tag?wait=60", json={"tag": tag})
            bucket.append(time.perf_counter() - start)
            statuses.append(response.status_code)
            if response.status_code != HTTPStatus.OK:
                raise RuntimeError(f"PUT {tag}: {response.status_code} {response.text}")
    return {"changed_s": summary(changed), "unchanged_s": summary(unchanged),
            "samples_changed_s": changed, "samples_unchanged_s": unchanged,
            "statuses": sorted(set(statuses))}


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load level")
    parser.add_argument("--rounds", type=int, default=20, help="tag changes with a real agent")
    parser.add_argument("--clients", default="1,4,16", help="keep-alive concurrencies")
    args = parser.parse_args()
    results: dict[str, Any] = {"devices": DEVICES, "cpus": os.cpu_count()}
    docker_client = docker.from_env(version="auto")
    run_id = uuid.uuid4().hex[:8]
    repo = f"{DEFAULT_REGISTRY}/bench{run_id}/app"
    work = Path(tempfile.mkdtemp(prefix="edge-bench-bridge-"))
    agent = None
    with Broker() as broker:
        broker.add_operator("bridge")
        add_simulator_user(broker)
        prefix = unique_prefix()
        sim = SimulatedDevices(broker, prefix).start()
        sim.add([f"sim-{i:03d}" for i in range(DEVICES - 1)])
        bridge = BridgeProcess(broker, prefix, TOKEN, work / "bridge.log",
                               log_level="WARNING").start()
        url = bridge.url
        try:
            with ApiClient(url) as api:
                wait_until(lambda: len(api.get("/api/v1/devices").json()["devices"])
                           == DEVICES - 1, timeout=30, message="99 simulated devices")
                # the 100th device is the real agent
                for version in ("1.0", "2.0"):
                    build_and_push(repo, version, version, "healthy")
                remove_repo_images(repo, client=docker_client)
                agent = spawn_agent(broker, prefix, f"edge-bench-{run_id}", repo, "1.0", work)
                wait_until(lambda: (api.get(f"/api/v1/devices/{agent.device_id}").json()
                                    .get("state") or {}).get("installed_version") == "1.0"
                           and agent.serving() == "1.0", timeout=60, message="agent on 1.0")

                runs = [load(url, int(c), args.seconds) for c in args.clients.split(",")]
                runs.append(load(url, 4, args.seconds, keepalive=False))
                results["get_devices"] = runs
                results["put_wait"] = put_wait_rounds(api, agent.device_id, args.rounds)
        finally:
            bridge.stop()
            sim.close()
            if agent is not None:
                agent.stop()
            remove_test_containers(docker_client, run_id, f"edge-bench-{run_id}")
            remove_repo_images(repo, client=docker_client)
            shutil.rmtree(work, ignore_errors=True)

    print(f"GET /api/v1/devices, {DEVICES} devices, {args.seconds:g} s per row, "
          f"{os.cpu_count()} CPUs shared by bridge, broker and clients")
    print(f"{'clients':>8} {'keep-alive':>10} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7}")
    for run in results["get_devices"]:
        lat = run["latency_ms"]
        print(f"{run['clients']:>8} {'yes' if run['keepalive'] else 'no':>10} "
              f"{run['rps']:>8.0f} {lat['p50']:>8.2f} {lat['p99']:>8.2f} {run['errors']:>7}")
    put = results["put_wait"]
    print(f"\nPUT /api/v1/devices/<id>/tag?wait=60 with a real agent, {args.rounds} rounds")
    print(f"{'case':>28} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max s':>7}")
    for name, key in (("tag changed (update)", "changed_s"),
                      ("same tag (nothing to do)", "unchanged_s")):
        s = put[key]
        print(f"{name:>28} {s['p50']:>7.3f} {s['p90']:>7.3f} {s['p99']:>7.3f} {s['max']:>7.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bridge.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {RESULTS / 'bridge.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
