"""The subcommands end to end: ``edge-ctl`` against a real Mosquitto (from
``mosquitto/``), real agent processes, the real Docker daemon and the test registry, and
devices that publish hostile data. edge-ctl runs as its own process, as an operator
would run it. (Its parts: test_cli.py, test_session.py, test_waiting.py, test_render.py.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.ctl.commands import watch_line
from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from edge_agent.ctl.render import Printer
from edge_agent.protocol.mqtt import Incoming
from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT, free_port, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.device import Device, publish
from tests.support.hostile import (
    FORBIDDEN,
    FORGED_ROW,
    deep_json,
    good_state,
    hostile_events,
    hostile_state,
    wrong_types_state,
)
from tests.support.images import remove_repo_images
from tests.support.throttle import ThrottledRegistry, publish_padded

OPERATOR = "ops"  # made by the broker fixture (conftest.py)
EDGE_CTL = (sys.executable, "-m", "edge_agent.ctl")

def ctl_env(broker: Broker | None, user: str = OPERATOR,
            env: dict[str, str] | None = None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}
    environ["PYTHONPATH"] = str(REPO_ROOT)
    if broker is not None:
        environ.update(MQTT_HOST="127.0.0.1", MQTT_PORT=str(broker.port), MQTT_USERNAME=user,
                       MQTT_PASSWORD=broker.passwords.get(user, "wrong"))
    environ.update(env or {})
    return environ


def ctl(broker: Broker | None, *args: str, user: str = OPERATOR, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``edge-ctl ARGS`` as a process, logged in as ``user``."""
    return subprocess.run([*EDGE_CTL, *args],
                          env=ctl_env(broker, user, env), capture_output=True, text=True,
                          timeout=timeout, check=False)


@dataclass
class Fleet:
    """One device with a running agent, logged in to ``broker`` as its DEVICE_ID."""

    device: Device
    agent: AgentProcess
    v1: str
    v2: str

    @property
    def name(self) -> str:
        return self.device.name


@contextlib.contextmanager
def running_fleet(broker: Broker, repo: str, name: str, tmp_path: Path) -> Iterator[Fleet]:
    """An agent for device ``name`` at ``repo``:1.0 (tags published by the caller, each
    version ``<tag> <name>``), until the block ends; then its desired tags are cleared."""
    device = Device(repo, name, tmp_path / "data")
    broker.add_device(name, ["lab"])
    env = device.agent_env(**{
        "CONTAINER_IMAGE": f"{repo}:1.0", "HEALTH_TIMEOUT": "1", "FALLBACK_TAG": "",
        "DEVICE_GROUPS": "lab", "TELEMETRY_INTERVAL": "60",
        **broker.agent_env(name, "edge"),
    })
    agent = AgentProcess(env, tmp_path / "agent.log").start()
    try:
        wait_until(lambda: device.serving() == f"1.0 {name}", timeout=60,
                   message="the app at 1.0")
        yield Fleet(device, agent, f"1.0 {name}", f"2.0 {name}")
    finally:
        if agent.alive:
            agent.stop(signal.SIGTERM)
        print(agent.log()[-6000:])
        # retained desired tags would reach the next test's agent with the same name
        for topic in (Topics("edge").device_tag(name), Topics("edge").group_tag("lab")):
            ctl_clear = MqttWatcher(broker.settings(OPERATOR), []).start()
            ctl_clear.publish(topic, b"", retain=True)
            ctl_clear.close()


@pytest.fixture
def fleet(broker: Broker, unique_repo: str, container_name: str,
          tmp_path: Path) -> Iterator[Fleet]:
    # Versions of their own: unique image ids (other tests remove containers by image id).
    publish(unique_repo, "1.0", f"1.0 {container_name}")
    publish(unique_repo, "2.0", f"2.0 {container_name}")
    with running_fleet(broker, unique_repo, container_name, tmp_path) as started:
        yield started


def test_set_tag_wait_returns_once_the_agent_applied_it(broker: Broker, fleet: Fleet) -> None:
    result = ctl(broker, "set-tag", "2.0", "--device", fleet.name, "--wait")
    assert result.returncode == EXIT_OK, result.stderr
    # returned after the real agent applied it: the new version answers right now
    assert fleet.device.serving() == fleet.v2
    assert f"{fleet.name}: updated to 2.0" in result.stdout
    assert "updating" in result.stderr  # progress for humans goes to stderr

    again = ctl(broker, "set-tag", "2.0", "--device", fleet.name, "--wait", "--json")
    assert again.returncode == EXIT_OK, again.stderr
    answer = json.loads(again.stdout)
    assert answer["ok"] is True and answer["outcome"] == "unchanged"
    assert answer["state"]["running"]["tag"] == "2.0"
    assert answer["state"]["desired"]["request_id"] == answer["request_id"]


