"""``edge-ctl``: the operator's command line for a fleet, over MQTT (SPEC section 6).

    edge-ctl devices                           table of the fleet
    edge-ctl set-tag 2.0 --device dev1 --wait  set a desired tag, wait for the device
    edge-ctl set-tag 2.0 --group lab           ... or for a group, or --fleet
    edge-ctl clear-tag --device dev1           remove an override
    edge-ctl check --device dev1 --wait        ask for a registry check now
    edge-ctl install --device dev1 --wait      apply a pending update (UPDATE_MODE=notify)
    edge-ctl watch                             live events, with pull progress

The broker is configured like the agent's (MQTT_HOST, MQTT_PORT, MQTT_USERNAME,
MQTT_PASSWORD(_FILE), MQTT_TLS, MQTT_CA_FILE, ..., MQTT_TOPIC_PREFIX); options override
them. The user needs the operator ACL (``mosquitto/add-device --operator NAME``).
Human output by default, ``--json`` for scripts. This module is a CLI entry point: it
prints.

Everything a device publishes is untrusted: payloads are decoded with the bounded
decoder (``edge_agent.protocol.safejson``) and checked by type before use, and every string a
device chose is shown through ``printable`` (control, bidi and zero-width characters
escaped, length capped), so a device can neither crash edge-ctl nor write to the
operator's terminal. ``--json`` output is plain ``json.dumps`` with ``ensure_ascii``:
every control and non-ASCII character is a ``\\uXXXX`` escape.

Exit codes: 0 done; 1 the device did not apply it (rolled back, rejected, failed, ...);
2 usage or configuration error; 3 no answer in time, or the broker is unreachable.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent import __version__
from edge_agent.protocol import safejson
from edge_agent.protocol.answers import Answer, judge_event, judge_state
from edge_agent.protocol.answers import lookup as _get
from edge_agent.protocol.errors import ConfigError, TagError
from edge_agent.protocol.mqtt import MqttConnectError, connect_client, disconnect_client
from edge_agent.protocol.safejson import UntrustedJson
from edge_agent.protocol.settings import MqttSettings, load_mqtt_settings
from edge_agent.protocol.tags import REQUEST_ID_PATTERN, is_request_id, validate_tag
from edge_agent.protocol.topics import ID_PATTERN, ID_RE, Topics

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
# Retained messages arrive right after the SUBACK; this much silence means "all here".
RETAINED_QUIET_S = 0.3
RETAINED_MAX_S = 3.0
DEFAULT_WAIT_S = 300.0
BAR_WIDTH = 20
# The largest device message edge-ctl decodes (the bridge's limit for a state; the shipped
# broker refuses packets over 64 KiB before they get here).
MAX_DEVICE_MESSAGE_BYTES = 256 * 1024
# How much of a device-chosen string is shown: in a table cell or short field, and in a
# longer text (an error, a reason). Longer ones end in ELLIPSIS.
CELL_CHARS = 64
TEXT_CHARS = 300
ELLIPSIS = "\u2026"
# Event fields shown on one watch line, and the events set-tag --wait keeps for its report.
MAX_DETAILS = 12
MAX_WAIT_EVENTS = 1000
# Distinct notes and progress bars remembered per run.
MAX_NOTED = 1000
# Never printed as they are: controls (C0, DEL, C1; ESC starts terminal sequences, CR and
# LF forge lines), format characters (bidi overrides and isolates, zero-width ones), line
# and paragraph separators, surrogates, private-use and unassigned code points.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


class CtlError(Exception):
    """Ends the command with ``code`` and a one-line message on stderr."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# -- the MQTT session -------------------------------------------------------------------
@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retained: bool
    correlation: bytes | None = None

    def document(self) -> dict[str, Any]:
        """The payload as a JSON object, decoded with the bounded decoder; raises
        UntrustedJson saying why it is not one."""
        return safejson.loads_object(self.payload, max_bytes=MAX_DEVICE_MESSAGE_BYTES)

    def json(self) -> dict[str, Any] | None:
        """``document()``, or None when the payload is not an acceptable JSON object."""
        try:
            return self.document()
        except UntrustedJson:
            return None


