"""The rollout's decisions, pure: ``step(record, view, now) -> (record, actions)``.

The record is the whole truth of one rollout (it is what ``store`` writes and
``GET /api/v1/rollouts/<id>`` shows); the view is what the bridge knows now of each
device (availability, state document, the events carrying the rollout's request ids)
and of the retained desired tags. ``step`` never does I/O: the controller writes the
new record (with its actions, write-ahead) before it publishes them.

Rules (docs/BRIDGE.md, "Rollouts"):
- one wave at a time; a device is *sent* (its retained device tag published with the
  request id ``<rollout id>:<device id>``) only while it is online and fewer than
  ``max_updating`` devices are in flight (sent, updating or deferred: a deferred device
  keeps its slot, so the cap still holds when its window opens);
- a sent device finishes when ``protocol/answers`` judges its request: succeeded, or
  failed with the reason; one that is online but whose state has not shown the request
  ``RESEND_AFTER_S`` after it was sent is sent the same message again (a broker node
  that took over after another died may never serve it the retained message);
- offline devices are never sent (they would update on reconnect, outside the cap):
  ``unreachable`` = wait (the default: until the wave timeout, then skipped), skip, or
  fail; a deferred device that is skipped gets its previous override back, so it does
  not update later outside the cap;
- failed devices beyond ``failure_threshold`` of the wave halt the rollout at once; at
  the wave timeout, devices not finished fail (offline ones follow ``unreachable``);
  a finished wave passes when succeeded / counted (not skipped) >= ``success_threshold``
  and at least one device counted;
- a halt with ``on_halt`` = revert (also an abort) restores the halted wave's previous
  device overrides; when every wave passed, the group or fleet tag is set, then the
  rollout's device overrides are cleared, except where clearing would change the
  device's effective tag (another group's tag comes first): those stay, with the reason.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edge_agent.protocol.answers import judge_event, judge_state, lookup
from edge_agent.protocol.events import EventName
from edge_agent.protocol.state import BUSY, UpdateStatus
from edge_agent.protocol.timestamps import format_utc, parse_utc
from edge_agent.rollout.spec import OnHalt, RolloutSpec, TargetKind, Unreachable

BUSY_STATUSES = frozenset(str(s) for s in BUSY) | {str(UpdateStatus.CHECKING)}
# An agent shows a desired tag in its state within a second or two of getting it: thirty
# seconds of silence from an online device means the message did not reach it.
RESEND_AFTER_S = 30.0


class RolloutState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    ABORTED = "aborted"
    SUCCEEDED = "succeeded"


ACTIVE = frozenset({RolloutState.RUNNING, RolloutState.PAUSED})


class WaveState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PASSED = "passed"
    HALTED = "halted"
    TIMED_OUT = "timed_out"


class DeviceOutcome(enum.StrEnum):
    PENDING = "pending"  # not sent yet
    SENT = "sent"  # its device tag is published
    UPDATING = "updating"  # it started the update
    DEFERRED = "deferred"  # it holds the update back (window, lock, notify mode)
    OFFLINE = "offline"  # not sent: offline
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    REVERTED = "reverted"  # its previous device override was given back


IN_FLIGHT = frozenset({DeviceOutcome.SENT, DeviceOutcome.UPDATING, DeviceOutcome.DEFERRED})
FINISHED = frozenset({DeviceOutcome.SUCCEEDED, DeviceOutcome.FAILED, DeviceOutcome.SKIPPED,
                      DeviceOutcome.REVERTED})


class Scope(enum.StrEnum):
    DEVICE = "device"
    GROUP = "group"
    FLEET = "fleet"


@dataclass(frozen=True)
class Action:
    """Publish the retained desired tag of a scope (``tag`` None: clear it)."""

    scope: Scope
    target: str | None  # device id or group name; None for the fleet
    tag: str | None
    request_id: str | None = None
    issued_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"scope": str(self.scope), "target": self.target, "tag": self.tag,
                "request_id": self.request_id, "issued_at": self.issued_at}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Action:
        return cls(Scope(obj["scope"]), obj.get("target"), obj.get("tag"),
                   obj.get("request_id"), obj.get("issued_at"))


@dataclass
class DeviceEntry:
    device_id: str
    outcome: DeviceOutcome = DeviceOutcome.PENDING
    reason: str | None = None
    request_id: str | None = None
    # the device override before the rollout's (None: there was none); revert restores it
    previous_tag: str | None = None
    previous_request_id: str | None = None
    sent_at: float | None = None
    resent_at: float | None = None  # the last time it was sent again (RESEND_AFTER_S)

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "outcome": str(self.outcome),
                "reason": self.reason, "request_id": self.request_id,
                "previous_tag": self.previous_tag,
                "previous_request_id": self.previous_request_id,
                "sent_at": _ts(self.sent_at), "resent_at": _ts(self.resent_at)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DeviceEntry:
        return cls(obj["device_id"], DeviceOutcome(obj["outcome"]), obj.get("reason"),
                   obj.get("request_id"), obj.get("previous_tag"),
                   obj.get("previous_request_id"), parse_utc(obj.get("sent_at")),
                   parse_utc(obj.get("resent_at")))


@dataclass
class WaveRecord:
    index: int
    devices: list[DeviceEntry]
    state: WaveState = WaveState.PENDING
    started_at: float | None = None
    ended_at: float | None = None
    deadline: float | None = None  # moved on by the time spent paused

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "state": str(self.state),
                "started_at": _ts(self.started_at), "ended_at": _ts(self.ended_at),
                "deadline": _ts(self.deadline),
                "devices": [d.to_json() for d in self.devices]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> WaveRecord:
        return cls(obj["index"], [DeviceEntry.from_json(d) for d in obj["devices"]],
                   WaveState(obj["state"]), parse_utc(obj.get("started_at")),
                   parse_utc(obj.get("ended_at")), parse_utc(obj.get("deadline")))


@dataclass
class Rollout:
    """One rollout: spec, progress and the actions not yet confirmed published."""

    id: str
    spec: RolloutSpec
    spec_json: dict[str, Any]
    waves: list[WaveRecord]
    created_at: float
    updated_at: float
    state: RolloutState = RolloutState.RUNNING
    reason: str | None = None
    ended_at: float | None = None
    current_wave: int = 0
    paused_at: float | None = None
    # device overrides left in place at the clean end, and why
    kept_overrides: dict[str, str] = field(default_factory=dict)
    # write-ahead: published, then removed (store.py writes the record in between)
    pending_actions: list[Action] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def device_ids(self) -> list[str]:
        return [d.device_id for w in self.waves for d in w.devices]

    def entries(self) -> list[DeviceEntry]:
        return [d for w in self.waves for d in w.devices]

    def counts(self) -> dict[str, int]:
        counts = {str(o): 0 for o in DeviceOutcome}
        for entry in self.entries():
            counts[str(entry.outcome)] += 1
        return counts

    def document(self) -> dict[str, Any]:
        """The JSON of ``GET /api/v1/rollouts/<id>`` (docs/PROTOCOL.md, section 9)."""
        return {
            "id": self.id, "spec": self.spec_json, "state": str(self.state),
            "reason": self.reason, "created_at": _ts(self.created_at),
            "updated_at": _ts(self.updated_at), "ended_at": _ts(self.ended_at),
            "current_wave": self.current_wave,
            "waves": [w.to_json() for w in self.waves],
            "counts": self.counts(),
            "kept_overrides": [{"device_id": d, "reason": r}
                               for d, r in sorted(self.kept_overrides.items())],
        }

    def to_json(self) -> dict[str, Any]:
        """What ``store`` keeps: the document plus what the controller needs."""
        return {**self.document(), "paused_at": _ts(self.paused_at),
                "pending_actions": [a.to_json() for a in self.pending_actions]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], spec: RolloutSpec) -> Rollout:
        return cls(
            id=obj["id"], spec=spec, spec_json=obj["spec"],
            waves=[WaveRecord.from_json(w) for w in obj["waves"]],
            created_at=parse_utc(obj["created_at"]) or 0.0,
            updated_at=parse_utc(obj["updated_at"]) or 0.0,
            state=RolloutState(obj["state"]), reason=obj.get("reason"),
            ended_at=parse_utc(obj.get("ended_at")), current_wave=obj["current_wave"],
            paused_at=parse_utc(obj.get("paused_at")),
            kept_overrides={k["device_id"]: k["reason"] for k in obj.get("kept_overrides", [])},
            pending_actions=[Action.from_json(a) for a in obj.get("pending_actions", [])],
        )


@dataclass(frozen=True)
class DeviceView:
    """What the bridge knows of one device now."""

    online: bool = False
    state: Mapping[str, Any] | None = None
    # the device's events carrying this rollout's request id for it, oldest first
    events: Sequence[Mapping[str, Any]] = ()

    @property
    def groups(self) -> tuple[str, ...] | None:
        groups = lookup(self.state, "groups")
        if not isinstance(groups, list):
            return None
        return tuple(g for g in groups if isinstance(g, str))


@dataclass(frozen=True)
class RetainedTag:
    tag: str
    request_id: str | None = None


@dataclass(frozen=True)
class DesiredView:
    """The retained desired tags the bridge has seen."""

    devices: Mapping[str, RetainedTag] = field(default_factory=dict)
    groups: Mapping[str, RetainedTag] = field(default_factory=dict)
    fleet: RetainedTag | None = None


@dataclass(frozen=True)
class View:
    devices: Mapping[str, DeviceView]
    desired: DesiredView = field(default_factory=DesiredView)

    def device(self, device_id: str) -> DeviceView:
        return self.devices.get(device_id) or DeviceView()


class NotAllowed(Exception):
    """A command the rollout's state does not allow (HTTP 409)."""


