"""Helpers shared by the bench scripts: an HTTP probe, per-process CPU and memory from
/proc, a fleet of agent processes on one broker, a machine description, and result files.

The scripts run as modules from the repository root, ``python -m bench.<name>``, so
that ``bench``, ``edge_agent`` and ``tests`` import without any ``sys.path`` edits.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import requests

from edge_agent.protocol.topics import Topics
from tests.support.broker import MqttWatcher

RESULTS = Path(__file__).resolve().parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class Probe:
    """GETs ``/version`` every 10 ms; records when each version first answered and the
    longest window in which nothing answered.

    A window starts at the first failed request and ends at the start of the next
    successful one, so it measures the same thing on the agent's and the floor's side.

    Each request may take ``timeout_s`` (0.1 s): while a container starts, Docker's
    port proxy accepts connections it cannot forward yet and they hang until the
    timeout. With 0.5 s the figures came in two clusters 0.5 s apart; a busybox answer
    takes a few ms.
    """

    def __init__(self, port: int, interval_s: float = 0.01, timeout_s: float = 0.1) -> None:
        self.url = f"http://127.0.0.1:{port}/version"
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.first_seen: dict[str, float] = {}
        self.longest_gap = 0.0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._session = requests.Session()

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._session.close()

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                response = self._session.get(self.url, timeout=self.timeout_s)
                version: str | None = response.text.strip() if response.ok else None
            except requests.RequestException:
                version = None
            if version is None:
                self.failures += 1
                if down_since is None:
                    down_since = now
            else:
                self.first_seen.setdefault(version, time.monotonic())
                if down_since is not None:
                    self.longest_gap = max(self.longest_gap, now - down_since)
                    down_since = None
            time.sleep(self.interval_s)

    def wait_for(self, version: str, timeout_s: float = 60.0) -> float:
        """When ``version`` first answered (monotonic clock)."""
        wait_for(lambda: version in self.first_seen, timeout_s, f"version {version} to answer")
        return self.first_seen[version]


def wait_for(predicate: Callable[[], object], timeout_s: float = 60.0,
             what: str = "condition", interval_s: float = 0.005) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


# -- processes ---------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float | None:
    """Proportional set size in MiB (shared pages split among their users), if readable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pids_named(name: str) -> list[int]:
    """PIDs whose executable name (comm) is ``name``, e.g. ``dockerd`` (for reading only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == name:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@dataclass
class CpuWindow:
    """CPU time of a set of processes between ``start()`` and ``stop()``."""

    pids: list[int]
    started_at: float = 0.0
    seconds: float = 0.0
    _begin: dict[int, float] = field(default_factory=dict)
    _end: dict[int, float] = field(default_factory=dict)

    def start(self) -> CpuWindow:
        self._begin = {pid: _cpu_or_none(pid) or 0.0 for pid in self.pids}
        self.started_at = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        self.seconds = time.monotonic() - self.started_at
        self._end = {pid: _cpu_or_none(pid) or self._begin[pid] for pid in self.pids}
        return self

    def cpu_s(self, pids: Iterable[int] | None = None) -> float:
        chosen = self.pids if pids is None else list(pids)
        return sum(self._end[p] - self._begin[p] for p in chosen)

    def percent(self, pids: Iterable[int] | None = None) -> float:
        """CPU used as a percentage of one core over the window."""
        return 100.0 * self.cpu_s(pids) / self.seconds if self.seconds else 0.0


def _cpu_or_none(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


# -- a fleet of agents ------------------------------------------------------------------

def state_of(watcher: MqttWatcher, topics: Topics, name: str) -> dict[str, Any] | None:
    """The latest state document ``watcher`` saw from device ``name``."""
    last = watcher.last(topics.state(name))
    if last is None:
        return None
    document: dict[str, Any] = last.json()
    return document


def is_settled(state: dict[str, Any] | None, tag: str) -> bool:
    """The device runs ``tag``, verified (update idle) and its container running."""
    return bool(state and state["running"]["tag"] == tag and state["update"]["status"] == "idle"
                and state["running"]["status"] == "running")


def remove_containers(client: docker.DockerClient, name_prefix: str) -> None:
    """The bench's own containers (their names start with ``name_prefix``)."""
    for container in client.containers.list(all=True):
        if (container.name or "").startswith(name_prefix):
            container.remove(force=True)


# -- numbers -----------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0-100) of a non-empty list."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "p90": percentile(values, 90),
        "n": len(values),
    }


def by_mode(sides: dict[str, list[dict[str, float]]], gap_s: float = 0.5
            ) -> dict[str, dict[str, Any]]:
    """Split update rounds into "fast" and "slow" ones by their downtime.

    The first answer of a freshly started container sometimes comes ~0.75 s late, on the
    agent's and the floor's side alike (see docs/BENCHMARKS.md), so a median over a few
    rounds mostly says how many rounds happened to be slow. A round is slow when its
    downtime exceeds the smallest downtime of all rounds by more than ``gap_s``; each
    side's medians are then given per mode, with the share of slow rounds.
    """
    lowest = min(s["downtime_s"] for samples in sides.values() for s in samples)
    out: dict[str, dict[str, Any]] = {}
    for side, samples in sides.items():
        modes: dict[str, Any] = {}
        for mode in ("fast", "slow"):
            chosen = [s for s in samples if (s["downtime_s"] > lowest + gap_s) == (mode == "slow")]
            modes[mode] = {
                "n": len(chosen),
                "latency_median_s": statistics.median(s["latency_s"] for s in chosen)
                if chosen else None,
                "downtime_median_s": statistics.median(s["downtime_s"] for s in chosen)
                if chosen else None,
            }
        modes["slow_share"] = modes["slow"]["n"] / len(samples)
        out[side] = modes
    return out


# -- machine and results ---------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    try:
        with open("/proc/meminfo") as handle:
            total_kb = int(handle.readline().split()[1])
        info["memory_gib"] = round(total_kb / 1024 / 1024, 1)
        with open("/proc/cpuinfo") as handle:
            models = [line.split(":", 1)[1].strip() for line in handle
                      if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
    except OSError:
        pass
    try:
        client = docker.from_env(version="auto")
        version = client.version()
        info["docker"] = version.get("Version")
        info["storage_driver"] = client.info().get("Driver")
        client.close()
    except docker.errors.DockerException:
        info["docker"] = None
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()
        info["mosquitto"] = first[0] if first else None
    except OSError:
        info["mosquitto"] = None
    info["loadavg_when_written"] = os.getloadavg()  # other users of the machine show here
    return info


def write_results(name: str, data: dict[str, Any]) -> Path:
    """``bench/results/<name>.json`` with the machine description and a timestamp."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(), **data}
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain text table; floats with 3 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