def test_set_tag_wait_exits_non_zero_with_the_reason_on_rollback(
    broker: Broker, fleet: Fleet, unique_repo: str
) -> None:
    publish(unique_repo, "3.0", f"3.0 {fleet.name}", kind="unhealthy")
    result = ctl(broker, "set-tag", "3.0", "--device", fleet.name, "--wait")
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    assert "rolled back" in result.stderr
    # the agent's own reason, as its state shows it
    reason = fleet.device.status()["update"]["last_error"]
    assert reason.startswith("update to 3.0 rolled back: ")
    assert reason in result.stderr
    assert fleet.device.serving() == fleet.v1  # the old version is back

    # the same digest is not retried: a second --wait says so at once instead of hanging
    again = ctl(broker, "set-tag", "3.0", "--device", fleet.name, "--wait", "--json",
                "--timeout", "60")
    assert again.returncode == EXIT_FAILED, again.stdout + again.stderr
    answer = json.loads(again.stdout)
    assert answer["ok"] is False
    assert "failed verification before" in answer["reason"]


def test_devices_lists_the_fleet(broker: Broker, fleet: Fleet) -> None:
    assert ctl(broker, "set-tag", "2.0", "--group", "lab").returncode == EXIT_OK
    watcher = MqttWatcher(broker.settings(OPERATOR), [Topics("edge").state(fleet.name)]).start()
    try:
        watcher.wait_for(Topics("edge").state(fleet.name),
                         lambda m: m.json()["running"]["tag"] == "2.0"
                         and m.json()["update"]["status"] == "idle", timeout=60)
    finally:
        watcher.close()

    listed = ctl(broker, "devices", "--json")
    assert listed.returncode == EXIT_OK, listed.stderr
    mine = [d for d in json.loads(listed.stdout) if d["device_id"] == fleet.name]
    assert len(mine) == 1
    assert mine[0]["online"] is True
    assert mine[0]["state"]["running"]["tag"] == "2.0"
    assert mine[0]["state"]["desired"] == {"tag": "2.0", "source": "group", "group": "lab",
                                           "request_id": mine[0]["state"]["desired"]["request_id"]}

    table = ctl(broker, "devices", fleet.name)
    assert table.returncode == EXIT_OK, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split()[:5] == ["DEVICE", "ONLINE", "RUNNING", "DESIRED", "STATUS"]
    assert row.split()[:6] == [fleet.name, "yes", "2.0", "2.0", "(group:lab)", "idle"]

    # after the agent stops, the device is listed offline (its retained availability)
    fleet.agent.stop(signal.SIGTERM)
    offline = json.loads(ctl(broker, "devices", "--json", fleet.name).stdout)
    assert offline[0]["online"] is False


def test_clear_tag_removes_the_override(broker: Broker, fleet: Fleet) -> None:
    assert ctl(broker, "set-tag", "2.0", "--device", fleet.name, "--wait").returncode == EXIT_OK
    topics = Topics("edge")
    watcher = MqttWatcher(broker.settings(OPERATOR), [topics.state(fleet.name)]).start()
    try:
        cleared = ctl(broker, "clear-tag", "--device", fleet.name)
        assert cleared.returncode == EXIT_OK, cleared.stderr
        assert "cleared" in cleared.stdout
        # the agent falls back to its tag file (which kept 2.0), and says so
        watcher.wait_for(topics.state(fleet.name),
                         lambda m: m.json()["desired"]["source"] == "file", timeout=60)
    finally:
        watcher.close()
    probe = MqttWatcher(broker.settings(OPERATOR), [topics.device_tag(fleet.name)]).start()
    try:
        assert probe.last(topics.device_tag(fleet.name)) is None  # no retained override left
    finally:
        probe.close()


