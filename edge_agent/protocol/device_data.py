"""A device's state document and events as operators may use them: every field checked
once, when the message arrives. Pure: no I/O, no locks.

A device (or whoever holds its broker credentials) may publish anything on its own
topics. Everything the bridge serves from it goes through here: a field of the wrong
type, out of range or not in its fixed list is left out; text is bounded and
cleaned of control characters and lone surrogates; timestamps must be real ones.
So the bridge's answers always fit its OpenAPI schema, one device's data can never
break the device list, and a later good state replaces a bad one entirely.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from edge_agent.protocol.events import MAX_TEXT_CHARS, TRUNCATED, FailureCode
from edge_agent.protocol.state import (
    CONTAINER_STATUSES,
    HEALTH_STATUSES,
    AgentUpdateStatus,
    DeferReason,
    Source,
    UpdateStatus,
)
from edge_agent.protocol.tags import DIGEST_RE, TAG_RE, is_request_id
from edge_agent.protocol.timestamps import parse_utc
from edge_agent.protocol.topics import ID_RE

# A device clock this far ahead of the bridge's is wrong; its ts says nothing.
MAX_CLOCK_AHEAD_S = 300.0

MAX_GROUPS = 64  # DEVICE_GROUPS of one device
SHORT_TEXT = 256  # names, versions, ids
LONG_TEXT = MAX_TEXT_CHARS  # error messages and reasons

UPDATE_STATUSES = frozenset(str(status) for status in UpdateStatus)
FAILURE_CODES = frozenset(str(code) for code in FailureCode)
DESIRED_SOURCES = frozenset(str(source) for source in Source)
DEFER_REASONS = frozenset(str(reason) for reason in DeferReason)
EVENT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# C0 and C1 controls except tab and newline, and the bidirectional overrides and isolates
# that can make text read differently from what it is
_UNSAFE_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"
                           "\ud800-\udfff]")

Check = Callable[[Any], Any]
_ABSENT = object()


def seen_at(value: object, now: float) -> float | None:
    """When a retained message was published, from its ``ts``: None for no usable ts or
    one from a clock too far ahead; a little ahead counts as now."""
    epoch = parse_utc(value)
    if epoch is None or epoch > now + MAX_CLOCK_AHEAD_S:
        return None
    return min(epoch, now)


def clean_text(value: object, limit: int = SHORT_TEXT) -> str | None:
    """A string made safe to show anywhere: control characters, bidirectional overrides
    and lone surrogates become U+FFFD, and it is cut to ``limit`` characters."""
    if not isinstance(value, str):
        return None
    text = _UNSAFE_CHARS.sub("\ufffd", value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 1] + TRUNCATED


# -- field checks: the value, or _ABSENT to leave the field out -----------------------
def _text(limit: int) -> Check:
    def check(value: Any) -> Any:
        text = clean_text(value, limit)
        return _ABSENT if text is None else text
    return check


def _nullable(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _pattern(regex: re.Pattern[str], *more: re.Pattern[str]) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, str) and any(r.fullmatch(value) for r in (regex, *more)):
            return value
        return _ABSENT
    return check


def _one_of(values: frozenset[str]) -> Check:
    return lambda value: value if isinstance(value, str) and value in values else _ABSENT


def _request_id(value: Any) -> Any:
    return value if is_request_id(value) else _ABSENT


def _timestamp(value: Any) -> Any:
    return value if parse_utc(value) is not None else _ABSENT


def _bool(value: Any) -> Any:
    return value if isinstance(value, bool) else _ABSENT


def _number(low: float, high: float) -> Check:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _ABSENT
        # compared as they are: math.isfinite() of a huge int raises OverflowError
        if isinstance(value, float) and not math.isfinite(value):
            return _ABSENT
        return value if low <= value <= high else _ABSENT
    return check


def _count(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
        return _ABSENT
    return value


def _object(fields: Mapping[str, Check]) -> Check:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            return _ABSENT
        out = {}
        for key, field_check in fields.items():
            if key in value:
                cleaned = field_check(value[key])
                if cleaned is not _ABSENT:
                    out[key] = cleaned
        return out
    return check


def _list(item: Check, limit: int) -> Check:
    """A list of at most ``limit`` items, each valid (else the whole field is left out)."""
    def check(value: Any) -> Any:
        if not isinstance(value, list) or len(value) > limit:
            return _ABSENT
        items = [item(v) for v in value]
        return _ABSENT if any(i is _ABSENT for i in items) else items
    return check


TAG = _pattern(TAG_RE, DIGEST_RE)
PERCENT = _number(0.0, 100.0)

# The agent's state document, field by field (docs/MQTT.md; openapi.json DeviceState)
STATE_FIELDS: dict[str, Check] = {
    "device_id": _pattern(ID_RE),
    "agent_version": _text(64),
    "ts": _timestamp,
    "image": _text(SHORT_TEXT),
    "groups": _list(_pattern(ID_RE), MAX_GROUPS),
    "desired": _object({
        "tag": _nullable(TAG),
        "source": _nullable(_one_of(DESIRED_SOURCES)),
        "group": _nullable(_pattern(ID_RE)),
        "request_id": _nullable(_request_id),
    }),
    "agent": _object({
        "desired": _nullable(TAG),
        "source": _nullable(_one_of(DESIRED_SOURCES)),
        "request_id": _nullable(_request_id),
        "status": _one_of(frozenset(AgentUpdateStatus)),
        "last_error": _nullable(_text(LONG_TEXT)),
    }),
    "running": _object({
        "tag": _nullable(TAG),
        "digest": _nullable(_pattern(DIGEST_RE)),
        "container_id": _nullable(_pattern(re.compile(r"^[0-9a-f]{1,64}$"))),
        "status": _nullable(_one_of(CONTAINER_STATUSES)),
        "health": _nullable(_one_of(HEALTH_STATUSES)),
        "started_at": _nullable(_timestamp),
        "restart_count": _nullable(_count),
    }),
    "fallback": _object({
        "active": _bool,
        "requested_tag": _nullable(TAG),
        "reason": _nullable(_text(LONG_TEXT)),
    }),
    "update": _object({
        "status": _one_of(UPDATE_STATUSES),
        "progress": _nullable(PERCENT),
        "last_check_at": _nullable(_timestamp),
        "last_success_at": _nullable(_timestamp),
        "last_error": _nullable(_text(LONG_TEXT)),
        "error_code": _nullable(_one_of(FAILURE_CODES)),
        "deferred": _nullable(_object({
            "tag": TAG,
            "reason": _one_of(DEFER_REASONS),
            "detail": _text(LONG_TEXT),
            "until": _nullable(_timestamp),
        })),
    }),
    "installed_version": _nullable(TAG),
    "latest_version": _nullable(TAG),
    "in_progress": _bool,
    "update_percentage": _nullable(PERCENT),
    "home_assistant": _object({
        "installed_version": _text(SHORT_TEXT),
        "latest_version": _text(SHORT_TEXT),
        "in_progress": _bool,
        "update_percentage": _nullable(PERCENT),
        "release_summary": _text(SHORT_TEXT),
    }),
}
_STATE = _object(STATE_FIELDS)

# the event fields worth showing on the fleet page, in this order
EVENT_FIELDS: dict[str, Check] = {
    "event": _pattern(EVENT_NAME_RE),
    "ts": _timestamp,
    "request_id": _request_id,
    "tag": _nullable(TAG),
    "reason": _nullable(_text(LONG_TEXT)),
    "error": _nullable(_text(LONG_TEXT)),
    "code": _nullable(_one_of(FAILURE_CODES)),
}
_EVENT = _object(EVENT_FIELDS)


def clean_state(document: dict[str, Any]) -> dict[str, Any]:
    """The state document with only the fields the bridge knows, each valid; the agent's
    own documents come out unchanged."""
    cleaned: dict[str, Any] = _STATE(document)
    return cleaned


def clean_event(event: dict[str, Any]) -> dict[str, Any] | None:
    """An event's summary fields, each valid; None when it names no valid event."""
    cleaned: dict[str, Any] = _EVENT(event)
    return cleaned if "event" in cleaned else None


def dropped_fields(raw: dict[str, Any], cleaned: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields of ``raw`` that cleaning left out, as dotted paths (for the log)."""
    out: list[str] = []
    for key, value in raw.items():
        path = f"{prefix}{clean_text(key, 40)}"
        if key not in cleaned:
            out.append(path)
        elif isinstance(value, dict) and isinstance(cleaned[key], dict):
            out += dropped_fields(value, cleaned[key], path + ".")
    return out
