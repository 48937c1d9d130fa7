"""The bridge's device registry and the ``?wait`` machinery. No sockets, no paho.

``Fleet.handle`` is fed every message of ``P/devices/+/state``, ``.../availability``
and ``.../events`` (from the MQTT network thread); HTTP threads read snapshots and
wait on ``Waiter`` objects. All shared data sits behind one lock, held only briefly.

``?wait`` (SPEC section 7) ends on the answers of ``edge_agent.answers`` that
``wait_answer`` keeps: 200 when ok, 409 otherwise; anything else keeps waiting until
the deadline (checking, pulling, verifying, an error the device retries after, notify
mode waiting for install).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from edge_agent.answers import Answer, judge_event, judge_state
from edge_agent.topics import Topics

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 256 * 1024
MAX_DEVICES = 10_000
MAX_WAITERS = 1_000
REFINE_S = 1.0
AVAILABILITY_VALUES = frozenset({"online", "offline"})
# event fields worth showing on the fleet page, in this order
EVENT_SUMMARY_FIELDS = ("event", "ts", "request_id", "tag", "reason", "error")


def iso_utc(epoch: float) -> str:
    """``2024-05-01T12:00:00.000Z`` (the agent's format)."""
    return (datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"))


def parse_ts(value: object) -> float | None:
    """An ISO 8601 timestamp from a device as epoch seconds, or None."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def wait_answer(answer: Answer | None) -> Answer | None:
    """The answer that ends a ``?wait`` (200 if ok, else 409); None keeps waiting."""
    if answer is None or not answer.settled:
        return None  # not the last word yet: notify mode's "available", a fallback pulling
    if answer.outcome == "updated":
        return None  # the idle state just before update_succeeded answers, state and all
    if answer.outcome == "not_running":
        # ?wait answers on the installed tag (installed_version); whether its container
        # still runs is for GET /api/v1/devices to show
        return replace(answer, ok=True)
    return answer


@dataclass(eq=False)
class Waiter:
    """One HTTP request waiting for a device to answer ``request_id``."""

    device_id: str
    request_id: str
    tag: str
    answer: Answer | None = None
    done: threading.Event = field(default_factory=threading.Event)
    refined: threading.Event = field(default_factory=threading.Event)

    def settle(self, answer: Answer | None) -> None:
        """The first answer that ends the wait wins, except that the event explaining a
        conflict seen in the state (the agent publishes the state just before the event)
        refines it."""
        answer = wait_answer(answer)
        if answer is None:
            return
        if self.answer is None:
            self.answer = answer
            self.done.set()
        elif (not self.answer.ok and self.answer.event is None and not answer.ok
              and answer.event is not None):
            self.answer = answer
            self.refined.set()

    def wait(self, timeout_s: float, refine_s: float = REFINE_S) -> Answer | None:
        """The answer, or None when the device did not answer within ``timeout_s``.
        A conflict seen only in the state waits up to ``refine_s`` for its event."""
        deadline = time.monotonic() + timeout_s
        self.done.wait(timeout_s)
        answer = self.answer
        if answer is not None and not answer.ok and answer.event is None:
            remaining = deadline - time.monotonic()
            if remaining > 0 and self.refined.wait(min(refine_s, remaining)):
                answer = self.answer
        return answer


class TooManyWaiters(Exception):
    """More ``?wait`` requests are pending than the bridge accepts at once."""


@dataclass
class Device:
    """What the bridge knows about one device."""

    device_id: str
    state: dict[str, Any] | None = None
    availability: str | None = None
    last_seen: float | None = None
    last_event: dict[str, Any] | None = None

    def seen(self, when: float | None) -> None:
        if when is not None and (self.last_seen is None or when > self.last_seen):
            self.last_seen = when

    def view(self) -> dict[str, Any]:
        """The JSON shown by ``GET /api/v1/devices/<id>`` and in the list."""
        online = None if self.availability is None else self.availability == "online"
        return {
            "id": self.device_id,
            "online": online,
            "availability": self.availability or "unknown",
            "last_seen": iso_utc(self.last_seen) if self.last_seen is not None else None,
            "state": self.state,
            "last_event": self.last_event,
        }


class Fleet:
    """Devices by id, built from retained state/availability plus live events."""

    def __init__(
        self,
        topics: Topics,
        *,
        max_devices: int = MAX_DEVICES,
        max_waiters: int = MAX_WAITERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.max_devices = max_devices
        self.max_waiters = max_waiters
        self._clock = clock
        self._lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        self._waiters: dict[str, list[Waiter]] = {}
        self._waiter_count = 0
        self._version = 0
        self._cached_version = -1
        self._cached_list = b"[]"
        self._full_warned = False

    # -- incoming messages (MQTT thread) ------------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Take one message from a device topic; anything malformed is ignored."""
        device_id = self.topics.device_of(topic)
        if device_id is None:
            return
        kind = topic[len(f"{self.topics.prefix}/devices/{device_id}/"):]
        if kind == "state":
            self._on_state(device_id, payload, retained)
        elif kind == "availability":
            self._on_availability(device_id, payload, retained)
        elif kind == "events":
            self._on_event(device_id, payload)

    def _on_state(self, device_id: str, payload: bytes, retained: bool) -> None:
        if not payload:
            with self._lock:
                device = self._devices.get(device_id)
                if device is not None:
                    device.state = None
                    self._forget_if_empty(device)
                    self._version += 1
            return
        document = _json_object(payload, MAX_STATE_BYTES)
        if document is None:
            log.debug("ignored malformed state of %r", device_id)
            return
        with self._lock:
            device = self._device(device_id)
            if device is None:
                return
            device.state = document
            stamped = parse_ts(document.get("ts"))
            device.seen(stamped if retained else self._clock())
            self._version += 1
            waiters = list(self._waiters.get(device_id, ()))
        for waiter in waiters:
            waiter.settle(judge_state(document, waiter.request_id, waiter.tag))

    def _on_availability(self, device_id: str, payload: bytes, retained: bool) -> None:
        value = payload.decode("utf-8", "replace").strip().lower()
        if value and value not in AVAILABILITY_VALUES:
            log.debug("ignored availability %r of %r", value[:20], device_id)
            return
        with self._lock:
            if not value:
                device = self._devices.get(device_id)
                if device is not None:
                    device.availability = None
                    self._forget_if_empty(device)
                    self._version += 1
                return
            device = self._device(device_id)
            if device is None:
                return
            device.availability = value
            if not retained:
                device.seen(self._clock())
            self._version += 1

    def _on_event(self, device_id: str, payload: bytes) -> None:
        event = _json_object(payload, MAX_STATE_BYTES)
        if event is None:
            log.debug("ignored malformed event of %r", device_id)
            return
        with self._lock:
            waiters = list(self._waiters.get(device_id, ()))
            device = self._devices.get(device_id)
            if device is not None:
                device.seen(self._clock())
                if event.get("event") != "pull_progress":
                    device.last_event = {k: event[k] for k in EVENT_SUMMARY_FIELDS if k in event}
                self._version += 1
        for waiter in waiters:
            waiter.settle(judge_event(event, waiter.request_id, waiter.tag))

    def _device(self, device_id: str) -> Device | None:
        """The device, created if there is room (caller holds the lock)."""
        device = self._devices.get(device_id)
        if device is None:
            if len(self._devices) >= self.max_devices:
                if not self._full_warned:
                    log.warning("device registry full (%d devices); ignoring new devices",
                                self.max_devices)
                    self._full_warned = True
                return None
            device = self._devices[device_id] = Device(device_id)
        return device

    def _forget_if_empty(self, device: Device) -> None:
        if device.state is None and device.availability is None:
            del self._devices[device.device_id]

    # -- reads (HTTP threads) -------------------------------------------------------
    def list_json(self) -> bytes:
        """All devices as a JSON array, sorted by id; cached until something changes."""
        with self._lock:
            if self._cached_version != self._version:
                views = [self._devices[k].view() for k in sorted(self._devices)]
                self._cached_list = json.dumps(views, separators=(",", ":")).encode()
                self._cached_version = self._version
            return self._cached_list

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            device = self._devices.get(device_id)
            return None if device is None else json.loads(json.dumps(device.view()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)

    # -- waiting ----------------------------------------------------------------------
    def add_waiter(self, device_id: str, request_id: str, tag: str) -> Waiter:
        """Register before publishing, so no answer can slip past. Raises TooManyWaiters."""
        waiter = Waiter(device_id, request_id, tag)
        with self._lock:
            if self._waiter_count >= self.max_waiters:
                raise TooManyWaiters(f"{self._waiter_count} requests are already waiting")
            self._waiters.setdefault(device_id, []).append(waiter)
            self._waiter_count += 1
            device = self._devices.get(device_id)
            state = device.state if device is not None else None
        # a retried request id may already be settled (idempotent retries)
        if state is not None:
            waiter.settle(judge_state(state, request_id, tag))
        return waiter

    def remove_waiter(self, waiter: Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(waiter.device_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
                self._waiter_count -= 1
            if not waiters:
                self._waiters.pop(waiter.device_id, None)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._waiter_count


def _json_object(payload: bytes, limit: int) -> dict[str, Any] | None:
    if len(payload) > limit:
        return None
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