class Session:
    """One MQTT connection: subscribed before anything is published; messages queue up."""

    def __init__(self, settings: MqttSettings, subscriptions: Sequence[str]) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.subscriptions = tuple(subscriptions)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._sub_refused: list[str] = []
        self._refused: dict[int, str] = {}
        self._lock = threading.Lock()
        try:
            self.client = connect_client(
                settings, f"edge-ctl-{uuid.uuid4().hex[:12]}",
                on_message=self._on_message, on_connect=self._subscribe,
                wait_s=CONNECT_TIMEOUT_S,
            )
        except MqttConnectError as exc:
            raise CtlError(f"cannot use the MQTT broker: {exc}", EXIT_TIMEOUT) from None
        self._chain_on_publish()
        if not self.subscriptions:
            return
        if not self._subscribed.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise CtlError("the broker did not acknowledge the subscriptions", EXIT_TIMEOUT)
        if self._sub_refused:
            self.close()
            raise CtlError(f"the broker refused the subscription to "
                           f"{', '.join(self._sub_refused)}; does "
                           f"{settings.username or 'this user'} have the operator ACL?")

    def _subscribe(self, client: Client) -> None:
        """At every (re)connect, on paho's thread: subscribe and watch for the SUBACK."""
        if not self.subscriptions:
            return
        client.on_subscribe = self._on_subscribe
        _result, mid = client.subscribe([(topic, 1) for topic in self.subscriptions])
        self._subscribe_mid = mid

    def _on_subscribe(self, client: Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      properties: Properties | None) -> None:
        if mid != self._subscribe_mid:
            return
        self._sub_refused = [f"{topic} ({reason})" for topic, reason
                             in zip(self.subscriptions, reasons, strict=False) if reason.is_failure]
        self._subscribed.set()

    def _chain_on_publish(self) -> None:
        """Remember publishes the broker refused (MQTT 5 reason codes; usually the ACL).
        Replaces connect_client's handler, which only logs them: ``publish`` reports them."""

        def on_publish(client: Client, userdata: Any, mid: int, reason: ReasonCode,
                       properties: Properties) -> None:
            if reason.is_failure:
                with self._lock:
                    self._refused[mid] = str(reason)

        self.client.on_publish = on_publish

    def _on_message(self, client: Client, message: MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        correlation = getattr(properties, "CorrelationData", None)
        self.inbox.put(Incoming(message.topic, bytes(message.payload), bool(message.retain),
                                bytes(correlation) if correlation is not None else None))

    def publish(self, topic: str, payload: bytes, *, retain: bool,
                properties: Properties | None = None) -> None:
        """QoS 1; returns once the broker has acknowledged it, raises CtlError otherwise."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        try:
            info.wait_for_publish(PUBLISH_TIMEOUT_S)
        except (RuntimeError, ValueError) as exc:
            raise CtlError(f"publishing to {topic} failed: {exc}", EXIT_TIMEOUT) from None
        if not info.is_published():
            raise CtlError(f"the broker did not acknowledge the message to {topic} within "
                           f"{PUBLISH_TIMEOUT_S:g} s", EXIT_TIMEOUT)
        with self._lock:
            refused = self._refused.pop(info.mid, None)
        if refused is not None:
            raise CtlError(f"the broker refused the message to {topic} ({refused}); does "
                           f"{self.settings.username or 'this user'} have the operator ACL?")

    def messages(self, timeout_s: float | None) -> Iterator[Incoming]:
        """Messages as they arrive, until ``timeout_s`` (None: forever) has passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                yield self.inbox.get(timeout=1.0 if remaining is None else min(remaining, 1.0))
            except queue.Empty:
                continue

    def retained(self) -> list[Incoming]:
        """The retained messages of the subscriptions (everything until a short silence)."""
        found: list[Incoming] = []
        deadline = time.monotonic() + RETAINED_MAX_S
        while time.monotonic() < deadline:
            try:
                found.append(self.inbox.get(timeout=RETAINED_QUIET_S))
            except queue.Empty:
                break
        return found

    def close(self) -> None:
        disconnect_client(self.client)


# -- showing device data -------------------------------------------------------------------
def printable(value: object, limit: int = TEXT_CHARS) -> str:
    """``value`` (a device-chosen string, or any JSON value) as text that is safe on a
    terminal: hidden characters (see HIDDEN_CATEGORIES) become visible escapes such as
    ``\\x1b`` or ``\\u202e``, and at most ``limit`` characters are shown, the last being
    ELLIPSIS when something was cut. Printable text passes unchanged, so it is idempotent."""
    text = value if isinstance(value, str) else _compact(value)
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _escape(char)
        if size + len(piece) > limit:
            while pieces and size + len(ELLIPSIS) > limit:
                size -= len(pieces.pop())
            return "".join(pieces) + ELLIPSIS if limit >= len(ELLIPSIS) else ""
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _escape(char: str) -> str:
    if " " <= char <= "~":
        return char
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if unicodedata.category(char) not in HIDDEN_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _compact(value: object) -> str:
    """A JSON value that is not a string, in a few characters."""
    try:
        if value is None or isinstance(value, bool | int | float):
            return str(value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):  # e.g. an int of too many digits
        return "?"


def _text(document: Any, *path: str) -> str | None:
    """A string field of a device document: None when missing or null, "?" when the
    device put something else there."""
    value = _get(document, *path)
    if value is None or isinstance(value, str):
        return value
    return "?"


def _percent(value: Any) -> float | None:
    """A progress figure from a device, clamped to 0-100; None unless a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return min(100.0, max(0.0, number)) if math.isfinite(number) else None


def _local_time(value: Any) -> datetime | None:
    """A device's ISO 8601 timestamp in local time, or None when it is not one (or lies
    where local time cannot show it, such as year 9999 at -23:59)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone()
    except (ValueError, OverflowError):
        return None


