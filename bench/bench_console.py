"""The operator console (the bridge's page at ``/``) with N simulated devices: the
simulator (bench/fleet_sim.py), one Mosquitto and the real bridge, set up as
bench_scale does (its pieces, imported).

Measured, in order:
1. load, in headless Chromium: from the token entered to the first page of the device
   list rendered (``#page-info`` reads "1-50 of N" and the first device's row is there)
   and to the overview rendered (the counts say "N devices"); then after a reload, from
   the navigation's start. Times are taken in the page (``performance.now()``, polled
   every 5 ms by a script Chromium runs in every new document), not by the driver;
2. filters: from the Filter button to the result shown (``#page-info``), for a search
   for one device, a version (the tag every device runs), a group, and a status (online:
   the bridge filters and sorts every device); each ``--filter-runs`` times;
3. the bridge's CPU and RSS during steady fleet activity (device tags published over MQTT
   at ``--rate`` per second, each a simulated update of ``--update-s``) with no page open,
   then with ``--pages`` pages open (a Chromium per 5 pages, a window each: Chromium
   keeps at most 6 connections to one host; every page holds the
   live stream ``GET /api/v1/stream`` and reloads its page of the list as devices
   change), each for ``--window`` seconds, in the same run. State messages the broker
   delivered in each window are counted too (an operator subscription), to give the
   bridge's CPU per state message.

Prints a table and writes bench/results/console.json (``--out`` elsewhere).
Run: python -m bench.bench_console [--devices 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paho.mqtt.client import Client, MQTTMessage

from bench.bench_scale import PASSWORD, TOKEN, SimProcess, view_is, wait
from bench.common import CpuWindow, rss_mb, table, write_results
from bench.fleet_sim import device_ids, group_rule
from edge_agent.protocol.mqtt import connect_client, disconnect_client
from edge_agent.protocol.settings import MqttSettings
from edge_agent.protocol.tags import desired_tag_payload, new_request_id
from edge_agent.protocol.timestamps import utc_now
from edge_agent.protocol.topics import Topics
from tests.support.bridge_process import BRIDGE_USER, BridgeProcess
from tests.support.broker import Broker

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

PAGE_SIZE = 50  # app.js PAGE_SIZE
PAGES_PER_BROWSER = 5
OPERATOR = "bench-operator"

# Runs in every new document: records when each check first holds (ms since the
# navigation started) in window.__marks.
RECORDER = """
window.__marks = {};
const checks = %s;
(function poll() {
  for (const [name, css, re] of checks) {
    if (window.__marks[name] !== undefined) continue;
    const node = document.querySelector(css);
    if (node && new RegExp(re).test(node.textContent)) window.__marks[name] = performance.now();
  }
  setTimeout(poll, 5);
})();
"""

# Fills the filter form, presses Filter, and answers the ms until #page-info matches.
FILTER = """
const [fields, want, done] = arguments;
const start = performance.now();
for (const [id, value] of Object.entries(fields)) document.getElementById(id).value = value;
document.getElementById("filter-apply").click();
(function poll() {
  if (new RegExp(want).test(document.getElementById("page-info").textContent)) {
    done(performance.now() - start);
  } else if (performance.now() - start > 120000) {
    done(null);
  } else {
    setTimeout(poll, 5);
  }
})();
"""

# Whether the page shows the first page of the list and holds its live stream.
PAGE_LIVE = """
const [total, first] = arguments;
return document.getElementById("page-info").textContent.endsWith(total)
  && document.getElementById("link").textContent === "bridge: live"
  && document.querySelector(`#devices tbody tr[data-device="${first}"]`) !== null;
