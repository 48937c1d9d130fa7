"""Has a device answered a desired-tag request yet, and how? Pure: no I/O.

The agent answers a desired tag published with a ``request_id`` (docs/PROTOCOL.md) in its
state document (``desired.request_id``) and in events carrying that ``request_id``.
``judge_state`` and ``judge_event`` say what one of them means; what to do with the
answer is up to the caller, because the bridge's ``?wait`` (``bridge/fleet.py``) and
``edge-ctl set-tag --wait`` (``ctl/``) do not end their wait on the same outcomes.

Outcomes (``ok``: ``applied`` and ``updated``):

- ``applied``: state idle, the tag's container runs; ``updated``: ``update_succeeded``
- ``not_applied``: state idle on another tag (rolled back, a digest that failed before)
- ``not_running``: state idle on the tag, but its container is not running
- ``fallback``: the tag is not in the registry, FALLBACK_TAG runs (state or event)
- ``available``: notify mode, the update waits for ``cmd/install`` (never settled)
- ``deferred``: the update waits for the maintenance window, the app's update lock or
  its spread delay; the device applies it by itself later (never settled)
- ``rolled_back``, ``failed``, ``rejected``, ``config_error``: the events ``rolled_back``,
  ``update_failed``, ``tag_rejected``, ``config_error``
- ``insufficient_space``: ``update_failed`` with that ``code``: the pull would not fit on
  the device's disk; refused before pulling, the old container serves, retried
- ``signature_invalid``: ``update_failed`` with that ``code``: TRUSTED_KEYS is set and the
  image has no valid signature by one of the keys; refused before pulling, the old
  container serves, not retried until the digest or the desired tag changes
- ``superseded``: the event ``tag_superseded``: another desired tag (or a clear) came on
  the same topic before the agent applied this one; the agent acts on the newest only,
  and the event names it (``new_tag``, ``superseded_by``: its request id)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol.events import EventName, FailureCode
from edge_agent.protocol.state import UpdateStatus


class Outcome(enum.StrEnum):
    """What a request came to, as the operator tools report it."""

    APPLIED = "applied"
    UPDATED = "updated"
    NOT_APPLIED = "not_applied"
    NOT_RUNNING = "not_running"
    FALLBACK = "fallback"
    AVAILABLE = "available"
    DEFERRED = "deferred"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REJECTED = "rejected"
    CONFIG_ERROR = "config_error"
    SUPERSEDED = "superseded"
    INSUFFICIENT_SPACE = "insufficient_space"
    SIGNATURE_INVALID = "signature_invalid"


# events that answer a request with a failure, and their outcome
FAILURE_EVENTS: dict[str, Outcome] = {
    EventName.ROLLED_BACK: Outcome.ROLLED_BACK,
    EventName.UPDATE_FAILED: Outcome.FAILED,
    EventName.FALLBACK: Outcome.FALLBACK,
    EventName.TAG_REJECTED: Outcome.REJECTED,
    EventName.CONFIG_ERROR: Outcome.CONFIG_ERROR,
    EventName.TAG_SUPERSEDED: Outcome.SUPERSEDED,
}


@dataclass(frozen=True)
class Answer:
    """What one state document or event says about a request."""

    outcome: Outcome
    ok: bool
    reason: str
    # The event that said it ("fallback" also for a fallback the state shows: the bridge
    # reports it so); None when only the state says it.
    event: str | None = None
    # False while the device still works on the request (update.status is not idle).
    settled: bool = True


def lookup(document: Any, *path: str) -> Any:
    """``document[path[0]][path[1]]...``, or None where a level is missing or no object."""
    value = document
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def judge_state(  # noqa: PLR0911 - one return per answer a state gives
    state: dict[str, Any], request_id: str, tag: str,
) -> Answer | None:
    """What a state document says about ``request_id`` (for ``tag``); None: nothing yet."""
    if lookup(state, "desired", "request_id") != request_id:
        return None
    status = lookup(state, "update", "status")
    settled = status == UpdateStatus.IDLE
    # A fallback left from an earlier desired tag shows until the next check: not ours.
    if lookup(state, "fallback", "active") and lookup(state, "fallback", "requested_tag") == tag:
        why = lookup(state, "fallback", "reason") or f"tag {tag} is not available"
        running = lookup(state, "running", "tag")
        # Say what the device runs now: "not applied" alone reads as "nothing changed".
        now = f" {running}" if settled and isinstance(running, str) else ""
        return Answer(Outcome.FALLBACK, False,
                      f"the device now runs the fallback tag{now} instead: {why}",
                      EventName.FALLBACK, settled)
    if status == UpdateStatus.AVAILABLE:
        return Answer(Outcome.AVAILABLE, False,
                      f"update to {tag} is available but the device is in notify mode: run "
                      f"edge-ctl install --device {state.get('device_id')}", settled=False)
    if status == UpdateStatus.DEFERRED:
        return Answer(Outcome.DEFERRED, False, deferred_text(state, tag), settled=False)
    if not settled:
        return None
    running = lookup(state, "running", "tag")  # installed_version repeats it for Home Assistant
    last_error = lookup(state, "update", "last_error")
    why = f": {last_error}" if isinstance(last_error, str) and last_error else ""
    if running != tag:
        return Answer(Outcome.NOT_APPLIED, False,
                      f"device settled on {running!r} instead of {tag!r}{why}")
    container = lookup(state, "running", "status")
    if container != "running":
        return Answer(Outcome.NOT_RUNNING, False,
                      f"device has {tag} but its container is {container}{why}")
    return Answer(Outcome.APPLIED, True, f"device runs {tag}")


def deferred_text(state: dict[str, Any], tag: str) -> str:
    """``update to 2.0 deferred until <ts> (window: ...)`` from ``update.deferred``."""
    deferred = lookup(state, "update", "deferred")
    reason = lookup(deferred, "reason") or "deferred"
    detail = lookup(deferred, "detail")
    until = lookup(deferred, "until")
    when = f"until {until}" if isinstance(until, str) else "until the app releases its lock"
    why = f"{reason}: {detail}" if isinstance(detail, str) and detail else str(reason)
    return f"update to {tag} deferred {when} ({why}); the device applies it then"


def judge_event(event: dict[str, Any], request_id: str, tag: str) -> Answer | None:
    """What an event says about ``request_id`` (for ``tag``); None: nothing."""
    name = event.get("event")
    if event.get("request_id") != request_id or not isinstance(name, str):
        return None
    if name == EventName.UPDATE_SUCCEEDED:
        # an update to the fallback tag answers our request id too, with its own tag
        if event.get("tag") != tag:
            return None
        return Answer(Outcome.UPDATED, True, f"device runs {tag}", name)
    outcome = FAILURE_EVENTS.get(name)
    if outcome is None:
        return None
    detail = event.get("reason") or event.get("error") or ""
    reason = f"{name}: {detail}" if detail else name
    if outcome is Outcome.FAILED and event.get("code") == FailureCode.INSUFFICIENT_SPACE:
        outcome = Outcome.INSUFFICIENT_SPACE
        reason = f"{FailureCode.INSUFFICIENT_SPACE}: {detail}"
    elif outcome is Outcome.FAILED and event.get("code") == FailureCode.SIGNATURE_INVALID:
        outcome = Outcome.SIGNATURE_INVALID
        reason = f"{FailureCode.SIGNATURE_INVALID}: {detail}"
    elif outcome is Outcome.FAILED:
        reason += " (the agent retries at its next check)"
    return Answer(outcome, False, reason, name)