# -- creating ---------------------------------------------------------------------
def new_rollout_id(now: float) -> str:
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    return f"ro-{stamp}-{secrets.token_hex(2)}"


def new_rollout(rollout_id: str, spec: RolloutSpec, waves: Sequence[Sequence[str]],
                now: float) -> Rollout:
    spec_json = {**spec.to_json(), "devices": [d for w in waves for d in w],
                 "resolved_waves": [list(w) for w in waves]}
    records = [WaveRecord(i, [DeviceEntry(d) for d in wave]) for i, wave in enumerate(waves)]
    return Rollout(rollout_id, spec, spec_json, records, now, now)


def request_id_for(rollout_id: str, device_id: str) -> str:
    return f"{rollout_id}:{device_id}"


# -- commands (HTTP) ----------------------------------------------------------------
def pause(rollout: Rollout, now: float) -> Rollout:
    if rollout.state is RolloutState.PAUSED:
        return rollout
    if rollout.state is not RolloutState.RUNNING:
        raise NotAllowed(f"rollout {rollout.id} is {rollout.state}; only a running one pauses")
    return replace(rollout, state=RolloutState.PAUSED, paused_at=now, updated_at=now)


def resume(rollout: Rollout, now: float) -> Rollout:
    if rollout.state is RolloutState.RUNNING:
        return rollout
    if rollout.state is not RolloutState.PAUSED:
        raise NotAllowed(f"rollout {rollout.id} is {rollout.state}; only a paused one resumes")
    waves = [replace(w) for w in rollout.waves]
    paused_for = max(0.0, now - (rollout.paused_at or now))
    for wave in waves:  # time spent paused does not count against the wave timeout
        if wave.state is WaveState.RUNNING and wave.deadline is not None:
            wave.deadline += paused_for
    return replace(rollout, state=RolloutState.RUNNING, paused_at=None, waves=waves,
                   updated_at=now)