def test_watch_shows_the_update_with_pull_progress(broker: Broker, fleet: Fleet) -> None:
    watch = subprocess.Popen(
        [*EDGE_CTL, "watch", "--device", fleet.name, "--json",
         "--timeout", "120"],
        env=ctl_env(broker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert watch.stdout is not None and watch.stderr is not None
    try:
        # in step once it shows something: each check makes the agent's status change
        def shows_a_check() -> bool:
            assert ctl(broker, "check", "--device", fleet.name).returncode == EXIT_OK
            return _readable(watch.stdout, 2.0)

        wait_until(shows_a_check, timeout=60, interval=0, message="watch to show a check")
        result = ctl(broker, "set-tag", "2.0", "--device", fleet.name, "--wait")
        assert result.returncode == EXIT_OK, result.stderr
        lines: list[dict[str, Any]] = []
        while not any(line.get("event") == "update_succeeded" for line in lines):
            line = watch.stdout.readline()
            assert line, f"watch ended early: {watch.stderr.read()}"
            lines.append(json.loads(line))
    finally:
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == EXIT_OK
        watch.stdout.close()
        watch.stderr.close()
    lines = [line for line in lines if line["type"] != "status" or line["status"] != "checking"
             or line["state"]["desired"]["tag"] == "2.0"]
    events = [line["event"] for line in lines if line["type"] == "event"]
    assert events[0] == "update_started", events
    assert "pull_progress" in events
    progress = [line["progress"] for line in lines if line.get("event") == "pull_progress"]
    assert progress == sorted(progress) and progress[0] >= 0 and progress[-1] <= 100
    statuses = [line["status"] for line in lines if line["type"] == "status"]
    assert "installing" in statuses and "verifying" in statuses, statuses


def _readable(stream: Any, timeout: float) -> bool:
    ready, _, _ = select.select([stream], [], [], timeout)
    return bool(ready)


def test_a_request_replaced_during_its_pull_is_reported_superseded(
    broker: Broker, unique_repo: str, container_name: str, tmp_path: Path, test_id: str,
) -> None:
    """A real agent pulls 2.0 slowly; 3.0 is set meanwhile. ``set-tag 2.0 --wait`` ends
    at once (exit 1) saying what replaced its request, and ``watch`` shows the agent's
    ``tag_superseded`` in the same words."""
    publish(unique_repo, "1.0", f"1.0 {container_name}")
    publish(unique_repo, "3.0", f"3.0 {container_name}")
    publish_padded(unique_repo, "2.0", f"2.0 {container_name}", pad_bytes=6 * 1024 * 1024)
    slow_id, fast_id = f"r-slow-{test_id}", f"r-fast-{test_id}"
    topics = Topics("edge")
    with ThrottledRegistry(bytes_per_s=256 * 1024, min_bytes=2 * 1024 * 1024) as proxy:
        repo = proxy.repo(unique_repo)  # ~25 s for 2.0's big layer through the proxy
        try:
            with running_fleet(broker, repo, container_name, tmp_path) as fleet:
                states = MqttWatcher(broker.settings(OPERATOR),
                                     [topics.state(fleet.name)]).start()
                watch = watch_process(broker, "edge", "--device", fleet.name)
                slow: subprocess.Popen[str] | None = None
                try:
                    watch.err.until(lambda line: line.startswith("watching "))
                    slow = subprocess.Popen(
                        [*EDGE_CTL, "set-tag", "2.0", "--device", fleet.name, "--wait",
                         "--timeout", "120", "--request-id", slow_id],
                        env=ctl_env(broker), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, encoding="utf-8")
                    states.wait_for(topics.state(fleet.name),
                                    lambda m: m.json()["update"]["status"] == "pulling"
                                    and m.json()["desired"]["request_id"] == slow_id
                                    and (m.json()["update"]["progress"] or 0) > 0,
                                    timeout=60, message="the slow pull under way")
                    fast = ctl(broker, "set-tag", "3.0", "--device", fleet.name,
                               "--request-id", fast_id)
                    assert fast.returncode == EXIT_OK, fast.stderr
                    out, err = slow.communicate(timeout=60)
                    line = watch.out.until(lambda line: "tag_superseded" in line)
                    wait_until(lambda: fleet.device.serving() == f"3.0 {container_name}",
                               timeout=60, message="3.0 installed")
                finally:
                    if slow is not None:
                        slow.kill()
                    watch.stop()
                    states.close()
        finally:
            remove_repo_images(repo)
    words = f"replaced by 3.0 (request {fast_id}) before it was applied"
    assert slow is not None
    assert slow.returncode == EXIT_FAILED, out + err
    assert f"edge-ctl: {fleet.name}: 2.0 not applied: {words}\n" in err
    assert re.fullmatch(rf"\d\d:\d\d:\d\d  {fleet.name}  tag_superseded  2\.0 "
                        rf"{re.escape(words)}  \[request {slow_id}\]\n", line), line


def test_watch_shows_a_superseded_request_in_words() -> None:
    """The agent's event (docs/PROTOCOL.md) on a human watch line; --json keeps it as is."""
    topics = Topics("edge")
    event = {"event": "tag_superseded", "ts": "2026-11-29T10:08:03.480Z", "device_id": "d1",
             "request_id": "r1", "tag": "2.0", "superseded_by": "r2", "new_tag": "3.0",
             "reason": "the device desired tag 2.0 was replaced by 3.0 (request r2) before "
                       "it was applied"}
    message = Incoming(topics.events("d1"), json.dumps(event).encode(), False)
    shown: dict[bool, str] = {}
    for as_json in (False, True):
        out = io.StringIO()
        assert watch_line(topics, message, {}, Printer(as_json, out, io.StringIO()))
        shown[as_json] = out.getvalue()
    assert shown[False].split("  ", 1)[1] == (
        "d1  tag_superseded  2.0 replaced by 3.0 (request r2) before it was applied  "
        "[request r1]\n")
    assert json.loads(shown[True]) == {**event, "type": "event"}


def test_check_wait_gets_the_device_answer(broker: Broker, fleet: Fleet) -> None:
    result = ctl(broker, "check", "--device", fleet.name, "--wait", "--json", "--timeout", "60")
    assert result.returncode == EXIT_OK, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] is True
    assert answer["outcome"] == "unchanged"
    assert answer["tag"] == "1.0"
    human = ctl(broker, "check", "--device", fleet.name, "--wait", "--timeout", "60")
    assert human.returncode == EXIT_OK, human.stderr
    assert human.stdout == f"{fleet.name}: up to date: runs 1.0\n"


# -- errors an operator meets ------------------------------------------------------------
def test_wrong_password_is_reported_once(broker: Broker) -> None:
    result = ctl(broker, "devices", user="nobody")
    assert result.returncode == EXIT_TIMEOUT
    assert "Bad user name or password" in result.stderr or "Not authorized" in result.stderr
    # one line: the MQTT layer's own warnings (for the long-running programs) stay quiet
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("edge-ctl: cannot use the MQTT broker: ")


def test_a_device_login_cannot_set_tags(broker: Broker, test_id: str) -> None:
    """The ACL is the broker's; edge-ctl must report the refusal, not claim success."""
    device = f"dev-{test_id}"
    broker.add_device(device)
    result = ctl(broker, "set-tag", "2.0", "--fleet", user=device)
    assert result.returncode == EXIT_FAILED, result.stdout
    assert "refused the message" in result.stderr
    assert "operator ACL" in result.stderr


def test_set_tag_wait_times_out_for_a_device_that_never_answers(broker: Broker,
                                                                test_id: str) -> None:
    ghost = f"ghost-{test_id}"
    try:
        result = ctl(broker, "set-tag", "2.0", "--device", ghost, "--wait", "--timeout", "1")
        assert result.returncode == EXIT_TIMEOUT
        assert f"no answer from {ghost}" in result.stderr
    finally:
        ctl(broker, "clear-tag", "--device", ghost)


# -- a hostile device: anything on its own topics, never a crash or a raw escape ----------
GOOD, ESC, DEEP, TYPES = "h-good", "h-esc", "h-deep", "h-types"
HOSTILE_USERS = (GOOD, ESC, DEEP, TYPES)


@dataclass
class HostileFleet:
    """Devices logged in as themselves (the ACL applies) under a prefix of the test's own:
    ``h-good`` behaves, the others publish what tests/support/hostile.py makes."""

    broker: Broker
    topics: Topics
    clients: dict[str, MqttWatcher] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return self.topics.prefix

    def client(self, device: str, subscriptions: tuple[str, ...] = ()) -> MqttWatcher:
        key = f"{device} {' '.join(subscriptions)}"
        if key not in self.clients:
            settings = self.broker.settings(device, prefix=self.prefix)
            self.clients[key] = MqttWatcher(settings, list(subscriptions)).start()
        return self.clients[key]

    def send(self, device: str, topic: str, payload: bytes | str, *,
             retain: bool = False) -> None:
        self.client(device).publish(topic, payload, retain=retain)

    def retained_fleet(self) -> None:
        """The retained states and availability of all four devices."""
        t = self.topics
        self.send(GOOD, t.state(GOOD), json.dumps(good_state(GOOD)), retain=True)
        self.send(ESC, t.state(ESC), json.dumps(hostile_state(ESC, huge=True)), retain=True)
        self.send(DEEP, t.state(DEEP), deep_json(), retain=True)
        self.send(TYPES, t.state(TYPES), wrong_types_state(TYPES), retain=True)
        self.send(GOOD, t.availability(GOOD), "online", retain=True)
        self.send(ESC, t.availability(ESC), "online\x1b[2J" + FORGED_ROW, retain=True)
        self.send(DEEP, t.availability(DEEP), "offline", retain=True)

    @contextlib.contextmanager
    def flooding(self, device: str) -> Iterator[int]:
        """``device`` publishes states as fast as it can (unretained) until the block ends."""
        client = self.client(device).client
        assert client is not None
        stop = threading.Event()
        payload = wrong_types_state(device)

        def flood() -> None:
            while not stop.is_set():
                client.publish(self.topics.state(device), payload, qos=0)
                time.sleep(0.0005)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        try:
            yield 0
        finally:
            stop.set()
            thread.join(5)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


@pytest.fixture
def hostile(broker: Broker, test_id: str) -> Iterator[HostileFleet]:
    for user in HOSTILE_USERS:
        if user not in broker.passwords:
            broker.add_device(user)
    fleet = HostileFleet(broker, Topics(f"h{test_id}"))
    try:
        yield fleet
    finally:
        fleet.close()


def assert_safe(*outputs: str) -> None:
    """Nothing that steers a terminal or hides text reached the operator."""
    for output in outputs:
        found = sorted({f"U+{ord(c):04X}" for c in output if c in FORBIDDEN})
        assert not found, f"raw characters reached the operator: {found}\n{output[:3000]!r}"


def test_devices_survives_a_hostile_device_and_shows_the_others(
    broker: Broker, hostile: HostileFleet,
) -> None:
    hostile.retained_fleet()
    with hostile.flooding(TYPES):  # while another device floods its state topic
        table = ctl(broker, "devices", "--prefix", hostile.prefix)
    assert table.returncode == EXIT_OK, table.stderr
    assert_safe(table.stdout, table.stderr)
    lines = table.stdout.splitlines()
    # one line per device, nothing forged in between, nothing unbounded
    assert [line.split()[0] for line in lines] == ["DEVICE", *sorted(HOSTILE_USERS)], lines
    assert all(len(line) < 1500 for line in lines), [len(line) for line in lines]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows[GOOD].split()[:7] == [GOOD, "yes", "2.0", "2.0", "(fleet)", "idle", "healthy"]
    assert "state ignored: nested" in rows[DEEP] and rows[DEEP].split()[1] == "no"
    assert "\\x1b[2J2.0" in rows[ESC]  # shown, escaped
    assert "\\x1b]0;pwned\\x07\\r\\nforged-dev" in rows[ESC]
    assert rows[ESC].split()[1] == "?"  # availability neither online nor offline
    assert rows[ESC].endswith("\u2026")  # the 40 KB last_error, cut

    listed = ctl(broker, "devices", "--json", "--prefix", hostile.prefix)
    assert listed.returncode == EXIT_OK, listed.stderr
    assert listed.stdout.isascii()  # ensure_ascii: every device string escaped
    devices = {d["device_id"]: d for d in json.loads(listed.stdout)}
    assert set(devices) == set(HOSTILE_USERS)
    assert devices[GOOD]["state"] == good_state(GOOD) and devices[GOOD]["online"] is True
    assert devices[DEEP]["state"] is None and "nested" in devices[DEEP]["state_error"]
    # JSON keeps the device's data as it was, for scripts
    assert devices[ESC]["state"]["running"]["tag"] == hostile_state(ESC)["running"]["tag"]
    assert devices[TYPES]["state"]["update"]["progress"] == float("inf")

    only = ctl(broker, "devices", GOOD, "--prefix", hostile.prefix)
    assert only.returncode == EXIT_OK and len(only.stdout.splitlines()) == 2

    # a terminal that cannot show a device's characters gets escapes, not a traceback
    ascii_only = ctl(broker, "devices", "--prefix", hostile.prefix,
                     env={"PYTHONIOENCODING": "ascii"})
    assert ascii_only.returncode == EXIT_OK, ascii_only.stderr[-2000:]
    assert ascii_only.stdout.isascii() and "\\u2026" in ascii_only.stdout


class Output:
    """The lines a process writes to one stream, read by a thread (select() on a buffered
    pipe misses lines the reader has already buffered)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put("")  # end of the stream

    def until(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """The next line that matches ``predicate`` (the lines read are kept)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            assert line, f"the process ended early: {[x[:200] for x in self.lines[-5:]]}"
            self.lines.append(line)
            if predicate(line):
                return line
        raise TimeoutError(f"no such line in {timeout:g} s: {[x[:200] for x in self.lines[-5:]]}")

    def rest(self, timeout: float = 15.0) -> str:
        """Everything, once the process has closed the stream."""
        self._thread.join(timeout)
        while not self._queue.empty():
            self.lines.append(self._queue.get())
        return "".join(self.lines)


@dataclass
class Watch:
    proc: subprocess.Popen[str]
    out: Output
    err: Output

    def stop(self) -> tuple[int, str, str]:
        """SIGINT, as an operator's Ctrl-C: (exit code, stdout, stderr)."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(15)
        return code, self.out.rest(), self.err.rest()


def watch_process(broker: Broker, prefix: str, *flags: str) -> Watch:
    proc = subprocess.Popen(
        [*EDGE_CTL, "watch", "--prefix", prefix, "--timeout",
         "120", *flags],
        env=ctl_env(broker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        encoding="utf-8")
    assert proc.stdout is not None and proc.stderr is not None
    return Watch(proc, Output(proc.stdout), Output(proc.stderr))


def test_watch_survives_a_hostile_device_and_shows_the_others(
    broker: Broker, hostile: HostileFleet, test_id: str,
) -> None:
    t = hostile.topics
    hostile.retained_fleet()
    human, as_json = watch_process(broker, t.prefix), watch_process(broker, t.prefix, "--json")
    try:
        for watch in (human, as_json):  # in step once a ping of the good device shows
            def pinged(watch: Watch = watch) -> bool:
                hostile.send(GOOD, t.events(GOOD), json.dumps({"event": "ping"}))
                try:
                    watch.out.until(lambda line: "ping" in line, timeout=1)
                except TimeoutError:
                    return False
                return True
            wait_until(pinged, timeout=30, interval=0, message="the watch to start")

        with hostile.flooding(TYPES):
            for payload in hostile_events():
                hostile.send(ESC, t.events(ESC), payload)
            hostile.send(DEEP, t.events(DEEP), deep_json(key="event"))
            hostile.send(DEEP, t.state(DEEP), deep_json())
            hostile.send(ESC, t.state(ESC), json.dumps(hostile_state(ESC)))
            marker = f"marker-{test_id}"
            hostile.send(GOOD, t.events(GOOD), json.dumps({"event": "update_succeeded",
                                                           "tag": marker}))
            for watch in (human, as_json):
                watch.out.until(lambda line: marker in line)
    finally:
        (human_code, text, human_err), (json_code, json_out, json_err) = \
            human.stop(), as_json.stop()
    assert human_code == EXIT_OK and json_code == EXIT_OK, human_err[-2000:] + json_err[-2000:]
    assert_safe(text, human_err, json_out, json_err)

    # human: every line names the device whose topic it came from; none is forged
    line_re = re.compile(rf"^\d\d:\d\d:\d\d  ({'|'.join(HOSTILE_USERS)})  \S")
    assert all(line_re.match(line) for line in text.splitlines()), text
    assert f"  {GOOD}  update_succeeded  tag={marker}\n" in text
    assert f"  {ESC}  \\x1b[2Jupdate_failed  " in text  # the hostile event, escaped
    assert "unreadable event (ignored): nested" in human_err  # the deep one, said once
    assert human_err.count(f"{DEEP}  sent an unreadable event") == 1
    assert all(len(line) < 3000 for line in text.splitlines())

    # JSON: one valid object per line; the device id is the topic's, never the payload's
    lines = [json.loads(line) for line in json_out.splitlines()]
    assert {line["device_id"] for line in lines} <= set(HOSTILE_USERS)
    forged = [line for line in lines if line.get("event") == "\x1b[2Jupdate_failed"]
    assert forged and forged[0]["device_id"] == ESC and forged[0]["type"] == "event"
    assert {"type": "event", "device_id": GOOD, "event": "update_succeeded",
            "tag": marker} in lines


def test_set_tag_wait_reports_a_hostile_answer_safely(
    broker: Broker, hostile: HostileFleet, test_id: str,
) -> None:
    t = hostile.topics
    request_id = f"r-{test_id}"
    device = hostile.client(ESC, (t.device_tag(ESC),))
    proc = subprocess.Popen(
        [*EDGE_CTL, "set-tag", "2.0", "--device", ESC, "--wait",
         "--timeout", "60", "--request-id", request_id, "--prefix", t.prefix],
        env=ctl_env(broker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        encoding="utf-8")
    try:
        device.wait_for(t.device_tag(ESC), timeout=30)
        for payload in hostile_events(request_id):
            hostile.send(ESC, t.events(ESC), payload)
        state = hostile_state(ESC, request_id=request_id)
        state["update"]["status"] = "idle"  # settled on a hostile tag: not applied
        hostile.send(ESC, t.state(ESC), json.dumps(state))
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        ctl(broker, "clear-tag", "--device", ESC, "--prefix", t.prefix)
    assert proc.returncode == EXIT_FAILED, out + err
    assert_safe(out, err)
    assert f"edge-ctl: {ESC}: 2.0 not applied: device settled on" in err
    assert not [line for line in (out + err).splitlines() if line.startswith("forged-dev")]


@pytest.mark.parametrize("answer", [
    {"ok": True, "outcome": "{0}{tag.__class__}", "tag": "\x1b[2J" + FORGED_ROW},
    {"ok": "yes", "outcome": "updated", "error": "\x1b]0;pwned\x07" + FORGED_ROW},
    {"ok": True, "outcome": "\x1b[2J\u202e", "tag": ["1.0", {"t": 1}]},
])
def test_check_wait_shows_a_hostile_answer_safely(
    broker: Broker, hostile: HostileFleet, answer: dict[str, Any],
) -> None:
    t = hostile.topics
    device = hostile.client(ESC, (t.device_check(ESC),))
    proc = subprocess.Popen(
        [*EDGE_CTL, "check", "--device", ESC, "--wait",
         "--timeout", "60", "--prefix", t.prefix],
        env=ctl_env(broker), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        encoding="utf-8")
    try:
        command = device.wait_for(t.device_check(ESC), timeout=30)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = command.properties.CorrelationData
        device.publish(command.properties.ResponseTopic, json.dumps(answer),
                       properties=properties)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (EXIT_OK, EXIT_FAILED), out + err
    assert "Traceback" not in err
    assert_safe(out, err)
    assert out.startswith(f"{ESC}: ") and len(out.splitlines()) == 1, out


def test_set_tag_for_a_device_that_never_reported_warns(broker: Broker, fleet: Fleet,
                                                         test_id: str) -> None:
    """A mistyped device id would keep a retained tag for nobody: said before it is kept."""
    ghost = f"ghost-{test_id}"
    try:
        result = ctl(broker, "set-tag", "2.0", "--device", ghost)
        assert result.returncode == EXIT_OK, result.stderr
        assert f"warning: {ghost} has never reported" in result.stderr
        as_json = ctl(broker, "set-tag", "2.0", "--device", ghost, "--json")
        assert json.loads(as_json.stdout)["device_known"] is False
        known = ctl(broker, "set-tag", "1.0", "--device", fleet.name, "--json")
        assert json.loads(known.stdout)["device_known"] is True
        assert "never reported" not in known.stderr
    finally:
        ctl(broker, "clear-tag", "--device", ghost)


# -- a mistyped tag -----------------------------------------------------------------------
def test_set_tag_asks_the_registry_first(broker: Broker, fleet: Fleet, unique_repo: str) -> None:
    """A tag the registry does not have is refused (nothing published) unless forced; the
    repository is the one the real agent reports in its state."""
    topics = Topics("edge")
    watcher = MqttWatcher(broker.settings(OPERATOR), [topics.device_tag(fleet.name),
                                                      topics.group_tag("lab")]).start()
    try:
        scopes: list[tuple[str, str]] = [("--device", fleet.name), ("--group", "lab")]
        for scope in scopes:
            refused = ctl(broker, "set-tag", "9.9", *scope)
            assert refused.returncode == EXIT_FAILED, refused.stdout + refused.stderr
            assert "edge-ctl: tag 9.9 does not exist in 127.0.0.1:5000/" in refused.stderr
            # (a group: also the repositories of earlier tests' devices in lab, offline now)
            assert scope[0] == "--group" or f"exist in {unique_repo} (" in refused.stderr
            assert "use --force" in refused.stderr
        time.sleep(1)  # the retained messages (if any) and anything published are in
        assert [m.payload for m in watcher.on(topics.device_tag(fleet.name))] in ([], [b""])
        assert [m.payload for m in watcher.on(topics.group_tag("lab"))] in ([], [b""])

        existing = ctl(broker, "set-tag", "1.0", "--device", fleet.name)
        assert existing.returncode == EXIT_OK, existing.stderr
        assert "warning" not in existing.stderr

        forced = ctl(broker, "set-tag", "9.9", "--device", fleet.name, "--force", "--json")
        assert forced.returncode == EXIT_OK, forced.stderr
        assert "warnings" not in json.loads(forced.stdout)
        watcher.wait_for(topics.device_tag(fleet.name), lambda m: b"9.9" in m.payload,
                         timeout=10)

        # the device's own (mistyped) tag now shadows the group tag: edge-ctl devices says so
        # (forced: earlier tests' devices in lab, offline now, have registries of their own)
        group = ctl(broker, "set-tag", "2.0", "--group", "lab", "--force")
        assert group.returncode == EXIT_OK, group.stderr
    finally:
        watcher.close()
    shadows = {"scope": "group", "group": "lab", "tag": "2.0"}

    def listed() -> dict[str, Any]:
        result = ctl(broker, "devices", "--json", fleet.name)
        assert result.returncode == EXIT_OK, result.stderr
        [mine] = json.loads(result.stdout)
        return dict(mine)

    wait_until(lambda: listed()["shadows"] == shadows, timeout=30,
               message="edge-ctl devices shows the shadowed group tag")
    assert listed()["state"]["groups"] == ["lab"]  # the real agent says where it belongs
    table = ctl(broker, "devices", fleet.name).stdout
    assert "its device tag shadows the group lab tag 2.0" in table, table
    assert fleet.device.serving() == fleet.v1  # the group tag did not move it


def test_set_tag_warns_when_the_registry_cannot_be_asked(broker: Broker) -> None:
    """A device whose registry does not answer, a device that never reported: the tag is
    set, and stderr (also with --json) says what could not be checked."""
    name = f"ghost-{uuid.uuid4().hex[:6]}"
    broker.add_device(name)
    port = free_port()
    device = MqttWatcher(broker.settings(name), []).start()
    topics = Topics("edge")
    try:
        device.publish(topics.state(name), json.dumps(
            {**good_state(name), "image": f"127.0.0.1:{port}/acme/app"}), retain=True)
        result = ctl(broker, "set-tag", "9.9", "--device", name, "--json",
                     env={"REGISTRY_CHECK_TIMEOUT": "2"})
        assert result.returncode == EXIT_OK, result.stderr
        assert (f"edge-ctl: warning: could not ask the registry whether 127.0.0.1:{port}"
                "/acme/app:9.9 exists (") in result.stderr
        assert json.loads(result.stdout)["warnings"][0].startswith("could not ask the registry")

        nobody = ctl(broker, "set-tag", "9.9", "--device", f"{name}-none")
        assert nobody.returncode == EXIT_OK, nobody.stderr
        assert "reported no image repository yet" in nobody.stderr

        off = ctl(broker, "set-tag", "9.9", "--device", name, env={"REGISTRY_CHECK": "false"})
        assert off.returncode == EXIT_OK and "registry" not in off.stderr, off.stderr
        bad = ctl(broker, "set-tag", "9.9", "--device", name, env={"REGISTRY_CHECK": "maybe"})
        assert bad.returncode == 2 and "REGISTRY_CHECK" in bad.stderr
    finally:
        device.publish(topics.state(name), b"", retain=True)
        cleaner = MqttWatcher(broker.settings(OPERATOR), []).start()
        for topic in (topics.device_tag(name), topics.device_tag(f"{name}-none")):
            cleaner.publish(topic, b"", retain=True)
        cleaner.close()
        device.close()


def test_set_agent_version_reaches_a_plain_process_agent_that_reports_it_unavailable(
        broker: Broker, fleet: Fleet) -> None:
    """docs/SELF-UPDATE.md: edge-ctl sets the desired agent version (device topic, payload
    of a desired tag); an agent run as a plain process says it cannot update itself."""
    topics = Topics("edge")
    watcher = MqttWatcher(broker.settings(OPERATOR), [topics.state(fleet.name),
                                                      topics.events(fleet.name)]).start()
    try:
        result = ctl(broker, "set-agent-version", "0.9", "--device", fleet.name, "--json")
        assert result.returncode == EXIT_OK, result.stderr
        request_id = json.loads(result.stdout)["request_id"]
        failed = watcher.wait_for(
            topics.events(fleet.name),
            lambda m: m.json().get("event") == "agent_update_failed", timeout=60)
        assert failed.json()["request_id"] == request_id
        assert "does not run in a Docker container" in failed.json()["reason"]
        state = watcher.wait_for(
            topics.state(fleet.name),
            lambda m: m.json()["agent"]["status"] == "unavailable", timeout=60).json()
        assert state["agent"]["desired"] == "0.9"
        assert state["agent"]["source"] == "device"
        assert ctl(broker, "set-agent-version", "--clear", "--device",
                   fleet.name).returncode == EXIT_OK
        watcher.wait_for(topics.state(fleet.name),
                         lambda m: m.json()["agent"]["desired"] is None, timeout=60)
        assert ctl(broker, "set-agent-version", "--device", fleet.name).returncode == 2
    finally:
        watcher.close()
