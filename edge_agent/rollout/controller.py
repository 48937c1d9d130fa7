"""The rollout controller: the loop in the bridge that drives rollouts.

Every ``TICK_S`` it feeds what the bridge knows (``Fleet``: availability, states, the
events carrying a rollout's request ids; ``DesiredTags``: the retained desired tags)
into ``plan.step``, writes the new record with its actions *before* publishing them
(write-ahead), publishes them, and writes the record again without them. After a
crash, the actions still in a record are published again at the next start: they are
retained messages with fixed payloads, so publishing one twice changes nothing, and a
device that was sent its tag is never sent another.

Only the process holding ``controller.lock`` (``store.RolloutStore.acquire``) drives
rollouts; another bridge on the same directory shows them read-only, answers 503 to
changes, and takes over when the lock is free.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from edge_agent.protocol.mqtt import BrokerUnavailable
from edge_agent.protocol.topics import Topics
from edge_agent.rollout import plan
from edge_agent.rollout.desired import DesiredTags
from edge_agent.rollout.plan import Action, DeviceView, NotAllowed, Rollout, Scope, View
from edge_agent.rollout.spec import SpecError, parse_spec, resolve_devices, split_waves
from edge_agent.rollout.store import RolloutStore, StoreError

log = logging.getLogger(__name__)

TICK_S = 0.5
# after connecting, the broker's retained desired tags arrive first; give them this long
SYNC_S = 2.0
RETRY_LOCK_S = 5.0
MAX_EVENTS_PER_REQUEST = 32
ROLLOUT_ID_PREFIX = "ro-"


class RolloutError(Exception):
    """A request the controller refuses: HTTP ``status`` and the message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Publisher(Protocol):
    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None: ...


class FleetReader(Protocol):
    """What the controller reads of ``bridge.fleet.Fleet``."""

    def known_devices(self) -> dict[str, tuple[str, ...] | None]: ...

    def device_states(
        self, device_ids: list[str]) -> dict[str, tuple[str | None, dict[str, Any] | None]]: ...