def abort(rollout: Rollout, view: View, now: float, reason: str | None = None
          ) -> tuple[Rollout, list[Action]]:
    """Stop sending; with on_halt = revert, the current wave's devices get their
    previous override back."""
    if not rollout.active:
        raise NotAllowed(f"rollout {rollout.id} is {rollout.state} already")
    rollout = _copy(rollout)
    why = reason or "aborted by the operator"
    return _halt(rollout, rollout.waves[rollout.current_wave], view, now, why,
                 RolloutState.ABORTED, WaveState.HALTED)


# -- the step -------------------------------------------------------------------------
def step(rollout: Rollout, view: View, now: float) -> tuple[Rollout, list[Action]]:
    """The rollout after looking at ``view`` at ``now``, and what to publish."""
    rollout = _copy(rollout)
    for entry in rollout.entries():  # in flight anywhere: a halted wave's too
        if entry.outcome in IN_FLIGHT:
            _observe(entry, view.device(entry.device_id), rollout.spec.tag)
    if rollout.state is not RolloutState.RUNNING:
        return rollout, []
    actions: list[Action] = []
    while rollout.state is RolloutState.RUNNING:
        wave = rollout.waves[rollout.current_wave]
        if wave.state is WaveState.PENDING:
            wave.state = WaveState.RUNNING
            wave.started_at = now
            wave.deadline = now + rollout.spec.wave_timeout_s
        more, done = _run_wave(rollout, wave, view, now)
        actions += more
        if not done:
            break
    return rollout, actions


