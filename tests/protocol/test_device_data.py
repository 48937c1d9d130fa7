"""Unit tests of what the bridge keeps of device data (device_data; no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edge_agent.bridge.api import openapi_document
from edge_agent.protocol.device_data import (
    DESIRED_SOURCES,
    MAX_CLOCK_AHEAD_S,
    UPDATE_STATUSES,
    clean_event,
    clean_state,
    clean_text,
    dropped_fields,
    seen_at,
)
from edge_agent.protocol.state import (
    CONTAINER_STATUSES,
    HEALTH_STATUSES,
    Source,
    UpdateStatus,
)
from edge_agent.protocol.timestamps import format_utc, parse_utc
from tests.bridge.support import hostile_states, schema_validator, state_document

NOW = 1_800_000_000.0
DEVICE_STATE = schema_validator("DeviceState")


@pytest.mark.parametrize(("text", "epoch"), [
    ("2024-05-01T12:00:00.000Z", 1714564800.0),
    ("2024-05-01T12:00:00Z", 1714564800.0),
    ("2024-05-01T14:00:00+02:00", 1714564800.0),
    ("2024-05-01t12:00:00.5z", 1714564800.5),
    ("1970-01-01T00:00:00Z", 0.0),
])
def test_rfc3339_timestamps_parse(text: str, epoch: float) -> None:
    assert parse_utc(text) == epoch


@pytest.mark.parametrize("value", [
    "9999-12-31T23:59:59-23:59",  # the red team's: year 10000 in UTC
    "0001-01-01T00:00:00+14:00",  # and year 0
    "9999-12-31T23:59:59.999999Z",
    "9001-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "2024-05-01T12:00:00",  # no offset
    "2024-05-01",
    "2024-13-01T00:00:00Z",
    "2024-05-01T25:00:00Z",
    "2024-05-01T12:00:00+24:00",
    "2024-05-01T12:00:00+99:99",
    "+275760-09-13T00:00:00Z",
    "2024-05-01T12:00:00.0000000000Z",
    "x" * 10_000,
    "",
    None, 1714564800, 1e308, float("nan"), [], {}, True,
])
def test_anything_else_is_no_timestamp_and_never_raises(value: Any) -> None:
    assert parse_utc(value) is None


def test_iso_utc_of_every_accepted_timestamp_works() -> None:
    for text in ("1970-01-01T00:00:00Z", "8999-12-31T23:59:59+23:59", "1970-01-01T23:59:59+23:59"):
        epoch = parse_utc(text)
        if epoch is not None:
            assert format_utc(epoch).endswith("Z")


def test_seen_at_ignores_a_clock_far_ahead_and_caps_a_little_ahead_at_now() -> None:
    assert seen_at(format_utc(NOW - 60), NOW) == NOW - 60
    assert seen_at(format_utc(NOW + 10), NOW) == NOW
    assert seen_at(format_utc(NOW + MAX_CLOCK_AHEAD_S + 1), NOW) is None
    assert seen_at("9999-12-31T23:59:59-23:59", NOW) is None
    assert seen_at(None, NOW) is None


@pytest.mark.parametrize(("value", "limit", "expected"), [
    ("plain", 10, "plain"),
    ("line\nbreak\ttab", 20, "line\nbreak\ttab"),
    ("esc\x1b[2Jbell\x07nul\x00", 40, "esc\ufffd[2Jbell\ufffdnul\ufffd"),
    ("c1\x85\x9b", 10, "c1\ufffd\ufffd"),
    ("bidi\u202eevil\u2066x", 20, "bidi\ufffdevil\ufffdx"),
    ("lone\ud800surrogate", 20, "lone\ufffdsurrogate"),
    ("abcdefghij", 10, "abcdefghij"),
    ("abcdefghijk", 10, "abcdefghi…"),
    (5, 10, None),
    (None, 10, None),
])
def test_clean_text(value: Any, limit: int, expected: str | None) -> None:
    assert clean_text(value, limit) == expected


def test_the_agent_s_own_state_comes_out_unchanged() -> None:
    document = state_document("dev1", "1.0", request_id="r-1")
    document["update"]["last_error"] = "registry unreachable\nretrying"
    document["fallback"] = {"active": True, "requested_tag": "2.0", "reason": "not found"}
    assert clean_state(document) == document
    assert dropped_fields(document, clean_state(document)) == []


def test_fixed_lists_match_the_agent_s_enums() -> None:
    assert {str(s) for s in UpdateStatus} == UPDATE_STATUSES
    assert {str(s) for s in Source} == DESIRED_SOURCES
    assert {"running", "exited", "missing"} <= CONTAINER_STATUSES


def test_fixed_lists_are_the_openapi_enums() -> None:
    props = openapi_document(1.0)["components"]["schemas"]["DeviceState"]["properties"]
    assert set(props["update"]["properties"]["status"]["enum"]) == UPDATE_STATUSES
    assert set(props["running"]["properties"]["status"]["enum"]) == CONTAINER_STATUSES
    assert set(props["running"]["properties"]["health"]["enum"]) == HEALTH_STATUSES
    assert set(props["desired"]["properties"]["source"]["enum"]) == DESIRED_SOURCES


def test_wrong_types_everywhere_are_left_out() -> None:
    raw = json.loads(hostile_states()["types"])
    cleaned = clean_state(raw)
    DEVICE_STATE(cleaned)
    assert cleaned == {"running": {}, "fallback": {}, "update": {}}
    assert set(dropped_fields(raw, cleaned)) >= {"device_id", "ts", "desired", "extra",
                                                 "running.tag", "update.status"}


def test_markup_and_made_up_classes_are_left_out_or_kept_as_bounded_text() -> None:
    raw = json.loads(hostile_states()["markup"])
    cleaned = clean_state(raw)
    DEVICE_STATE(cleaned)
    assert "status" not in cleaned["update"]  # "idle x-evil" is no status
    assert "health" not in cleaned["running"] and "status" not in cleaned["running"]
    assert "tag" not in cleaned["running"] and "device_id" not in cleaned
    assert cleaned["update"]["last_error"] == raw["update"]["last_error"]  # text, shown as text


@pytest.mark.parametrize(("field", "value"), [
    ("progress", 101), ("progress", -1), ("progress", True), ("progress", "50"),
    ("progress", 10**400),
])
def test_numbers_out_of_range_are_left_out(field: str, value: Any) -> None:
    cleaned = clean_state({"update": {field: value}, "update_percentage": value,
                           "running": {"restart_count": value if value != 101 else -5}})
    assert cleaned == {"update": {}, "running": {}}


def test_events_keep_valid_summary_fields_only() -> None:
    assert clean_event({"event": "rolled_back", "ts": "2024-05-01T12:00:00.000Z",
                        "request_id": "r1", "reason": "unhealthy", "digest": "sha256:x",
                        "tag": "2.0"}) == {
        "event": "rolled_back", "ts": "2024-05-01T12:00:00.000Z", "request_id": "r1",
        "tag": "2.0", "reason": "unhealthy"}
    assert clean_event({"event": "Rolled Back"}) is None
    assert clean_event({"event": ["x"]}) is None
    assert clean_event({"event": "x", "request_id": "has space", "tag": "a b",
                        "ts": "9999-12-31T23:59:59-23:59", "error": "e" * 5000}) == {
        "event": "x", "error": "e" * 1999 + "…"}