class RolloutController:
    """Rollouts of one bridge: HTTP calls (``create``, ``list``, ``get``, ``command``)
    and the loop (``start``/``stop``, ``tick``)."""

    def __init__(  # noqa: PLR0913 - its parts, then the clock
        self,
        data_dir: Path | None,
        topics: Topics,
        fleet: FleetReader,
        desired: DesiredTags,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.fleet = fleet
        self.desired = desired
        self.publisher = publisher
        self._clock = clock
        self.store = RolloutStore(data_dir / "rollouts") if data_dir is not None else None
        self._lock = threading.RLock()
        self._rollouts: dict[str, Rollout] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._events_lock = threading.Lock()
        self._unavailable: str | None = (
            "rollouts are off: set BRIDGE_DATA_DIR to a writable directory" if data_dir is None
            else None)
        self._read_only = False
        self._connected_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logged: str | None = None

    # -- lifecycle ------------------------------------------------------------------
    def open(self) -> None:
        """Prepare the directory and try to become the controller (no thread)."""
        if self.store is None:
            return
        try:
            self.store.prepare()
            if self.store.acquire():
                self._take_over()
            else:
                self._read_only = True
                log.warning("another bridge holds %s/controller.lock: showing its rollouts "
                            "read-only until it goes", self.store.directory)
        except StoreError as exc:
            self._unavailable = f"rollouts are off: {exc}"
            log.error("%s; the bridge serves devices without rollouts", self._unavailable)

    def _take_over(self) -> None:
        assert self.store is not None
        with self._lock:
            self._rollouts = {r.id: r for r in self.store.load_all()}
            self._read_only = False
        active = [r.id for r in self._rollouts.values() if r.active]
        log.info("rollout controller: %d rollouts on record%s", len(self._rollouts),
                 f", resuming {', '.join(active)}" if active else "")

    def start(self) -> None:
        self.open()
        if self.store is None or self._unavailable is not None:
            return
        self._thread = threading.Thread(target=self._run, name="edge-bridge-rollouts",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.store is not None:
            self.store.release()

    def should_exit(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        last_try = 0.0
        while not self._stop.wait(TICK_S):
            try:
                if self._read_only:
                    now = time.monotonic()
                    if now - last_try >= RETRY_LOCK_S and self.store is not None:
                        last_try = now
                        if self.store.acquire():
                            log.info("took over the rollout controller lock")
                            self._take_over()
                    continue
                self.tick(self._clock())
            except Exception:
                # one bad tick must not end the loop; the record is as last written
                log.exception("rollout controller: tick failed")

    # -- events (from the MQTT thread) ----------------------------------------------
    def on_event(self, device_id: str, event: Mapping[str, Any]) -> None:
        """Keep the events that carry a rollout's request id (``<rollout>:<device>``)."""
        request_id = event.get("request_id")
        if not isinstance(request_id, str) or not request_id.startswith(ROLLOUT_ID_PREFIX):
            return
        if request_id.rpartition(":")[2] != device_id:
            return
        with self._events_lock:
            events = self._events.setdefault(request_id, [])
            if len(events) < MAX_EVENTS_PER_REQUEST:
                events.append(dict(event))

    # -- the tick -------------------------------------------------------------------
    def ready(self, now: float) -> bool:
        """Connected long enough for the retained desired tags to have arrived."""
        if not self.publisher.connected:
            self._connected_since = None
            return False
        if self._connected_since is None:
            self._connected_since = now
        return now - self._connected_since >= SYNC_S

    def tick(self, now: float) -> None:
        """One round over the rollouts that are active or owe actions."""
        if self._read_only or self.store is None or not self.ready(time.monotonic()):
            return
        for rollout_id in list(self._rollouts):
            with self._lock:
                rollout = self._rollouts[rollout_id]
                if not rollout.active and not rollout.pending_actions:
                    continue
                if not self._flush(rollout):
                    continue
                rollout = self._rollouts[rollout_id]
                if not rollout.active:
                    continue
                new, actions = plan.step(rollout, self._view(rollout), now)
                if actions or _changed(rollout, new):
                    new.updated_at = now if _changed(rollout, new) else new.updated_at
                    new.pending_actions = list(actions)
                    self._save(new)
                    self._flush(new)

    def _flush(self, rollout: Rollout) -> bool:
        """Publish the rollout's pending actions in order, then record that; False when
        one could not be published (it stays pending, tried again next tick)."""
        if not rollout.pending_actions:
            return True
        done = 0
        for action in rollout.pending_actions:
            try:
                self._publish(action)
            except BrokerUnavailable as exc:
                self._log_once(f"rollout {rollout.id}: cannot publish yet ({exc}); retrying")
                break
            done += 1
        rollout.pending_actions = rollout.pending_actions[done:]
        self._save(rollout)
        return not rollout.pending_actions

    def _publish(self, action: Action) -> None:
        if action.scope is Scope.DEVICE:
            assert action.target is not None
            topic = self.topics.device_tag(action.target)
        elif action.scope is Scope.GROUP:
            assert action.target is not None
            topic = self.topics.group_tag(action.target)
        else:
            topic = self.topics.fleet_tag
        if action.tag is None:
            payload = b""
        else:
            body = {"tag": action.tag, "request_id": action.request_id,
                    "issued_at": action.issued_at}
            payload = json.dumps({k: v for k, v in body.items() if v is not None},
                                 separators=(",", ":")).encode()
        self.publisher.publish(topic, payload, retain=True)
        what = f"tag {action.tag}" if action.tag is not None else "a clear"
        log.info("rollout: published %s on %s%s", what, topic,
                 f" (request {action.request_id})" if action.request_id else "")

    def _view(self, rollout: Rollout) -> View:
        ids = rollout.device_ids()
        states = self.fleet.device_states(ids)
        with self._events_lock:
            events = {d: tuple(self._events.get(plan.request_id_for(rollout.id, d), ()))
                      for d in ids}
        devices = {d: DeviceView(online=availability == "online", state=state,
                                 events=events[d])
                   for d, (availability, state) in states.items()}
        return View(devices, self.desired.view())

    def _save(self, rollout: Rollout) -> None:
        assert self.store is not None
        self.store.save(rollout)  # StoreError: the tick fails, nothing is published
        self._rollouts[rollout.id] = rollout

    def _log_once(self, message: str) -> None:
        if message != self._logged:
            log.warning("%s", message)
            self._logged = message

    # -- HTTP -----------------------------------------------------------------------
    def _writable(self) -> None:
        if self._unavailable is not None:
            raise RolloutError(503, self._unavailable)
        if self._read_only:
            raise RolloutError(503, "another bridge drives rollouts (it holds the controller "
                                    "lock on this data directory); this one is read-only")

    def _readable(self) -> dict[str, Rollout]:
        if self._unavailable is not None:
            raise RolloutError(503, self._unavailable)
        if self._read_only and self.store is not None:
            try:
                return {r.id: r for r in self.store.load_all()}
            except StoreError as exc:
                raise RolloutError(503, str(exc)) from None
        with self._lock:
            return dict(self._rollouts)

    def list(self) -> list[dict[str, Any]]:
        return [r.document() for r in self._readable().values()]

    def get(self, rollout_id: str) -> dict[str, Any]:
        rollout = self._readable().get(rollout_id)
        if rollout is None:
            raise RolloutError(404, f"no rollout {rollout_id!r}")
        return rollout.document()

    def create(self, body: Any) -> dict[str, Any]:
        """Validate, resolve and record a new rollout; its first tick sends the canary."""
        self._writable()
        try:
            spec = parse_spec(body)
            devices = resolve_devices(spec, self.fleet.known_devices())
            waves = split_waves(spec, devices)
        except SpecError as exc:
            raise RolloutError(400, str(exc)) from None
        now = self._clock()
        with self._lock:
            busy = {d: r.id for r in self._rollouts.values() if r.active
                    for d in r.device_ids()}
            overlap = [d for d in devices if d in busy]
            if overlap:
                raise RolloutError(409, f"device {overlap[0]!r} is in active rollout "
                                        f"{busy[overlap[0]]} (pause is not enough: abort it "
                                        "or wait for it to end)")
            rollout = plan.new_rollout(plan.new_rollout_id(now), spec, waves, now)
            try:
                self._save(rollout)
            except StoreError as exc:
                raise RolloutError(503, f"cannot record the rollout: {exc}") from None
        log.info("rollout %s created: tag %s to %d devices in %d waves", rollout.id, spec.tag,
                 len(devices), len(waves))
        return rollout.document()

    def command(self, rollout_id: str, name: str) -> dict[str, Any]:
        """pause, resume or abort."""
        self._writable()
        now = self._clock()
        with self._lock:
            rollout = self._rollouts.get(rollout_id)
            if rollout is None:
                raise RolloutError(404, f"no rollout {rollout_id!r}")
            try:
                if name == "pause":
                    new = plan.pause(rollout, now)
                elif name == "resume":
                    new = plan.resume(rollout, now)
                else:
                    new, actions = plan.abort(rollout, self._view(rollout), now)
                    new.pending_actions = [*new.pending_actions, *actions]
            except NotAllowed as exc:
                raise RolloutError(409, str(exc)) from None
            if new is not rollout:
                try:
                    self._save(new)
                except StoreError as exc:
                    raise RolloutError(503, f"cannot record the change: {exc}") from None
                log.info("rollout %s: %s (now %s)", rollout_id, name, new.state)
            return new.document()


def _changed(old: Rollout, new: Rollout) -> bool:
    return old.document() != new.document()