def _run_wave(rollout: Rollout, wave: WaveRecord, view: View, now: float
              ) -> tuple[list[Action], bool]:
    """Move one running wave on; True when it ended (passed: the next wave may start)."""
    spec = rollout.spec
    actions = _unreachable(rollout, wave, view)
    failed = [d for d in wave.devices if d.outcome is DeviceOutcome.FAILED]
    if failed and len(failed) > spec.failure_threshold * len(wave.devices):
        reason = (f"wave {wave.index} halted: {len(failed)} of {len(wave.devices)} devices "
                  f"failed ({_reasons(failed)})")
        rollout, more = _halt(rollout, wave, view, now, reason, RolloutState.HALTED,
                              WaveState.HALTED)
        return actions + more, False
    if wave.deadline is not None and now >= wave.deadline:
        actions += _time_out(wave, view, spec.unreachable)
        if rollout.state is not RolloutState.RUNNING:
            return actions, False
    else:
        actions += _resend(rollout, wave, view, now) + _send(rollout, wave, view, now)
    if any(d.outcome not in FINISHED for d in wave.devices):
        return actions, False
    return actions + _evaluate(rollout, wave, view, now), rollout.state is RolloutState.RUNNING


def _unreachable(rollout: Rollout, wave: WaveRecord, view: View) -> list[Action]:
    """Offline devices not sent, and deferred ones, by the rollout's policy."""
    policy = rollout.spec.unreachable
    actions: list[Action] = []
    for entry in wave.devices:
        online = view.device(entry.device_id).online
        if entry.outcome in (DeviceOutcome.PENDING, DeviceOutcome.OFFLINE):
            if online:
                entry.outcome, entry.reason = DeviceOutcome.PENDING, None
                continue
            if policy is Unreachable.WAIT:
                entry.outcome, entry.reason = DeviceOutcome.OFFLINE, "offline: not sent yet"
            elif policy is Unreachable.SKIP:
                entry.outcome, entry.reason = DeviceOutcome.SKIPPED, "offline: skipped"
            else:
                entry.outcome, entry.reason = DeviceOutcome.FAILED, "offline"
        elif entry.outcome is DeviceOutcome.DEFERRED and policy is not Unreachable.WAIT:
            actions.append(_restore(entry))
            entry.outcome = (DeviceOutcome.SKIPPED if policy is Unreachable.SKIP
                             else DeviceOutcome.FAILED)
            entry.reason = f"{entry.reason or 'deferred'}; its previous override is back"
    return actions


def _send(rollout: Rollout, wave: WaveRecord, view: View, now: float) -> list[Action]:
    in_flight = sum(1 for d in rollout.entries() if d.outcome in IN_FLIGHT)
    actions: list[Action] = []
    for entry in wave.devices:
        if in_flight >= rollout.spec.max_updating:
            break
        if entry.outcome is not DeviceOutcome.PENDING:
            continue
        previous = view.desired.devices.get(entry.device_id)
        entry.previous_tag = previous.tag if previous else None
        entry.previous_request_id = previous.request_id if previous else None
        entry.request_id = request_id_for(rollout.id, entry.device_id)
        entry.outcome, entry.reason, entry.sent_at = DeviceOutcome.SENT, None, now
        in_flight += 1
        actions.append(_request(rollout, entry))
    return actions


def _resend(rollout: Rollout, wave: WaveRecord, view: View, now: float) -> list[Action]:
    """The same message again, for a sent device that is online and has not shown the
    request for ``RESEND_AFTER_S``. Seen on a NATS cluster: the bridge published as the
    devices' node died; the node they moved to never served the new device tag, and the
    wave waited out its timeout. Publishing the same retained payload twice changes
    nothing for a device that did get it."""
    actions: list[Action] = []
    for entry in wave.devices:
        if (entry.outcome is not DeviceOutcome.SENT or entry.request_id is None
                or entry.sent_at is None):
            continue
        device = view.device(entry.device_id)
        if (now - (entry.resent_at or entry.sent_at) < RESEND_AFTER_S or not device.online
                or lookup(device.state, "desired", "request_id") == entry.request_id):
            continue
        entry.resent_at = now
        actions.append(_request(rollout, entry))
    return actions


def _request(rollout: Rollout, entry: DeviceEntry) -> Action:
    """The rollout's message to a sent device: the same every time it is sent."""
    assert entry.sent_at is not None
    return Action(Scope.DEVICE, entry.device_id, rollout.spec.tag, entry.request_id,
                  format_utc(entry.sent_at))