# -- the fleet view ---------------------------------------------------------------------
@dataclass
class DeviceView:
    device_id: str
    online: bool | None = None
    state: dict[str, Any] | None = None
    # why the device's retained state was not used (too large, too deep, not JSON, ...)
    state_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "online": self.online, "state": self.state,
                "state_error": self.state_error}


AVAILABILITY = {b"online": True, b"offline": False}


def collect_devices(topics: Topics, messages: Sequence[Incoming]) -> dict[str, DeviceView]:
    devices: dict[str, DeviceView] = {}
    for message in messages:
        device_id = topics.device_of(message.topic)
        if device_id is None or not message.payload:
            continue
        view = devices.setdefault(device_id, DeviceView(device_id))
        if message.topic == topics.availability(device_id):
            view.online = AVAILABILITY.get(message.payload.strip())
        elif message.topic == topics.state(device_id):
            try:
                view.state, view.state_error = message.document(), None
            except UntrustedJson as exc:
                view.state, view.state_error = None, f"state ignored: {exc}"
    return devices


def status_text(state: dict[str, Any] | None) -> str:
    """The update status as an operator reads it: ``pulling 45%``, ``fallback``, ...
    Safe to print: device strings in it are ``printable``."""
    if state is None:
        return "-"
    status = _text(state, "update", "status") or "-"
    progress = _percent(_get(state, "update", "progress"))
    if status == "pulling" and progress is not None:
        status = f"pulling {progress:.0f}%"
    status = printable(status, CELL_CHARS)
    if _get(state, "fallback", "active") is True:
        requested = printable(_text(state, "fallback", "requested_tag") or "?", CELL_CHARS)
        status += f" (fallback: {requested} not found)"
    return status


def devices_table(devices: Sequence[DeviceView]) -> str:
    header = ("DEVICE", "ONLINE", "RUNNING", "DESIRED", "STATUS", "HEALTH", "LAST CHECK", "NOTE")
    rows = [header]
    for view in devices:
        state = view.state
        desired = _text(state, "desired", "tag")
        source = _text(state, "desired", "source")
        group = _text(state, "desired", "group")
        if desired and source:
            desired = f"{desired} ({source}{':' + group if group else ''})"
        running = _text(state, "running", "tag")
        container = _text(state, "running", "status")
        if running and container not in (None, "running"):
            running = f"{running} ({container})"
        elif not running and container:
            running = f"- ({container})"
        rows.append((
            printable(view.device_id, CELL_CHARS),
            {True: "yes", False: "no", None: "?"}[view.online],
            printable(running or "-", CELL_CHARS),
            printable(desired or "-", CELL_CHARS),
            status_text(state),
            printable(_text(state, "running", "health") or "-", CELL_CHARS),
            _short_time(_get(state, "update", "last_check_at")),
            printable(view.state_error or _text(state, "update", "last_error") or "",
                      TEXT_CHARS),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1]
        for row in rows
    ).rstrip()


