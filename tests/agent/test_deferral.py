"""The deferral decision (pure): window first, then the app's lock and its maximum hold;
and the payload fields that ask for it (``force``, ``spread``)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.agent.deferral import decide_deferral
from edge_agent.agent.window import parse_window
from edge_agent.protocol.messages import CheckRequest, CommandRefused, parse_command, route
from edge_agent.protocol.state import DeferReason
from edge_agent.protocol.tags import PayloadRejected, parse_tag_payload
from edge_agent.protocol.topics import Topics

WINDOW = parse_window("02:00-04:00", ZoneInfo("UTC"))
NOON = datetime(2024, 6, 1, 12, 0, tzinfo=UTC).timestamp()
IN_WINDOW = datetime(2024, 6, 1, 3, 0, tzinfo=UTC).timestamp()
T = Topics("edge")


def test_outside_the_window_the_update_waits_for_its_opening() -> None:
    decision = decide_deferral(tag="2.0", now=NOON, window=WINDOW, lock_held=True,
                               lock_deferred_since=None, max_hold_s=3600)
    assert decision.deferral is not None
    assert decision.deferral.reason is DeferReason.WINDOW
    assert decision.deferral.to_json()["until"] == "2024-06-02T02:00:00.000Z"


def test_in_the_window_a_held_lock_defers_until_the_maximum_hold() -> None:
    first = decide_deferral(tag="2.0", now=IN_WINDOW, window=WINDOW, lock_held=True,
                            lock_deferred_since=None, max_hold_s=600)
    assert first.deferral is not None and first.deferral.reason is DeferReason.LOCK
    assert first.deferral.until == IN_WINDOW + 600
    later = decide_deferral(tag="2.0", now=IN_WINDOW + 599, window=WINDOW, lock_held=True,
                            lock_deferred_since=IN_WINDOW, max_hold_s=600)
    assert later.deferral is not None and not later.lock_overridden
    expired = decide_deferral(tag="2.0", now=IN_WINDOW + 600, window=WINDOW, lock_held=True,
                              lock_deferred_since=IN_WINDOW, max_hold_s=600)
    assert expired.deferral is None and expired.lock_overridden
    forever = decide_deferral(tag="2.0", now=IN_WINDOW + 10**6, window=None, lock_held=True,
                              lock_deferred_since=IN_WINDOW, max_hold_s=0)
    assert forever.deferral is not None and forever.deferral.until is None


@settings(max_examples=300)
@given(now=st.floats(946684800, 2.0e9), held=st.booleans(),
       since=st.one_of(st.none(), st.floats(946684800, 2.0e9)),
       max_hold=st.sampled_from([0.0, 1.0, 3600.0]), windowed=st.booleans())
def test_the_decision_holds_its_rules_for_any_facts(
    now: float, held: bool, since: float | None, max_hold: float, windowed: bool
) -> None:
    window = WINDOW if windowed else None
    decision = decide_deferral(tag="t", now=now, window=window, lock_held=held,
                               lock_deferred_since=since, max_hold_s=max_hold)
    deferral = decision.deferral
    is_open = window is None or window.is_open(datetime.fromtimestamp(now, UTC))
    if not is_open:
        assert deferral is not None and deferral.reason is DeferReason.WINDOW
        assert deferral.until is not None and deferral.until > now
    elif not held:
        assert deferral is None and not decision.lock_overridden
    else:
        start = now if since is None else since
        overdue = max_hold > 0 and now - start >= max_hold
        assert (deferral is None) == overdue == decision.lock_overridden
        if deferral is not None:
            assert deferral.reason is DeferReason.LOCK


def test_spread_on_a_desired_tag_is_read_and_bad_values_are_rejected() -> None:
    assert parse_tag_payload(b'{"tag": "2.0", "spread": 600}').spread == 600.0
    assert parse_tag_payload(b'{"tag": "2.0"}').spread == 0.0
    for bad in (b"-1", b"86401", b'"60"', b"true", b"null", b"1e9"):
        with pytest.raises(PayloadRejected, match='"spread" must be') as caught:
            parse_tag_payload(b'{"tag": "2.0", "request_id": "r1", "spread": ' + bad + b"}")
        assert caught.value.request_id == "r1"  # the rejection answers that request


def test_force_and_spread_on_commands() -> None:
    assert parse_command(b'{"request_id": "r1", "force": true}').force
    assert parse_command(b"install") == parse_command(b"")
    for bad in (b'{"force": 1}', b'{"force": "yes"}', b'{"spread": -5}'):
        with pytest.raises(CommandRefused):
            parse_command(bad)
    device_check = route(T, "d1", [], T.device_check("d1"), b'{"force": true, "spread": 60}')
    assert isinstance(device_check, CheckRequest)
    assert device_check.force and device_check.spread == 0.0  # one device: no spread
    fleet = route(T, "d1", [], T.fleet_check, b'{"spread": 60}')
    assert isinstance(fleet, CheckRequest) and fleet.fleet and fleet.spread == 60.0


def test_a_forced_fleet_check_or_a_bad_field_drops_the_command(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert route(T, "d1", [], T.fleet_check, b'{"force": true}') is None
    assert route(T, "d1", [], T.device_install("d1"), b'{"spread": "soon"}') is None
    assert [r.getMessage() for r in caplog.records] == [
        "dropped a command on edge/fleet/cmd/check: force applies to one device's command, "
        "not the fleet's",
        'dropped a command on edge/devices/d1/cmd/install: "spread" must be a number of '
        "seconds from 0 to 86400",
    ]