def _time_out(wave: WaveRecord, view: View, policy: Unreachable) -> list[Action]:
    """At the wave timeout: every device not finished fails, except offline and deferred
    ones, which are skipped unless the policy is fail (a sent one gets its previous
    override back, so that it does not update later, outside the cap)."""
    actions: list[Action] = []
    for entry in wave.devices:
        if entry.outcome in FINISHED:
            continue
        unreachable = (entry.outcome in (DeviceOutcome.OFFLINE, DeviceOutcome.DEFERRED)
                       or (entry.outcome in IN_FLIGHT
                           and not view.device(entry.device_id).online))
        why = entry.reason or str(entry.outcome)
        if entry.outcome in IN_FLIGHT:
            actions.append(_restore(entry))
            why += "; its previous override is back"
        if unreachable and policy is not Unreachable.FAIL:
            entry.outcome = DeviceOutcome.SKIPPED
            entry.reason = f"wave timeout while {why}"
        else:
            entry.outcome = DeviceOutcome.FAILED
            entry.reason = f"not finished within the wave timeout ({why})"
    wave.state = WaveState.TIMED_OUT
    return actions


def _evaluate(rollout: Rollout, wave: WaveRecord, view: View, now: float) -> list[Action]:
    counted = [d for d in wave.devices if d.outcome is not DeviceOutcome.SKIPPED]
    succeeded = [d for d in counted if d.outcome is DeviceOutcome.SUCCEEDED]
    failed = [d for d in counted if d.outcome is not DeviceOutcome.SUCCEEDED]
    timed_out = wave.state is WaveState.TIMED_OUT
    if not counted:
        reason = (f"wave {wave.index} halted: none of its {len(wave.devices)} devices could "
                  "be updated (all skipped)")
    elif len(succeeded) < rollout.spec.success_threshold * len(counted) - 1e-9:
        reason = (f"wave {wave.index} halted: {len(succeeded)} of {len(counted)} devices "
                  f"succeeded, below the success threshold {rollout.spec.success_threshold:g}"
                  + (f" ({_reasons(failed)})" if failed else ""))
    else:
        wave.ended_at = now
        if not timed_out:
            wave.state = WaveState.PASSED
        if wave.index + 1 < len(rollout.waves):
            rollout.current_wave = wave.index + 1
            rollout.updated_at = now
            return []
        return _finish(rollout, view, now)
    _, actions = _halt(rollout, wave, view, now, reason, RolloutState.HALTED,
                       WaveState.TIMED_OUT if timed_out else WaveState.HALTED)
    return actions


def _halt(rollout: Rollout, wave: WaveRecord, view: View, now: float, reason: str,  # noqa: PLR0913, PLR0917
          state: RolloutState, wave_state: WaveState) -> tuple[Rollout, list[Action]]:
    rollout.state, rollout.reason, rollout.ended_at = state, reason, now
    rollout.updated_at = now
    rollout.paused_at = None
    if wave.state in (WaveState.RUNNING, WaveState.PENDING):
        wave.state = wave_state
    wave.ended_at = wave.ended_at or now
    actions: list[Action] = []
    for entry in wave.devices:
        if entry.outcome is DeviceOutcome.PENDING or entry.outcome is DeviceOutcome.OFFLINE:
            entry.outcome, entry.reason = DeviceOutcome.SKIPPED, "not sent: the rollout stopped"
        elif rollout.spec.on_halt is OnHalt.REVERT and entry.request_id is not None \
                and entry.outcome not in (DeviceOutcome.REVERTED, DeviceOutcome.SKIPPED):
            actions.append(_restore(entry))
            before = entry.reason or str(entry.outcome)
            entry.outcome = DeviceOutcome.REVERTED
            entry.reason = (f"{before}; previous override {entry.previous_tag} restored"
                            if entry.previous_tag else f"{before}; override cleared")
    return rollout, actions


