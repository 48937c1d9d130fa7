"""What a device says happened: event names, and the outcome of a check it was asked for.

Events go to ``P/devices/<id>/events`` (docs/PROTOCOL.md lists each one's fields); the
check outcome answers a command (the MQTT 5 reply to ``cmd/check`` / ``cmd/install``).
"""

from __future__ import annotations

import enum
from typing import Any

from edge_agent.protocol.timestamps import utc_now

# Longest text a device sends in one field (an error, a reason): Docker's error texts
# can grow without bound, and every message must stay far below the broker's limit.
MAX_TEXT_CHARS = 2000
TRUNCATED = "…"


def bounded_text(text: str) -> str:
    """``text``, cut to MAX_TEXT_CHARS."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    return text[: MAX_TEXT_CHARS - 1] + TRUNCATED


class EventName(enum.StrEnum):
    """Every event the agent publishes."""

    UPDATE_STARTED = "update_started"
    PULL_PROGRESS = "pull_progress"
    UPDATE_SUCCEEDED = "update_succeeded"
    UPDATE_FAILED = "update_failed"
    ROLLED_BACK = "rolled_back"
    FALLBACK = "fallback"
    TAG_REJECTED = "tag_rejected"
    CONFIG_ERROR = "config_error"
    CONTAINER_EXITED = "container_exited"
    # a desired-tag request replaced on its topic before the agent applied it
    TAG_SUPERSEDED = "tag_superseded"
    # an update to the desired tag is pending but held back (window, lock, spread)
    UPDATE_DEFERRED = "update_deferred"
    # the agent's own update (docs/SELF-UPDATE.md): a handover to another agent image
    AGENT_UPDATE_STARTED = "agent_update_started"
    AGENT_UPDATE_SUCCEEDED = "agent_update_succeeded"
    AGENT_UPDATE_FAILED = "agent_update_failed"


class FailureCode(enum.StrEnum):
    """``update_failed``'s ``code`` (and the state's ``update.error_code``): a failure a
    machine can act on; absent for the others."""

    # the pull would not fit on Docker's data root: refused before pulling, retried
    INSUFFICIENT_SPACE = "insufficient_space"
    # TRUSTED_KEYS is set and the image has no valid signature by one of the keys: refused
    # before pulling, not retried until the digest or the desired tag changes
    SIGNATURE_INVALID = "signature_invalid"


class CheckOutcome(enum.StrEnum):
    """What one check did, as a command's reply says it."""

    UNCHANGED = "unchanged"  # desired and actual match
    STARTED = "started"  # the container had stopped and was started again
    UPDATED = "updated"
    ROLLED_BACK = "rolled_back"
    AVAILABLE = "available"  # notify mode: an update waits for cmd/install
    DEFERRED = "deferred"  # held back by a window, the app's lock or a spread delay
    SKIPPED = "skipped"  # this digest failed before; waiting for a new one
    INTERRUPTED = "interrupted"  # the agent is stopping; it resumes at its next start


def event_body(name: EventName, device_id: str, request_id: str | None,
               **fields: Any) -> dict[str, Any]:
    """One event as published: name, time, device, the request it answers, its fields."""
    body: dict[str, Any] = {"event": str(name), "ts": utc_now(), "device_id": device_id}
    if request_id is not None:
        body["request_id"] = request_id
    body.update({key: bounded_text(value) if isinstance(value, str) else value
                 for key, value in fields.items()})
    return body