"""

# Enters the token as a user would (the form) and answers performance.now() at the click.
ENTER_TOKEN = """
document.getElementById("token").value = arguments[0];
const at = performance.now();
document.getElementById("token-save").click();
return at;
"""


def first_page(n: int) -> str:
    return f"^1-{min(PAGE_SIZE, n)} of {n}$"


def load_checks(n: int, first_id: str) -> list[list[str]]:
    return [["list", "#page-info", first_page(n)],
            ["first_row", f'#devices tbody tr[data-device="{first_id}"]', "."],
            ["overview", "#counts li:first-child", f"^{n} devices$"]]


def wait_marks(driver: WebDriver, names: list[str], timeout_s: float) -> dict[str, float]:
    marks: dict[str, float] = {}

    def rendered() -> bool:
        marks.update(driver.execute_script("return window.__marks || {}"))
        return set(names) <= set(marks)

    wait(rendered, timeout_s, "the page to render", 0.05)
    return marks


def open_console(driver: WebDriver, url: str, n: int, first_id: str) -> dict[str, float]:
    """Load the page, enter the token: ms from the click to list and overview shown."""
    driver.get(f"{url}/")
    clicked = float(driver.execute_script(ENTER_TOKEN, TOKEN))
    marks = wait_marks(driver, ["list", "first_row", "overview"], 300)
    return {"list_s": (max(marks["list"], marks["first_row"]) - clicked) / 1000,
            "overview_s": (marks["overview"] - clicked) / 1000}


def page_figures(url: str, ids: list[str], groups: int, work: Path,
                 filter_runs: int = 3) -> dict[str, Any]:
    """Load, reload and filter times of the console in headless Chromium."""
    from tests.bridge.browser import chromium  # noqa: PLC0415 - selenium: only here

    n, first_id = len(ids), min(ids)
    in_group = sum(1 for device in ids if "g1" in group_rule(groups)(device))
    with chromium(work / "chromium-figures") as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                               {"source": RECORDER % json.dumps(load_checks(n, first_id))})
        driver.set_script_timeout(180)
        report: dict[str, Any] = {"token_to": open_console(driver, url, n, first_id)}
        driver.refresh()
        marks = wait_marks(driver, ["list", "first_row", "overview"], 300)
        report["reload_to"] = {"list_s": max(marks["list"], marks["first_row"]) / 1000,
                               "overview_s": marks["overview"] / 1000}
        cases = {"search_one": ({"filter-q": ids[-1]}, "^1-1 of 1$")}
        cases["version"] = ({"filter-tag": "1.0"}, first_page(n))
        if in_group:
            cases["group"] = ({"filter-group": "g1"}, f"^1-{min(PAGE_SIZE, in_group)} of "
                                                      f"{in_group}$")
        cases["status_online"] = ({"filter-status": "online"}, first_page(n))
        blank = dict.fromkeys(("filter-q", "filter-group", "filter-tag", "filter-status"), "")
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(filter_runs):
            for name, (fields, want) in cases.items():
                took = driver.execute_async_script(FILTER, {**blank, **fields}, want)
                if took is None:
                    raise TimeoutError(f"the {name} filter never showed {want}")
                times[name].append(float(took) / 1000)
        report["filter_s"] = {name: {"median": statistics.median(values), "max": max(values)}
                              for name, values in times.items()}
    return report


class TagActivity:
    """Device tags published at a steady rate (a new tag each time round the fleet), so
    that devices keep updating; counts the state messages the broker delivers."""

    def __init__(self, settings: MqttSettings, ids: list[str], rate: float) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.ids, self.rate = ids, rate
        self.client: Client | None = None
        self.sent = 0
        self._states = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self, _client: Client, _message: MQTTMessage) -> None:
        with self._lock:
            self._states += 1

    def states(self) -> int:
        with self._lock:
            return self._states

    def start(self) -> TagActivity:
        subscribed = threading.Event()
        self.client = connect_client(
            self.settings, f"bench-activity-{uuid.uuid4().hex[:8]}",
            subscriptions=[self.topics.all_states], on_message=self._count,
            on_subscribed=lambda _c: subscribed.set())
        if not subscribed.wait(30):
            raise TimeoutError("no SUBACK for the state subscription")
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self.client is not None
        start = time.monotonic()
        while not self._stop.is_set():
            device = self.ids[self.sent % len(self.ids)]
            tag = f"1.{self.sent // len(self.ids) + 1}"
            self.client.publish(self.topics.device_tag(device),
                                desired_tag_payload(tag, new_request_id(), utc_now()), qos=1)
            self.sent += 1
            self._stop.wait(max(0.0, start + self.sent / self.rate - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.client is not None:
            disconnect_client(self.client)


def measure_window(bridge: BridgeProcess, activity: TagActivity, seconds: float
                   ) -> dict[str, float]:
    states = activity.states()
    window = CpuWindow([bridge.pid]).start()
    time.sleep(seconds)
    window.stop()
    delivered = activity.states() - states
    cpu_s = window.cpu_s([bridge.pid])
    return {"bridge_cpu_percent": window.percent([bridge.pid]), "bridge_cpu_s": cpu_s,
            "bridge_rss_mb": rss_mb(bridge.pid), "state_messages": delivered,
            "bridge_cpu_ms_per_state": 1000 * cpu_s / delivered if delivered else 0.0}


def open_pages(driver: WebDriver, url: str, ids: list[str], pages: int) -> None:
    """``pages`` windows of one browser on the console, each with the token and its
    live stream."""
    n, first_id = len(ids), min(ids)
    for index in range(pages):
        if index:
            driver.switch_to.new_window("window")
        driver.get(f"{url}/")
        wait(lambda: bool(driver.execute_script("return !!document.getElementById('token')")),
             120, "the console page to load", 0.1)
        driver.execute_script(ENTER_TOKEN, TOKEN)
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        wait(lambda: bool(driver.execute_script(PAGE_LIVE, f" of {n}", first_id)), 300,
             "a console page to load", 0.2)


def pages_cpu(broker: Broker, bridge: BridgeProcess, ids: list[str],  # noqa: PLR0913
              args: argparse.Namespace, work: Path, *, prefix: str) -> dict[str, Any]:
    """Bridge CPU during steady tag activity: no page open, then ``args.pages`` open."""
    from tests.bridge.browser import chromium  # noqa: PLC0415 - selenium: only here

    activity = TagActivity(broker.settings(OPERATOR, prefix=prefix), ids, args.rate).start()
    try:
        time.sleep(args.update_s + 2)  # updates finishing as fast as they start
        report: dict[str, Any] = {"rate_per_s": args.rate, "update_s": args.update_s,
                                  "window_s": args.window, "pages": args.pages}
        report["no_page"] = measure_window(bridge, activity, args.window)
        # Chromium opens at most 6 HTTP/1.1 connections to one host per profile, and
        # each page's stream holds one: 5 pages a browser, so that none starves
        sizes = [min(PAGES_PER_BROWSER, args.pages - start)
                 for start in range(0, args.pages, PAGES_PER_BROWSER)]
        with contextlib.ExitStack() as browsers:
            started = time.monotonic()
            drivers = [browsers.enter_context(chromium(work / f"chromium-pages{index}"))
                       for index in range(len(sizes))]
            for driver, size in zip(drivers, sizes, strict=True):
                open_pages(driver, bridge.url, ids, size)
            report["pages_open_s"] = time.monotonic() - started
            time.sleep(2)
            report["pages_open"] = measure_window(bridge, activity, args.window)
            report["streams_held"] = sum(len(d.window_handles) for d in drivers)
            report["browsers"] = len(drivers)
        report["tags_published"] = activity.sent
    finally:
        activity.stop()
    return report


def rows(report: dict[str, Any]) -> list[list[Any]]:
    page = report["page"]
    out: list[list[Any]] = [
        ["token -> first page of the list s", page["token_to"]["list_s"]],
        ["token -> overview s", page["token_to"]["overview_s"]],
        ["reload -> first page of the list s", page["reload_to"]["list_s"]],
        ["reload -> overview s", page["reload_to"]["overview_s"]],
    ]
    for name, figures in page["filter_s"].items():
        out.append([f"filter {name}: median s (max)",
                    f"{figures['median']:.3f} ({figures['max']:.3f})"])
    if "pages" in report:
        p = report["pages"]
        out.append([f"activity: device tags/s ({p['update_s']:g} s updates)", p["rate_per_s"]])
        for key, label in (("no_page", "no page"), ("pages_open", f"{p['pages']} pages")):
            w = p[key]
            out += [[f"bridge CPU % ({label})", w["bridge_cpu_percent"]],
                    [f"bridge RSS MiB ({label})", w["bridge_rss_mb"]],
                    [f"state messages/s ({label})", w["state_messages"] / p["window_s"]],
                    [f"bridge CPU ms per state ({label})", w["bridge_cpu_ms_per_state"]]]
    return out


def main() -> int:  # noqa: PLR0915 - one measurement, read top to bottom
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=10)
    parser.add_argument("--update-s", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=20.0,
                        help="device tags published per second during the CPU windows")
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--window", type=float, default=30.0,
                        help="seconds of each CPU window")
    parser.add_argument("--filter-runs", type=int, default=3)
    parser.add_argument("--connect-rate", type=float, default=2000.0)
    parser.add_argument("--out", default="console",
                        help="result name under bench/results/ (NAME.json), or a path")
    args = parser.parse_args()
    n, run_id = args.devices, uuid.uuid4().hex[:6]
    prefix = f"console{run_id}"
    ids = device_ids(f"c{run_id}-", n)
    report: dict[str, Any] = {"devices": n, "groups": args.groups}
    broker = Broker()
    bridge: BridgeProcess | None = None
    sim: SimProcess | None = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            broker.start()
            broker.add_operator(BRIDGE_USER)
            broker.add_operator(OPERATOR)
            broker.add_devices(ids, group_rule(args.groups), PASSWORD)
            bridge = BridgeProcess(broker, prefix, TOKEN, work / "bridge.log",
                                   log_level="WARNING", REGISTRY_CHECK="false").start()
            sim = SimProcess(["--devices", str(n), "--port", str(broker.port),
                              "--prefix", prefix, "--name-prefix", f"c{run_id}-",
                              "--groups", str(args.groups), "--update-s", str(args.update_s),
                              "--connect-rate", str(args.connect_rate)])
            wait(lambda: sim is not None and sim.value("online") == n, max(120.0, n / 20),
                 "every simulated device online")
            wait(lambda: view_is(bridge, set(ids), "1.0"), max(120.0, n / 20),
                 "the bridge to know every device", interval_s=1.0)
            time.sleep(2)
            report["page"] = page_figures(bridge.url, ids, args.groups, work, args.filter_runs)
            print(f"page: {json.dumps(report['page'])}", file=sys.stderr)
            report["pages"] = pages_cpu(broker, bridge, ids, args, work, prefix=prefix)
        except BaseException:
            if bridge is not None:
                print(bridge.log()[-3000:], file=sys.stderr)
            raise
        finally:
            if sim is not None:
                errors = sim.stop()
                if errors.strip():
                    print(f"simulator stderr:\n{errors[-2000:]}", file=sys.stderr)
            if bridge is not None:
                bridge.stop()
            broker.close()
    print(table(rows(report), [f"console, {n} simulated devices", "value"]))
    out = Path(args.out)
    if out.parent == Path():
        path = write_results(args.out, report)
    else:
        out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        path = out
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