def _finish(rollout: Rollout, view: View, now: float) -> list[Action]:
    """Every wave passed: set the group or fleet tag, then clear the rollout's overrides
    where that leaves the device's effective tag as it is."""
    spec = rollout.spec
    rollout.state, rollout.ended_at, rollout.updated_at = RolloutState.SUCCEEDED, now, now
    target = spec.target
    if target.kind is TargetKind.DEVICES:
        rollout.reason = "every wave passed; the device overrides are the desired state"
        return []
    issued = format_utc(now)
    scope_request = f"{rollout.id}:{target.kind}"
    if target.kind is TargetKind.GROUP:
        actions = [Action(Scope.GROUP, target.group, spec.tag, scope_request, issued)]
    else:
        actions = [Action(Scope.FLEET, None, spec.tag, scope_request, issued)]
    for entry in rollout.entries():
        if entry.request_id is None or entry.outcome is not DeviceOutcome.SUCCEEDED:
            continue
        shadow = _shadowed(entry.device_id, view, spec)
        if shadow is not None:
            rollout.kept_overrides[entry.device_id] = shadow
        else:
            actions.append(Action(Scope.DEVICE, entry.device_id, None))
    kept = f"; {len(rollout.kept_overrides)} device overrides kept" \
        if rollout.kept_overrides else ""
    rollout.reason = f"every wave passed; the {target.kind} tag is {spec.tag}{kept}"
    return actions


def _shadowed(device_id: str, view: View, spec: RolloutSpec) -> str | None:
    """Why clearing the device's override would change its effective tag, or None."""
    groups = view.device(device_id).groups
    if groups is None:
        groups = (spec.target.group,) if spec.target.group else ()
    for group in groups:
        if group == spec.target.group:
            return None  # the new group tag comes first
        retained = view.desired.groups.get(group)
        if retained is not None:
            if retained.tag == spec.tag:
                return None
            return (f"group {group}'s tag {retained.tag} comes before the "
                    f"{spec.target.kind} tag for this device")
    if spec.target.kind is TargetKind.GROUP:
        return f"the device's state does not list group {spec.target.group}"
    return None


def _restore(entry: DeviceEntry) -> Action:
    """Give the device its override from before the rollout back (or none)."""
    return Action(Scope.DEVICE, entry.device_id, entry.previous_tag, entry.previous_request_id,
                  None)


def _observe(entry: DeviceEntry, device: DeviceView, tag: str) -> None:
    """Move a sent device on from its events and its state."""
    request_id = entry.request_id
    if request_id is None:
        return
    for event in device.events:
        if event.get("request_id") != request_id:
            continue
        answer = judge_event(dict(event), request_id, tag)
        if answer is not None:
            entry.outcome = DeviceOutcome.SUCCEEDED if answer.ok else DeviceOutcome.FAILED
            entry.reason = answer.reason
            return
        if event.get("event") == EventName.UPDATE_STARTED:
            entry.outcome, entry.reason = DeviceOutcome.UPDATING, None
    state = device.state
    if state is None or lookup(state, "desired", "request_id") != request_id:
        return
    answer = judge_state(dict(state), request_id, tag)
    status = lookup(state, "update", "status")
    if answer is not None and answer.settled:
        entry.outcome = DeviceOutcome.SUCCEEDED if answer.ok else DeviceOutcome.FAILED
        entry.reason = answer.reason
    elif status == UpdateStatus.DEFERRED:
        entry.outcome, entry.reason = DeviceOutcome.DEFERRED, _deferred_reason(state)
    elif answer is not None:  # notify mode: waits for an install
        entry.outcome, entry.reason = DeviceOutcome.DEFERRED, answer.reason
    elif status in BUSY_STATUSES and entry.outcome is not DeviceOutcome.UPDATING:
        entry.outcome, entry.reason = DeviceOutcome.UPDATING, None


def _deferred_reason(state: Mapping[str, Any]) -> str:
    why = lookup(state, "update", "deferred", "reason")
    detail = lookup(state, "update", "deferred", "detail")
    until = lookup(state, "update", "deferred", "until")
    text = "deferred" + (f" ({why})" if isinstance(why, str) else "")
    if isinstance(detail, str) and detail:
        text += f": {detail[:200]}"
    if isinstance(until, str):
        text += f" until {until[:40]}"
    return text


def _reasons(entries: Sequence[DeviceEntry], limit: int = 3) -> str:
    shown = "; ".join(f"{d.device_id}: {d.reason or d.outcome}" for d in entries[:limit])
    return shown + (f"; and {len(entries) - limit} more" if len(entries) > limit else "")


def _copy(rollout: Rollout) -> Rollout:
    """A copy to change: ``step`` leaves its input as it was."""
    waves = [replace(w, devices=[replace(d) for d in w.devices]) for w in rollout.waves]
    return replace(rollout, waves=waves, kept_overrides=dict(rollout.kept_overrides),
                   pending_actions=list(rollout.pending_actions))


def _ts(epoch: float | None) -> str | None:
    return None if epoch is None else format_utc(epoch)
