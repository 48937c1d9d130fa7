"""The bridge's device registry and the ``?wait`` machinery. No sockets, no paho.

``Fleet.handle`` is fed every message of ``P/devices/+/state``, ``.../availability``
and ``.../events`` (from the MQTT network thread); HTTP threads read snapshots and
wait on ``Waiter`` objects. All shared data sits behind one lock, held only briefly.

Device data is untrusted: payloads go through the bounded decoder (``safejson``) and
every field through ``device_data`` before the bridge keeps it. Each device has a
budget of bytes per second; past it the bridge keeps only the device's latest state
(applied by ``flush_pending`` once the device slows down) and drops its events, at
the cost of a dictionary lookup, so one flooding device cannot delay the others.

``?wait`` (docs/PROTOCOL.md, section 9) ends on the answers of ``edge_agent.protocol.answers`` that
``wait_answer`` keeps: 200 when ok, 409 otherwise; anything else keeps waiting until
the deadline (checking, pulling, verifying, an error the device retries after, notify
mode waiting for install).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from edge_agent.bridge.fleetview import DeviceFilter, Tally, sort_key
from edge_agent.protocol import precedence, safejson
from edge_agent.protocol.answers import Answer, judge_event, judge_state
from edge_agent.protocol.device_data import clean_event, clean_state, dropped_fields, seen_at
from edge_agent.protocol.events import EventName
from edge_agent.protocol.timestamps import format_utc
from edge_agent.protocol.topics import ID_RE, Topics
from edge_agent.rollout.desired import DesiredTags

log = logging.getLogger(__name__)

# An agent's state is about 1 KiB, its events a few hundred bytes.
MAX_STATE_BYTES = 64 * 1024
MAX_EVENT_BYTES = 16 * 1024
MAX_AVAILABILITY_BYTES = 16
MAX_DEPTH = 8  # the state document nests three levels
MAX_DEVICES = 10_000
MAX_WAITERS = 1_000
REFINE_S = 1.0
AVAILABILITY_VALUES = frozenset({"online", "offline"})
# Per device: a burst of 1 MiB (an agent pulling an image publishes ~250 KiB of progress
# in a few seconds), then 128 KiB/s; every message counts at least 1 KiB.
BUDGET_BURST_BYTES = 1024 * 1024
BUDGET_RATE_BYTES = 128 * 1024
BUDGET_MIN_COST = 1024
# While one device floods, the broker may drop messages of others on their way to the
# bridge (its queue for a slow subscriber is bounded). The bridge then fetches every
# retained state again: once the flood has been over for RESYNC_QUIET_S, and every
# RESYNC_EVERY_S while it lasts.
RESYNC_QUIET_S = 2.0
RESYNC_EVERY_S = 30.0
# the recent events kept per device for the page's detail view: a count and a byte
# budget (a device's events are untrusted; each is at most a few KiB once cleaned)
MAX_RECENT_EVENTS = 20
MAX_RECENT_EVENT_BYTES = 16 * 1024
# a change feed (the page's live stream) remembers this many changed devices between
# two reads; past it, it says "everything changed" and the page fetches its view again
MAX_FEED_IDS = 1000
# the events the bridge counts for /metrics (progress is not an outcome)
COUNTED_EVENTS = tuple(str(name) for name in EventName if name != EventName.PULL_PROGRESS)


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


@dataclass(eq=False)
class ChangeFeed:
    """The devices changed since a reader last looked (guarded by the fleet's lock)."""

    ids: set[str] = field(default_factory=set)
    overflow: bool = False
    ready: threading.Event = field(default_factory=threading.Event)

    def add(self, device_id: str) -> None:
        if not self.overflow:
            if len(self.ids) >= MAX_FEED_IDS:
                self.overflow = True
                self.ids = set()
            else:
                self.ids.add(device_id)
        self.ready.set()


class TooManyWaiters(Exception):
    """More ``?wait`` requests are pending than the bridge accepts at once."""


@dataclass
class Budget:
    """A token bucket of bytes for one device's messages."""

    tokens: float
    at: float

    def refill(self, now: float) -> float:
        self.tokens = min(BUDGET_BURST_BYTES,
                          self.tokens + max(0.0, now - self.at) * BUDGET_RATE_BYTES)
        self.at = now
        return self.tokens

    def take(self, cost: int, now: float) -> bool:
        if self.refill(now) < cost:
            return False
        self.tokens -= cost
        return True


@dataclass
class Pending:
    """A device's latest state that arrived past its budget, not looked at yet."""

    payload: bytes
    retained: bool
    seq: int


@dataclass
class Device:
    """What the bridge knows about one device, every field already checked."""

    device_id: str
    state: dict[str, Any] | None = None
    availability: str | None = None
    last_seen: float | None = None
    last_event: dict[str, Any] | None = None
    state_seq: int = 0  # arrival order of the state shown
    # the group or fleet tag its own tag overrides (protocol.precedence.shadowed)
    shadows: dict[str, Any] | None = None
    # the last events but pull_progress, oldest first, with their sizes in bytes
    recent: deque[tuple[dict[str, Any], int]] = field(default_factory=deque)
    recent_bytes: int = 0
    _json: bytes | None = None  # the view, serialised once per change
    _view: dict[str, Any] | None = None  # and parsed back, for filtering and counting

    def seen(self, when: float | None) -> None:
        if when is not None and (self.last_seen is None or when > self.last_seen):
            self.last_seen = when

    def changed(self) -> None:
        self._json = None
        self._view = None

    def remember(self, event: dict[str, Any]) -> None:
        """Keep ``event`` among the recent ones, within the count and the byte budget."""
        size = len(_dumps(event))
        self.recent.append((event, size))
        self.recent_bytes += size
        while self.recent and (len(self.recent) > MAX_RECENT_EVENTS
                               or self.recent_bytes > MAX_RECENT_EVENT_BYTES):
            self.recent_bytes -= self.recent.popleft()[1]

    def checked_view(self) -> dict[str, Any]:
        """The view as the list shows it (what ``json`` holds), cached until a change."""
        if self._view is None:
            self._view = json.loads(self.json())
        return self._view

    def view(self) -> dict[str, Any]:
        """The JSON shown by ``GET /api/v1/devices/<id>`` and in the list."""
        online = None if self.availability is None else self.availability == "online"
        return {
            "id": self.device_id,
            "online": online,
            "availability": self.availability or "unknown",
            "last_seen": format_utc(self.last_seen) if self.last_seen is not None else None,
            "state": self.state,
            "last_event": self.last_event,
            "shadows": self.shadows,
        }

    def json(self) -> bytes:
        """The view as strict JSON. Whatever is wrong with one device's data shows as
        that device without state, never as a broken list."""
        if self._json is None:
            try:
                self._json = _dumps(self.view())
            except (ValueError, TypeError, OverflowError, RecursionError) as exc:
                log.error("cannot show the data of device %s (%s); showing it without",
                          self.device_id, exc)
                self.state = self.last_event = None
                self.last_seen = None
                self.recent.clear()
                self.recent_bytes = 0
                self._json = _dumps(self.view())
        return self._json


@dataclass(frozen=True)
class DeviceSnapshot:
    """One device as ``/metrics`` reads it (the state is never changed in place)."""

    device_id: str
    state: dict[str, Any] | None
    availability: str | None
    last_seen: float | None


@dataclass(frozen=True)
class FleetSnapshot:
    """Everything ``/metrics`` shows, taken at once under the lock."""

    devices: list[DeviceSnapshot]
    events: dict[str, int]  # event name -> received since the bridge started
    throttled: int  # devices over their message budget now


class Fleet:
    """Devices by id, built from retained state/availability plus live events."""

    def __init__(
        self,
        topics: Topics,
        *,
        max_devices: int = MAX_DEVICES,
        max_waiters: int = MAX_WAITERS,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        # the retained desired tags (the rollout controller reads them too)
        self.desired = DesiredTags(topics)
        self.max_devices = max_devices
        self.max_waiters = max_waiters
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._devices: dict[str, Device] = {}
        self._waiters: dict[str, list[Waiter]] = {}
        self._waiter_count = 0
        self._version = 0
        self._cached_version = -1
        self._cached_list = b"[]"
        self._full_warned = False
        # kept apart from the devices, so forgetting a device does not refill its budget
        self._budgets: dict[str, Budget] = {}
        self._pending: dict[str, Pending] = {}
        self._throttled: dict[str, int] = {}  # device -> messages dropped since throttled
        self._complaints: dict[tuple[str, str], str] = {}  # (device, topic) -> last logged
        self._seq = 0
        self._event_counts = dict.fromkeys(COUNTED_EVENTS, 0)
        self._flood_at: float | None = None  # when a message was last skipped
        self._resynced_at = 0.0
        # called with (device id, cleaned event) for every event (the rollout controller)
        self.event_listeners: list[Callable[[str, dict[str, Any]], None]] = []
        # a copy of the group and fleet tags, to show which ones a device tag shadows
        self._scope_tags: tuple[dict[str, str], str | None] = ({}, None)
        self._feeds: set[ChangeFeed] = set()
        self._summary_version = -1
        self._summary: dict[str, Any] = {}
        # the counts, brought up to date with the devices changed since (``summary``)
        self._tally = Tally()
        self._untallied: set[str] = set()

    # -- incoming messages (MQTT thread) ------------------------------------------
    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Take one message from a device topic or a desired tag (device, group, fleet);
        anything malformed is ignored."""
        if self.desired.handle(topic, payload, retained):
            self._on_scope_tags(self.desired.scope_tags())
            return
        device_id = self.topics.device_of(topic)
        if device_id is None or not ID_RE.fullmatch(device_id):
            return
        kind = topic[len(f"{self.topics.prefix}/devices/{device_id}/"):]
        if kind not in ("state", "availability", "events"):
            return
        with self._lock:
            if not self._within_budget(device_id, kind, payload, retained):
                return
            self._seq += 1
            seq = self._seq
            if kind == "state":
                self._pending.pop(device_id, None)  # this one is newer
        if kind == "state":
            self._on_state(device_id, payload, retained, seq)
        elif kind == "availability":
            self._on_availability(device_id, payload, retained)
        else:
            self._on_event(device_id, payload)

    def flush_pending(self) -> None:
        """Apply the latest state of each throttled device whose budget allows it again
        (the bridge calls this a few times a second)."""
        with self._lock:
            now = self._monotonic()
            ready = []
            for device_id, pending in list(self._pending.items()):
                if self._budget(device_id).take(_cost(pending.payload), now):
                    ready.append((device_id, self._pending.pop(device_id)))
        for device_id, pending in ready:
            self._on_state(device_id, pending.payload, pending.retained, pending.seq)

    def _within_budget(self, device_id: str, kind: str, payload: bytes,
                       retained: bool) -> bool:
        """Charge the device's budget (caller holds the lock). Past it, a state is kept
        unread as the device's pending state and an event is dropped, until the budget
        is half full again."""
        if kind == "availability":
            return True  # a few bytes at most, and what the page needs most
        budget = self._budget(device_id)
        tokens = budget.refill(self._monotonic())
        cost = _cost(payload)
        throttled = device_id in self._throttled
        if throttled and tokens >= BUDGET_BURST_BYTES / 2:
            log.info("device %s is within its message budget again (%d messages skipped)",
                     device_id, self._throttled.pop(device_id))
            throttled = False
        if not throttled and tokens >= cost:
            budget.tokens -= cost
            return True
        now = self._monotonic()
        if self._flood_at is None:
            self._resynced_at = now  # the first resync comes RESYNC_EVERY_S from here
        self._flood_at = now
        if not throttled:
            log.warning("device %s publishes more than %d KiB/s; showing its latest state "
                        "and dropping its events until it slows down", device_id,
                        BUDGET_RATE_BYTES // 1024)
            self._throttled[device_id] = 0
        self._throttled[device_id] += 1
        if kind == "state":
            self._seq += 1
            self._pending[device_id] = Pending(payload, retained, self._seq)
        return False

    def resync_due(self) -> bool:
        """True (once each time) when the bridge should fetch every retained state and
        availability again, because a flood may have made the broker drop some."""
        with self._lock:
            if self._flood_at is None:
                return False
            now = self._monotonic()
            if now - self._flood_at >= RESYNC_QUIET_S:
                self._flood_at = None
            elif now - self._resynced_at < RESYNC_EVERY_S:
                return False
            self._resynced_at = now
            return True

    def _budget(self, device_id: str) -> Budget:
        budget = self._budgets.get(device_id)
        if budget is None:
            if len(self._budgets) >= 2 * self.max_devices:
                self._prune_budgets()
            budget = self._budgets[device_id] = Budget(BUDGET_BURST_BYTES, self._monotonic())
        return budget

    def _prune_budgets(self) -> None:
        """Forget full budgets: a device seen again starts with a full one anyway."""
        now = self._monotonic()
        for device_id, budget in list(self._budgets.items()):
            if budget.refill(now) >= BUDGET_BURST_BYTES and device_id not in self._pending:
                del self._budgets[device_id]

    def _on_state(self, device_id: str, payload: bytes, retained: bool, seq: int) -> None:
        document: dict[str, Any] | None = None
        problem = None
        if payload:
            try:
                raw = safejson.loads_object(payload, max_bytes=MAX_STATE_BYTES,
                                            max_depth=MAX_DEPTH)
            except safejson.UntrustedJson as exc:
                problem = f"an invalid state ({exc}); showing none"
            else:
                document = clean_state(raw)
                left_out = dropped_fields(raw, document)
                if left_out:
                    problem = (f"a state with invalid or unknown fields "
                               f"({', '.join(left_out[:5])}); showing the others")
        with self._lock:
            self._complain(device_id, "state", problem)
            device = self._devices.get(device_id)
            if device is not None and seq < device.state_seq:
                return  # a newer state was applied meanwhile
            if document is None:  # cleared, or invalid: the device's state is unknown
                if device is not None:
                    device.state = device.shadows = None
                    device.state_seq = seq
                    if not retained and payload:
                        device.seen(self._clock())
                    self._cleared(device)
                return
            device = self._device(device_id)
            if device is None:
                return
            device.state = document
            device.state_seq = seq
            device.shadows = precedence.shadowed(document, *self._scope_tags)
            now = self._clock()
            # a live message is seen now; a retained one when its ts says, if plausible
            device.seen(seen_at(document.get("ts"), now) if retained else now)
            self._changed(device)
            waiters = list(self._waiters.get(device_id, ()))
        for waiter in waiters:
            waiter.settle(judge_state(document, waiter.request_id, waiter.tag))

    def _on_scope_tags(self, scope_tags: tuple[dict[str, str], str | None]) -> None:
        """The group and fleet tags after a desired tag came: which device tags shadow
        them is shown with each device."""
        with self._lock:
            if scope_tags == self._scope_tags:
                return  # a device tag, or the same again
            self._scope_tags = scope_tags
            for device in self._devices.values():
                shadows = precedence.shadowed(device.state, *scope_tags)
                if shadows != device.shadows:
                    device.shadows = shadows
                    self._changed(device)

    def _on_availability(self, device_id: str, payload: bytes, retained: bool) -> None:
        value = payload[:MAX_AVAILABILITY_BYTES + 1].decode("utf-8", "replace").strip().lower()
        if len(payload) > MAX_AVAILABILITY_BYTES or (value and value not in AVAILABILITY_VALUES):
            with self._lock:
                self._complain(device_id, "availability",
                               "an availability other than online or offline")
            return
        with self._lock:
            self._complain(device_id, "availability", None)
            if not value:
                device = self._devices.get(device_id)
                if device is not None:
                    device.availability = None
                    self._cleared(device)
                return
            device = self._device(device_id)
            if device is None:
                return
            device.availability = value
            if not retained:
                device.seen(self._clock())
            self._changed(device)

    def _on_event(self, device_id: str, payload: bytes) -> None:
        with self._lock:
            if device_id not in self._devices and device_id not in self._waiters:
                return  # nobody shows or waits for it: not worth decoding
        try:
            event = clean_event(safejson.loads_object(payload, max_bytes=MAX_EVENT_BYTES,
                                                      max_depth=MAX_DEPTH))
            problem = None if event is not None else "an event without a valid name"
        except safejson.UntrustedJson as exc:
            event, problem = None, f"an invalid event ({exc})"
        with self._lock:
            self._complain(device_id, "events", problem)
            if event is None:
                return
            waiters = list(self._waiters.get(device_id, ()))
            device = self._devices.get(device_id)
            if device is not None:
                device.seen(self._clock())
                if event["event"] != "pull_progress":
                    device.last_event = event
                    device.remember(event)
                if event["event"] in self._event_counts:
                    self._event_counts[event["event"]] += 1
                self._changed(device)
        for waiter in waiters:
            waiter.settle(judge_event(event, waiter.request_id, waiter.tag))
        for listener in self.event_listeners:
            listener(device_id, event)

    def _complain(self, device_id: str, kind: str, problem: str | None) -> None:
        """Log a device's bad data once, until it publishes good data on that topic
        again, not at every message (caller holds the lock)."""
        key = (device_id, kind)
        if problem is None:
            self._complaints.pop(key, None)
            return
        if self._complaints.get(key) == problem:
            return
        if len(self._complaints) >= self.max_devices:
            self._complaints.clear()
        self._complaints[key] = problem
        log.warning("device %s published %s", device_id, problem)

    def _changed(self, device: Device) -> None:
        device.changed()
        self._version += 1
        self._untallied.add(device.device_id)
        for feed in self._feeds:
            feed.add(device.device_id)

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

    def _cleared(self, device: Device) -> None:
        """After a field of ``device`` was cleared: forget it when nothing is left."""
        if device.state is None and device.availability is None:
            del self._devices[device.device_id]
        self._changed(device)

    # -- reads (HTTP threads) -------------------------------------------------------
    def list_json(self) -> bytes:
        """All devices as a JSON array, sorted by id; cached until something changes."""
        with self._lock:
            if self._cached_version != self._version:
                parts = [self._devices[k].json() for k in sorted(self._devices)]
                self._cached_list = b"[" + b",".join(parts) + b"]"
                self._cached_version = self._version
            return self._cached_list

    def device(self, device_id: str) -> dict[str, Any] | None:
        with self._lock:
            device = self._devices.get(device_id)
            data = None if device is None else device.json()
        view: dict[str, Any] | None = None if data is None else json.loads(data)
        return view

    def recent_events(self, device_id: str) -> list[dict[str, Any]]:
        """A device's last events but pull_progress, oldest first."""
        with self._lock:
            device = self._devices.get(device_id)
            return [] if device is None else [event for event, _ in device.recent]

    def query(self, match: DeviceFilter, sort: str = "id", descending: bool = False,
              offset: int = 0, limit: int | None = None) -> tuple[int, list[bytes]]:
        """The devices that match, sorted, one page of them: (how many match, their
        views as JSON)."""
        with self._lock:
            devices = [d for d in self._devices.values()
                       if match.empty or match.matches(d.checked_view())]
            devices.sort(key=lambda d: sort_key(sort, d.checked_view()), reverse=descending)
            end = None if limit is None else offset + limit
            return len(devices), [d.json() for d in devices[offset:end]]

    def views_json(self, device_ids: set[str]) -> tuple[list[bytes], list[str]]:
        """The views of those of ``device_ids`` still known, and the ids now gone."""
        with self._lock:
            found = [self._devices[d].json() for d in sorted(device_ids) if d in self._devices]
            gone = sorted(d for d in device_ids if d not in self._devices)
            return found, gone

    def summary(self) -> dict[str, Any]:
        """Counts per status and per running version (``fleetview.Tally``): once per change
        of the fleet, and then only over the devices that changed."""
        with self._lock:
            if self._summary_version != self._version:
                for device_id in self._untallied:
                    device = self._devices.get(device_id)
                    self._tally.update(device_id,
                                       None if device is None else device.checked_view())
                self._untallied.clear()
                self._summary = self._tally.summary()
                self._summary_version = self._version
            return self._summary

    # -- change feeds (the page's live stream) -----------------------------------------
    def watch(self) -> ChangeFeed:
        feed = ChangeFeed()
        with self._lock:
            self._feeds.add(feed)
        return feed

    def unwatch(self, feed: ChangeFeed) -> None:
        with self._lock:
            self._feeds.discard(feed)

    def drain(self, feed: ChangeFeed) -> set[str] | None:
        """The devices changed since the last drain; None when too many did to say."""
        with self._lock:
            feed.ready.clear()
            ids, overflow = feed.ids, feed.overflow
            feed.ids, feed.overflow = set(), False
        return None if overflow else ids

    def repositories(self, *, device_id: str | None = None, group: str | None = None
                     ) -> list[str]:
        """The image repositories of one device, of the devices in ``group``, or (neither
        given) of the whole fleet, as their states say."""
        with self._lock:
            if device_id is not None:
                device = self._devices.get(device_id)
                return precedence.repositories([device.state] if device else [])
            states = [d.state for d in self._devices.values()]
        return precedence.repositories(states, group)

    def snapshot(self) -> FleetSnapshot:
        """The devices (sorted by id) and event counts, for a scrape of /metrics."""
        with self._lock:
            devices = [DeviceSnapshot(d.device_id, d.state, d.availability, d.last_seen)
                       for _, d in sorted(self._devices.items())]
            return FleetSnapshot(devices, dict(self._event_counts), len(self._throttled))

    def known_devices(self) -> dict[str, tuple[str, ...] | None]:
        """Every device the bridge knows, with the groups its state lists (None when
        its state does not say), for resolving a rollout's target."""
        with self._lock:
            return {d: _groups(device.state) for d, device in self._devices.items()}

    def device_states(
        self, device_ids: list[str]) -> dict[str, tuple[str | None, dict[str, Any] | None]]:
        """(availability, state) of each device (states are replaced, never changed in
        place, so the caller may keep them)."""
        with self._lock:
            out: dict[str, tuple[str | None, dict[str, Any] | None]] = {}
            for device_id in device_ids:
                device = self._devices.get(device_id)
                out[device_id] = ((device.availability, device.state) if device is not None
                                  else (None, None))
            return out

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


def _groups(state: dict[str, Any] | None) -> tuple[str, ...] | None:
    groups = state.get("groups") if state is not None else None
    return tuple(groups) if isinstance(groups, list) else None


def _cost(payload: bytes) -> int:
    return min(max(len(payload), BUDGET_MIN_COST), MAX_STATE_BYTES + 1)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