def _short_time(value: Any) -> str:
    if not isinstance(value, str):
        return "-"
    moment = _local_time(value)
    if moment is None:
        return printable(value, CELL_CHARS)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


# -- waiting for a device -------------------------------------------------------------------
@dataclass
class Waited:
    """What ``set-tag --wait`` saw: the answer (None: none in time), the device's last
    state and the events of the request."""

    answer: Answer | None
    state: dict[str, Any] | None
    events: list[dict[str, Any]]


# -- output ---------------------------------------------------------------------------------
class Printer:
    """Human output (progress to stderr, results to stdout) or JSON lines on stdout."""

    def __init__(self, as_json: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr,
                 ) -> None:
        self.as_json = as_json
        self.out = out
        self.err = err
        self.tty = err.isatty()
        self._bar_open = False
        self._last_bucket: dict[tuple[str, str], int] = {}
        self._noted: set[tuple[str, ...]] = set()

    def result(self, obj: Any, text: str) -> None:
        self._close_bar()
        if self.as_json:
            # ensure_ascii: device strings reach scripts as \\uXXXX escapes, never raw
            print(json.dumps(obj, sort_keys=True, ensure_ascii=True), file=self.out,
                  flush=True)
        else:
            print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """Progress for humans (stderr); nothing in JSON mode."""
        if self.as_json:
            return
        self._close_bar()
        print(text, file=self.err, flush=True)

    def note_once(self, key: tuple[str, ...], text: str) -> None:
        """``note``, once per ``key`` (a device that keeps sending junk is named once)."""
        if key in self._noted:
            return
        if len(self._noted) < MAX_NOTED:
            self._noted.add(key)
        self.note(text)

    def progress(self, device_id: str, tag: str, percent: float) -> None:
        """A progress bar on a terminal; lines every 10 % otherwise. ``tag`` may come
        from the device: it is shown ``printable``."""
        if self.as_json:
            return
        line = (f"{printable(device_id, CELL_CHARS)}: pulling {printable(tag, CELL_CHARS)} "
                f"{bar(percent)} {percent:5.1f}%")
        if self.tty:
            print(f"\r{line}", end="", file=self.err, flush=True)
            self._bar_open = True
            return
        bucket = int(percent // 10)
        if len(self._last_bucket) >= MAX_NOTED:
            self._last_bucket.clear()  # a device inventing tags must not grow this forever
        if self._last_bucket.get((device_id, tag)) != bucket:
            self._last_bucket[(device_id, tag)] = bucket
            print(line, file=self.err, flush=True)

    def new_pull(self, device_id: str) -> None:
        """An update starts: its progress is shown from 0 again."""
        for key in [k for k in self._last_bucket if k[0] == device_id]:
            del self._last_bucket[key]

    def _close_bar(self) -> None:
        if self._bar_open:
            print(file=self.err, flush=True)
            self._bar_open = False


def bar(percent: float) -> str:
    if not math.isfinite(percent):
        percent = 0.0
    filled = max(0, min(BAR_WIDTH, round(percent / 100 * BAR_WIDTH)))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def _clock(ts: Any) -> str:
    """The time of a device's message (its ``ts``, or now when that is no timestamp)."""
    moment = _local_time(ts) or datetime.now(UTC).astimezone()
    return moment.strftime("%H:%M:%S")


# -- commands -----------------------------------------------------------------------------
def _target(args: argparse.Namespace, topics: Topics) -> tuple[str, str]:
    """(description, desired-tag topic) of --device / --group / --fleet."""
    if args.device:
        return f"device {args.device}", topics.device_tag(args.device)
    if args.group:
        return f"group {args.group}", topics.group_tag(args.group)
    return "the fleet", topics.fleet_tag


def cmd_devices(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    session = Session(settings, [topics.all_states, topics.all_availability])
    try:
        devices = collect_devices(topics, session.retained())
    finally:
        session.close()
    wanted = set(args.device or ())
    shown = sorted((v for k, v in devices.items() if not wanted or k in wanted),
                   key=lambda v: v.device_id)
    text = devices_table(shown) if shown else (
        f"no devices have reported under {topics.prefix}/ (or {settings.username or 'this user'} "
        "may not read them: operators need the operator ACL)")
    printer.result([v.to_json() for v in shown], text)
    return EXIT_OK


def cmd_set_tag(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    try:
        tag = validate_tag(args.tag)
    except TagError as exc:
        raise CtlError(f"invalid tag: {exc}", EXIT_USAGE) from None
    if args.wait and not args.device:
        raise CtlError("--wait needs --device (a group or the fleet has no single answer)",
                       EXIT_USAGE)
    topics = Topics(settings.topic_prefix)
    what, topic = _target(args, topics)
    request_id = args.request_id or uuid.uuid4().hex
    payload = json.dumps({"tag": tag, "request_id": request_id,
                          "issued_at": datetime.now(UTC).isoformat(timespec="seconds")
                          .replace("+00:00", "Z")}).encode()
    subscriptions = []
    if args.wait:
        subscriptions = [topics.state(args.device), topics.events(args.device),
                         topics.availability(args.device)]
    session = Session(settings, subscriptions)
    try:
        if args.wait:
            session.retained()  # the old state and availability: not an answer
        session.publish(topic, payload, retain=True)
        if not args.wait:
            printer.result({"tag": tag, "topic": topic, "request_id": request_id},
                           f"desired tag of {what} set to {tag} (request {request_id})")
            return EXIT_OK
        printer.note(f"desired tag of {what} set to {tag}; waiting for the device "
                     f"(up to {args.timeout:g} s)")
        waited = wait_for_tag(session, args.device, tag, request_id, args.timeout, printer)
    finally:
        session.close()
    return report_outcome(args.device, tag, request_id, waited, args.timeout, printer)


def wait_for_tag(session: Session, device_id: str, tag: str, request_id: str,
                 timeout_s: float, printer: Printer) -> Waited:
    """Until the device answers. Unlike the bridge, edge-ctl ends on notify mode's
    "available" (not settled: the operator has to run install) and on update_succeeded;
    a fallback only once the check that shows it has settled."""
    topics = session.topics
    last_state: dict[str, Any] | None = None
    shown_status: str | None = None
    events: list[dict[str, Any]] = []
    for message in session.messages(timeout_s):
        if message.topic == topics.availability(device_id):
            if message.payload.strip() == b"offline":
                printer.note(f"{device_id} is offline; the desired tag is retained and applies "
                             "when it reconnects")
            continue
        body = message.json()
        if body is None:
            continue
        if message.topic == topics.events(device_id):
            if body.get("request_id") != request_id:
                continue
            if len(events) < MAX_WAIT_EVENTS:
                events.append(body)
            if body.get("event") == "pull_progress":
                printer.progress(device_id, tag, _percent(body.get("progress")) or 0.0)
                continue
            if body.get("event") == "update_started":
                printer.new_pull(device_id)
                from_tag = printable(_text(body, "from_tag") or "-", CELL_CHARS)
                printer.note(f"{device_id}: updating {from_tag} -> {tag}")
            answer = judge_event(body, request_id, tag)
            if answer is not None and answer.outcome == "fallback":
                answer = None  # the state that follows says it, and the report shows that state
        else:
            last_state = body
            status = status_text(body) if _get(body, "desired", "request_id") == request_id \
                else None
            if status and status != shown_status and not status.startswith(("pulling", "idle")):
                printer.note(f"{device_id}: {status}")
                shown_status = status
            progress = _percent(_get(body, "update", "progress"))
            if status and status.startswith("pulling") and progress is not None:
                printer.progress(device_id, tag, progress)
            answer = judge_state(body, request_id, tag)
            if answer is not None and answer.outcome == "fallback" and not answer.settled:
                # a fallback from an earlier check, shown while this one still runs
                answer = None
        if answer is not None:
            return Waited(answer, last_state, events)
    return Waited(None, last_state, events)


def report_outcome(device_id: str, tag: str, request_id: str, waited: Waited,
                   timeout_s: float, printer: Printer) -> int:
    answer, state = waited.answer, waited.state
    about = {"device_id": device_id, "tag": tag, "request_id": request_id, "state": state}
    if answer is not None and answer.ok:
        # the state that settles it comes just before update_succeeded: update_started tells
        updated = any(e.get("event") in ("update_started", "update_succeeded")
                      for e in waited.events)
        printer.result({**about, "ok": True, "outcome": "updated" if updated else "unchanged",
                        "reason": None},
                       f"{device_id}: {'updated to' if updated else 'already runs'} {tag}")
        return EXIT_OK
    if answer is None:
        running = printable(_text(state, "running", "tag") or "-", CELL_CHARS)
        kind, code = "timeout", EXIT_TIMEOUT
        reason = f"no answer from {device_id} within {timeout_s:g} s" + (
            f" (last seen running {running}, {status_text(state)})" if state else "")
    else:
        kind, code, reason = answer.outcome, EXIT_FAILED, answer.reason
    # the reason may quote the device (its last_error): printable on a terminal
    text = f"{device_id}: {tag} not applied: {printable(reason)}"
    printer.result({**about, "ok": False, "outcome": kind, "reason": reason}, text)
    if not printer.as_json:
        print(f"edge-ctl: {text}", file=printer.err)
    return code


def cmd_clear_tag(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    what, topic = _target(args, topics)
    session = Session(settings, [])
    try:
        session.publish(topic, b"", retain=True)
    finally:
        session.close()
    printer.result({"topic": topic, "cleared": True}, f"desired tag of {what} cleared")
    return EXIT_OK


def cmd_request(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    """``check`` and ``install``: a command, answered on an MQTT 5 response topic."""
    install = args.command == "install"
    topics = Topics(settings.topic_prefix)
    request_id = uuid.uuid4().hex
    if args.device:
        topic = topics.device_install(args.device) if install else topics.device_check(
            args.device)
    else:
        topic = topics.fleet_check
    if args.wait and not args.device:
        raise CtlError("--wait needs --device", EXIT_USAGE)
    if args.wait and settings.protocol != "5":
        raise CtlError("--wait needs MQTT 5 (response topics); unset MQTT_PROTOCOL", EXIT_USAGE)
    response_topic = topics.reply(args.device, request_id) if args.wait else None
    properties = None
    if response_topic is not None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.ResponseTopic = response_topic
        properties.CorrelationData = request_id.encode()
    session = Session(settings, [response_topic] if response_topic else [])
    try:
        session.publish(topic, json.dumps({"request_id": request_id}).encode(), retain=False,
                        properties=properties)
        if response_topic is None:
            printer.result({"topic": topic, "request_id": request_id},
                           f"{args.command} sent to {topic}")
            return EXIT_OK
        printer.note(f"{args.command} sent to {args.device}; waiting for its answer")
        for message in session.messages(args.timeout):
            answer = message.json()
            if message.correlation == request_id.encode() and answer is not None:
                break
        else:
            raise CtlError(f"no answer from {args.device} within {args.timeout:g} s "
                           "(offline, or busy with an update?)", EXIT_TIMEOUT)
    finally:
        session.close()
    ok = answer.get("ok") is True and answer.get("outcome") not in ("rolled_back", "skipped")
    if answer.get("error"):
        text = f"{args.device}: {args.command} failed: {printable(answer['error'])}"
    else:
        text = f"{args.device}: {describe_outcome(answer)}"
    printer.result(answer, text)
    return EXIT_OK if ok else EXIT_FAILED


OUTCOMES = {
    "unchanged": "up to date: runs {tag}",
    "updated": "updated to {tag}",
    "started": "{tag} was not running: started it",
    "rolled_back": "update to {tag} rolled back",
    "skipped": "{tag} not applied: this digest failed verification before "
               "(push a new image or set another tag)",
    "available": "update to {tag} available (UPDATE_MODE=notify): edge-ctl install",
    "interrupted": "update to {tag} interrupted (the agent is stopping)",
}


def describe_outcome(answer: dict[str, Any]) -> str:
    """A device's answer to check/install in words (safe to print)."""
    outcome = answer.get("outcome")
    tag = printable(_text(answer, "tag") or "-", CELL_CHARS)
    template = OUTCOMES.get(outcome) if isinstance(outcome, str) else None
    if template is None:  # never a device string as a format template
        return f"{printable(outcome, CELL_CHARS)} ({tag})"
    return template.format(tag=tag)


def cmd_watch(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    if args.device:
        subscriptions = [topics.events(args.device), topics.availability(args.device),
                         topics.state(args.device)]
    else:
        subscriptions = [topics.all_events, topics.all_availability, topics.all_states]
    session = Session(settings, subscriptions)
    statuses: dict[str, str] = {}
    count = 0
    try:
        for message in session.retained():  # where everyone stands; not news
            device_id = topics.device_of(message.topic)
            body = message.json()
            if device_id and message.topic == topics.state(device_id) and body is not None:
                statuses[device_id] = _text(body, "update", "status") or "-"
        printer.note(f"watching {args.device or 'every device'} under {topics.prefix}/ "
                     "(Ctrl-C to stop)")
        for message in session.messages(args.timeout):
            if watch_line(topics, message, statuses, printer):
                count += 1
                if args.count and count >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return EXIT_OK


def watch_line(topics: Topics, message: Incoming, statuses: dict[str, str],
               printer: Printer) -> bool:
    """Show one message; True when it was an event (what --count counts). The device's
    id comes from the topic (the broker's ACL vouches for it), never from the payload."""
    device_id = topics.device_of(message.topic) or "?"
    who = printable(device_id, CELL_CHARS)
    if message.topic == topics.availability(device_id):
        text = message.payload.decode(errors="replace").strip() or "(cleared)"
        printer.result({"type": "availability", "device_id": device_id, "availability": text},
                       f"{_clock(None)}  {who}  is {printable(text, CELL_CHARS)}")
        return False
    is_state = message.topic == topics.state(device_id)
    try:
        body = message.document()
    except UntrustedJson as exc:
        kind = "state" if is_state else "event"
        printer.note_once((device_id, kind, str(exc)),
                          f"{_clock(None)}  {who}  sent an unreadable {kind} (ignored): {exc}")
        return False
    if is_state:
        status = _text(body, "update", "status") or "-"
        if statuses.get(device_id) == status:
            return False
        statuses[device_id] = status
        if status == "pulling":
            return False  # the progress events tell that story
        printer.result({"type": "status", "device_id": device_id, "status": status,
                        "state": body},
                       f"{_clock(body.get('ts'))}  {who}  status {status_text(body)}")
        return False
    event = body.get("event")
    if event == "update_started":
        printer.new_pull(device_id)
    if event == "pull_progress" and not printer.as_json:
        printer.progress(device_id, _text(body, "tag") or "-",
                         _percent(body.get("progress")) or 0.0)
        return True
    name = printable(_text(body, "event") or "?", CELL_CHARS)
    request_id = body.get("request_id")
    request = f"  [request {printable(request_id, CELL_CHARS)}]" if request_id else ""
    printer.result({**body, "type": "event", "device_id": device_id},
                   f"{_clock(body.get('ts'))}  {who}  {name}  {event_details(body)}{request}")
    return True


def event_details(body: dict[str, Any]) -> str:
    """``key=value ...`` of an event's own fields, each ``printable``, at most MAX_DETAILS."""
    skip = ("event", "ts", "device_id", "request_id")
    shown = [(key, value) for key, value in body.items() if key not in skip and value is not None]
    parts = [f"{printable(key, CELL_CHARS)}={printable(value, CELL_CHARS * 2)}"
             for key, value in shown[:MAX_DETAILS]]
    if len(shown) > MAX_DETAILS:
        parts.append(f"(+{len(shown) - MAX_DETAILS} more)")
    return " ".join(parts)


# -- the command line ------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group(
        "common options (the broker options override the MQTT_* environment)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output (JSON; one object per line for watch)")
    group.add_argument("-H", "--host", default=argparse.SUPPRESS,
                       help="broker host (MQTT_HOST; default localhost)")
    group.add_argument("-p", "--port", default=argparse.SUPPRESS, help="broker port (MQTT_PORT)")
    group.add_argument("-u", "--username", default=argparse.SUPPRESS,
                       help="user with the operator ACL (MQTT_USERNAME)")
    group.add_argument("--password-file", default=argparse.SUPPRESS,
                       help="file holding the password (MQTT_PASSWORD_FILE)")
    group.add_argument("--prefix", default=argparse.SUPPRESS,
                       help="topic prefix (MQTT_TOPIC_PREFIX; default edge)")

    parser = argparse.ArgumentParser(
        prog="edge-ctl", parents=[common],
        description="Operate an edge-agent fleet over MQTT: list devices, set desired tags, "
        "send checks, watch updates.",
        epilog="The broker connection uses the agent's MQTT_* variables (see edge-agent "
        "--help). Exit codes: 0 done, 1 not applied (rolled back, rejected, failed), "
        "2 usage, 3 no answer in time or broker unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"edge-ctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = commands.add_parser("devices", parents=[common],
                                  help="table of the fleet: online, running/desired tag, status")
    devices.add_argument("device", nargs="*", help="only these devices")

    def scope(sub: argparse.ArgumentParser, *, groups: bool = True) -> None:
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("--device", "-d", metavar="ID")
        if groups:
            target.add_argument("--group", "-g", metavar="NAME")
        target.add_argument("--fleet", action="store_true")

    def waiting(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--wait", action="store_true", help=what)
        sub.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S, metavar="S",
                         help=f"how long --wait waits (default {DEFAULT_WAIT_S:g} s)")

    set_tag = commands.add_parser(
        "set-tag", parents=[common], help="set the desired tag of a device, a group or the fleet")
    set_tag.add_argument("tag", help="image tag, or sha256:<digest>")
    scope(set_tag)
    waiting(set_tag, "(with --device) return once the device runs it; exit 1 with the reason "
            "if it rolled back or refused it")
    set_tag.add_argument("--request-id", help="request id to send (default: a random one)")

    clear_tag = commands.add_parser("clear-tag", parents=[common],
                                    help="remove the desired tag of a device, group or fleet")
    scope(clear_tag)

    check = commands.add_parser("check", parents=[common],
                                help="ask a device (or the fleet) to check the registry now")
    scope(check, groups=False)
    waiting(check, "(with --device) wait for the device's answer")

    install = commands.add_parser(
        "install", parents=[common], help="apply a pending update (UPDATE_MODE=notify)")
    install.add_argument("--device", "-d", metavar="ID", required=True)
    install.set_defaults(fleet=False)
    waiting(install, "wait for the device's answer (the update's outcome)")

    watch = commands.add_parser("watch", parents=[common],
                                help="live view of events and status changes, with pull progress")
    watch.add_argument("--device", "-d", metavar="ID", help="only this device")
    watch.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N events")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, MqttSettings, Printer], int]] = {
    "devices": cmd_devices,
    "set-tag": cmd_set_tag,
    "clear-tag": cmd_clear_tag,
    "check": cmd_request,
    "install": cmd_request,
    "watch": cmd_watch,
}


def check_ids(args: argparse.Namespace) -> None:
    """Device ids and group names are one topic level: no wildcards, no separators."""
    for option in ("device", "group"):
        values = getattr(args, option, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not ID_RE.fullmatch(value):
                raise CtlError(f"--{option} {value!r} must match {ID_PATTERN}", EXIT_USAGE)
    request_id = getattr(args, "request_id", None)
    if request_id is not None and not is_request_id(request_id):
        raise CtlError(f"--request-id must match {REQUEST_ID_PATTERN}", EXIT_USAGE)


def mqtt_settings(args: argparse.Namespace, environ: dict[str, str]) -> MqttSettings:
    env = dict(environ)
    overrides = {"host": "MQTT_HOST", "port": "MQTT_PORT", "username": "MQTT_USERNAME",
                 "password_file": "MQTT_PASSWORD_FILE", "prefix": "MQTT_TOPIC_PREFIX"}
    for option, variable in overrides.items():
        value = getattr(args, option, None)
        if value is not None:
            env[variable] = str(value)
    if getattr(args, "password_file", None):
        env.pop("MQTT_PASSWORD", None)
    env.setdefault("MQTT_HOST", "localhost")
    if not env["MQTT_HOST"].strip():
        env["MQTT_HOST"] = "localhost"
    return load_mqtt_settings(env)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # a terminal or pipe that cannot show a device's characters gets escapes, not a crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, format="edge-ctl: %(message)s")
    # connect_client logs its retries at WARNING; for a one-shot tool the final error says it
    logging.getLogger("edge_agent.agent.link").setLevel(logging.ERROR)
    printer = Printer(bool(getattr(args, "json", False)))
    try:
        check_ids(args)
        settings = mqtt_settings(args, dict(os.environ))
        return COMMANDS[args.command](args, settings, printer)
    except ConfigError as exc:
        print(f"edge-ctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"edge-ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
