"""The operator side at fleet scale: N simulated devices (default 10,000; the fleet
simulator, bench/fleet_sim.py, as its own process) on one Mosquitto (the shipped
config and ACL, every device logged in as itself), with the real bridge
(``edge-bridge`` as its own process, BRIDGE_DATA_DIR set for rollouts).

Measured, in order:
1. connect: the time until every device is online in the simulator and until the
   bridge knows every device's state; CPU of broker, bridge and simulator meanwhile;
2. idle: broker, bridge and simulator RSS and CPU over ``--idle`` seconds;
3. ``GET /api/v1/devices``: p50/p99 of ``--requests`` sequential requests, and its size;
   the same for the console's queries (a page of 50, a status filter, a search);
4. ``GET /metrics``: the scrape time (p50/max) and size;
5. the console page in headless Chromium: from entering the token to the first page of
   the device list and to the overview, after a reload, and the time a filter takes to
   show its result (bench_console's ``page_figures``);
6. a rollout of every device (``--waves``, ``--max-updating``, each update taking
   ``--update-s`` in the simulator) against its ideal duration: the sum over the
   waves of ceil(wave size / max_updating) x update time;
7. the broker restarted (SIGTERM, started again on its persistence) with every device
   connected: the time until every device is online again in the simulator, and until
   the bridge shows every device online with the rolled-out tag.

The bridge's registry check is off (REGISTRY_CHECK=false): the simulated devices name
an image no registry holds. Needs Mosquitto and Chromium (scripts/stack), not Docker.
Prints a table and writes bench/results/scale.json (``--out`` elsewhere).
Run: python -m bench.bench_scale [--devices 10000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench.common import CpuWindow, percentile, rss_mb, table, write_results
from bench.fleet_sim import device_ids, group_rule
from tests.support import REPO_ROOT
from tests.support.bridge_process import BRIDGE_USER, BridgeProcess
from tests.support.broker import Broker

TOKEN = "bench-token-" + "s" * 24
PASSWORD = "bench-" + uuid.uuid4().hex
DEFAULT_WAVES: list[int | str] = [10, "10%", "50%", "100%"]
NAMES = ("broker", "bridge", "simulator")
STATUS_RE = re.compile(r"(\w+)=(\d+)")


class SimProcess:
    """``python -m bench.fleet_sim`` as its own process; its status lines, parsed."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fleet_sim", *args], cwd=REPO_ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "FLEET_SIM_PASSWORD": PASSWORD})
        self.latest: dict[str, int] = {}
        self.peak_updating = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            values = {k: int(v) for k, v in STATUS_RE.findall(line)}
            with self._lock:
                self.latest = values
                self.peak_updating = max(self.peak_updating, values.get("updating", 0))

    def value(self, key: str) -> int:
        with self._lock:
            return self.latest.get(key, 0)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def wait(predicate: Callable[[], bool], timeout_s: float, what: str,
         interval_s: float = 0.2) -> float:
    """Seconds until ``predicate`` holds (TimeoutError after ``timeout_s``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - start


def fleet_view(bridge: BridgeProcess) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = bridge.get("/api/v1/devices").json()["devices"]
    return devices


def view_is(bridge: BridgeProcess, ids: set[str], tag: str | None, *,
            online: bool = True) -> bool:
    """The bridge shows every device in ``ids`` (online, running ``tag`` when given)."""
    seen = set()
    for device in fleet_view(bridge):
        state = device.get("state") or {}
        if device["id"] not in ids or (online and not device.get("online")):
            continue
        if tag is not None and (state.get("running") or {}).get("tag") != tag:
            continue
        if "groups" in state:
            seen.add(device["id"])
    return seen == ids


def timed_gets(session: requests.Session, url: str, count: int) -> dict[str, Any]:
    times, size = [], 0
    for _ in range(count):
        start = time.perf_counter()
        response = session.get(url, timeout=120)
        response.raise_for_status()
        size = len(response.content)
        times.append(time.perf_counter() - start)
    return {"p50_s": percentile(times, 50), "p99_s": percentile(times, 99),
            "max_s": max(times), "n": count, "bytes": size}


def filtered_queries(ids: list[str]) -> dict[str, str]:
    """The console's list queries: a page sorted by id, a status filter (every device
    matches: the bridge still filters and sorts all), and a search for one device."""
    return {"page": "sort=id&limit=50&offset=0",
            "status_online": "status=online&sort=id&limit=50",
            "search_one": f"q={ids[-1]}&sort=id&limit=50"}


def nonempty_waves(waves: list[Any], devices: int) -> list[tuple[Any, int]]:
    """Each wave with the number of devices it adds (the bridge's reading of counts and
    shares); waves a small fleet has already reached are left out (the bridge refuses
    an empty wave)."""
    kept, reached = [], 0
    for wave in waves:
        if isinstance(wave, str) and wave.endswith("%"):
            upto = math.ceil(float(wave[:-1]) * devices / 100)
        else:
            upto = reached + int(wave)
        upto = min(upto, devices)
        if upto > reached:
            kept.append((wave, upto - reached))
            reached = upto
    return kept


def rollout(bridge: BridgeProcess, sim: SimProcess, args: argparse.Namespace,
            ids: set[str], pids: list[int]) -> dict[str, Any]:
    kept = nonempty_waves(json.loads(args.waves), len(ids))
    waves, sizes = [wave for wave, _ in kept], [size for _, size in kept]
    ideal = sum(math.ceil(size / args.max_updating) for size in sizes) * args.update_s
    window = CpuWindow(pids).start()
    start = time.monotonic()
    response = bridge.post("/api/v1/rollouts", {
        "tag": "2.0", "target": {"fleet": True}, "waves": waves,
        "max_updating": args.max_updating, "wave_timeout_s": max(600.0, 4 * ideal)})
    if response.status_code != 201:  # noqa: PLR2004 - created
        raise RuntimeError(f"rollout refused: {response.status_code} {response.text}")
    rollout_id = response.json()["id"]
    document = bridge.wait_rollout(rollout_id, ["succeeded", "halted", "aborted"],
                                   timeout=max(900.0, 6 * ideal))
    took = time.monotonic() - start
    window.stop()
    return {"state": document["state"], "waves": waves, "wave_sizes": sizes,
            "max_updating": args.max_updating, "update_s": args.update_s,
            "duration_s": took, "ideal_s": ideal, "overhead_s": took - ideal,
            "peak_updating": sim.peak_updating,
            "cpu_percent": {name: window.percent([pid]) for name, pid in
                            zip(NAMES, pids, strict=True)}}


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--update-s", type=float, default=20.0)
    parser.add_argument("--max-updating", type=int, default=500)
    parser.add_argument("--waves", default=json.dumps(DEFAULT_WAVES))
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle measurement")
    parser.add_argument("--requests", type=int, default=50,
                        help="GET /api/v1/devices requests timed")
    parser.add_argument("--connect-rate", type=float, default=2000.0)
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: "
                        "page, rollout, restart")
    parser.add_argument("--out", default="scale",
                        help="result name under bench/results/ (NAME.json), or a path")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    n = args.devices
    run_id = uuid.uuid4().hex[:6]
    prefix = f"scale{run_id}"
    ids = device_ids(f"s{run_id}-", n)
    id_set = set(ids)
    report: dict[str, Any] = {"devices": n, "groups": args.groups,
                              "broker_acl": "shipped mosquitto.conf and acl; every device "
                                            "its own user (password file, ACL section)"}
    broker = Broker()
    bridge: BridgeProcess | None = None
    sim: SimProcess | None = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            broker.start()
            broker.add_operator(BRIDGE_USER)
            broker.add_devices(ids, group_rule(args.groups), PASSWORD)
            (work / "bridge").mkdir()
            bridge = BridgeProcess(broker, prefix, TOKEN, work / "bridge.log",
                                   data_dir=work / "bridge", log_level="WARNING",
                                   REGISTRY_CHECK="false").start()
            assert broker.pid is not None
            sim = SimProcess(["--devices", str(n), "--port", str(broker.port),
                              "--prefix", prefix, "--name-prefix", f"s{run_id}-",
                              "--groups", str(args.groups), "--update-s", str(args.update_s),
                              "--connect-rate", str(args.connect_rate)])
            pids = [broker.pid, bridge.pid, sim.proc.pid]
            connect = CpuWindow(pids).start()
            online_s = wait(lambda: sim is not None and sim.value("online") == n,
                            max(120.0, n / 20), "every simulated device online")
            known_s = online_s + wait(lambda: view_is(bridge, id_set, "1.0"), max(120.0, n / 20),
                           "the bridge to know every device", interval_s=1.0)
            connect.stop()
            report["connect"] = {"all_online_s": online_s, "bridge_knows_all_s": known_s,
                                 "cpu_s": dict(zip(NAMES,
                                                   (connect.cpu_s([p]) for p in pids),
                                                   strict=True))}
            print(f"{n} devices online after {online_s:.1f} s, known to the bridge after "
                  f"{known_s:.1f} s", file=sys.stderr)

            time.sleep(2)
            idle = CpuWindow(pids).start()
            time.sleep(args.idle)
            idle.stop()
            report["idle"] = {name: {"rss_mb": rss_mb(pid), "cpu_percent": idle.percent([pid])}
                              for name, pid in zip(NAMES, pids,
                                                   strict=True)}
            report["devices_api"] = timed_gets(bridge.session, f"{bridge.url}/api/v1/devices",
                                               args.requests)
            report["devices_api_filtered"] = {
                name: timed_gets(bridge.session, f"{bridge.url}/api/v1/devices?{query}",
                                 args.requests)
                for name, query in filtered_queries(ids).items()}
            report["metrics"] = timed_gets(bridge.session, f"{bridge.url}/metrics", 20)
            if "page" not in skip:
                # the console's figures, as bench_console takes them (it imports this module)
                from bench.bench_console import page_figures  # noqa: PLC0415
                report["page"] = page_figures(bridge.url, ids, args.groups, work)
            if "rollout" not in skip:
                report["rollout"] = rollout(bridge, sim, args, id_set, pids)
                print(f"rollout {report['rollout']['state']} after "
                      f"{report['rollout']['duration_s']:.1f} s (ideal "
                      f"{report['rollout']['ideal_s']:.0f} s)", file=sys.stderr)
            tag = "2.0" if "rollout" not in skip else "1.0"
            if "restart" not in skip:
                broker.stop()
                down_at = time.monotonic()
                wait(lambda: sim is not None and sim.value("online") == 0, 60,
                     "the simulator to see the broker gone", interval_s=0.05)
                broker.start()
                started_at = time.monotonic()
                assert broker.pid is not None
                pids[0] = broker.pid
                recovery = CpuWindow(pids).start()
                back_s = wait(lambda: sim is not None and sim.value("online") == n,
                              max(300.0, n / 10), "every device back online", interval_s=0.1)
                correct_s = back_s + wait(lambda: view_is(bridge, id_set, tag), max(300.0, n / 10),
                                 "the bridge's view to be correct", interval_s=0.5)
                recovery.stop()
                report["restart"] = {"broker_down_s": started_at - down_at,
                                     "all_online_again_s": back_s,
                                     "bridge_view_correct_s": correct_s,
                                     "cpu_s": {name: recovery.cpu_s([pid]) for name, pid in
                                               zip(NAMES, pids, strict=True)}}
            report["after"] = {name: {"rss_mb": rss_mb(pid)} for name, pid in
                               zip(NAMES, pids, strict=True)}
        except BaseException:
            if bridge is not None:
                print(bridge.log()[-3000:], file=sys.stderr)
            print(broker.log()[-2000:], file=sys.stderr)
            raise
        finally:
            if sim is not None:
                errors = sim.stop()
                if errors.strip():
                    print(f"simulator stderr:\n{errors[-2000:]}", file=sys.stderr)
            if bridge is not None:
                bridge.stop()
            broker.close()
    print(table(rows(report), [f"{n} simulated devices", "value"]))
    out = Path(args.out)
    path = write_results(args.out, report) if out.parent == Path() else _write(out, report)
    print(f"wrote {path}")
    return 0


def _write(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


def rows(report: dict[str, Any]) -> list[list[Any]]:
    out: list[list[Any]] = [
        ["all online after start s", report["connect"]["all_online_s"]],
        ["bridge knows all after start s", report["connect"]["bridge_knows_all_s"]],
    ]
    for name in ("broker", "bridge", "simulator"):
        idle = report["idle"][name]
        out += [[f"{name} RSS MiB (idle)", idle["rss_mb"]],
                [f"{name} CPU % of a core (idle)", idle["cpu_percent"]],
                [f"{name} CPU s to connect all", report["connect"]["cpu_s"][name]]]
    api, metrics = report["devices_api"], report["metrics"]
    out += [["GET /api/v1/devices p50 s", api["p50_s"]],
            ["GET /api/v1/devices p99 s", api["p99_s"]],
            ["GET /api/v1/devices KiB", api["bytes"] / 1024],
            *[[f"GET /api/v1/devices?{name} p{p} s", figures[f"p{p}_s"]]
              for name, figures in report.get("devices_api_filtered", {}).items()
              for p in (50, 99)],
            ["GET /metrics p50 s", metrics["p50_s"]], ["GET /metrics max s", metrics["max_s"]],
            ["GET /metrics KiB", metrics["bytes"] / 1024]]
    if "page" in report:
        page = report["page"]
        out += [["console: token to first page of the list s", page["token_to"]["list_s"]],
                ["console: token to overview s", page["token_to"]["overview_s"]],
                ["console: reload to first page of the list s", page["reload_to"]["list_s"]],
                *[[f"console: filter {name} median s", figures["median"]]
                  for name, figures in page["filter_s"].items()]]
    if "rollout" in report:
        r = report["rollout"]
        out += [[f"rollout {r['waves']} max {r['max_updating']}: state", r["state"]],
                ["rollout duration s", r["duration_s"]],
                [f"rollout ideal s ({r['update_s']:g} s per update)", r["ideal_s"]],
                ["rollout peak devices updating", r["peak_updating"]]]
        out += [[f"{name} CPU % during rollout", r["cpu_percent"][name]]
                for name in ("broker", "bridge", "simulator")]
    if "restart" in report:
        out += [["broker restart: all online again s", report["restart"]["all_online_again_s"]],
                ["broker restart: bridge view correct s",
                 report["restart"]["bridge_view_correct_s"]]]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
