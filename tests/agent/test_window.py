"""UPDATE_WINDOW (pure): parsing, is_open and next_open, across midnight and DST days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.agent.config import load_settings
from edge_agent.agent.window import MINUTES_PER_DAY, Span, UpdateWindow, parse_window
from edge_agent.protocol.errors import ConfigError

NEW_YORK = ZoneInfo("America/New_York")
# DST zones of every kind: a one-hour shift either way, a 30-minute one (Lord Howe), the
# southern hemisphere, and a zone that skipped a whole day (Apia, 30 Dec 2011).
ZONES = [ZoneInfo(name) for name in ("America/New_York", "Europe/Berlin", "Australia/Lord_Howe",
                                     "Australia/Sydney", "Pacific/Apia", "UTC")]


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int,  # noqa: PLR0913, PLR0917
       second: int = 0, *, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=zone, fold=fold)


def test_a_window_across_midnight_is_open_on_both_sides() -> None:
    window = parse_window("23:00-01:00", NEW_YORK)
    assert window is not None
    assert window.is_open(at(NEW_YORK, 2024, 6, 1, 23, 30))
    assert window.is_open(at(NEW_YORK, 2024, 6, 2, 0, 59, 59))
    assert not window.is_open(at(NEW_YORK, 2024, 6, 2, 1, 0))
    assert window.next_open(at(NEW_YORK, 2024, 6, 2, 1, 0)) == at(NEW_YORK, 2024, 6, 2, 23, 0)


def test_several_windows_the_next_opening_is_the_nearest() -> None:
    window = parse_window("02:00-04:00, 22:30-23:15", NEW_YORK)
    assert window is not None
    assert window.next_open(at(NEW_YORK, 2024, 6, 1, 12, 0)) == at(NEW_YORK, 2024, 6, 1, 22, 30)
    assert window.next_open(at(NEW_YORK, 2024, 6, 1, 23, 15)) == at(NEW_YORK, 2024, 6, 2, 2, 0)
    assert str(window) == "02:00-04:00,22:30-23:15 (America/New_York)"


def test_a_window_in_the_spring_forward_gap_opens_at_the_jump() -> None:
    """10 March 2024, New York: 02:00 EST jumps to 03:00 EDT. 02:30-04:00 opens at the
    jump (03:00 EDT, 07:00 UTC); 02:10-02:40 lies wholly in the gap and does not open."""
    window = parse_window("02:30-04:00", NEW_YORK)
    assert window is not None
    assert window.next_open(datetime(2024, 3, 10, 5, 0, tzinfo=UTC)) == datetime(
        2024, 3, 10, 7, 0, tzinfo=UTC)
    gap_only = parse_window("02:10-02:40", NEW_YORK)
    assert gap_only is not None
    assert gap_only.next_open(datetime(2024, 3, 10, 5, 0, tzinfo=UTC)) == at(
        NEW_YORK, 2024, 3, 11, 2, 10)


def test_a_window_in_the_fall_back_hour_opens_twice() -> None:
    """3 November 2024, New York: 01:00-02:00 happens twice (EDT, then EST)."""
    window = parse_window("01:00-01:30", NEW_YORK)
    assert window is not None
    after_first = at(NEW_YORK, 2024, 11, 3, 1, 45, fold=0)  # 05:45 UTC
    assert not window.is_open(after_first)
    assert window.next_open(after_first) == datetime(2024, 11, 3, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", [
    "2-4", "02:00", "02:00-", "25:00-02:00", "02:60-03:00", "02:00-24:01", "24:00-02:00",
    "02:00-02:00", "02:00-04:00,", "02:00-04:00;05:00-06:00", "\u0660\u0662:\u0660\u0660-\u0660\u0664:\u0660\u0660", "x" * 500,
    ",".join(["01:00-02:00"] * 25),
])
def test_a_malformed_window_is_a_config_error_naming_the_setting(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^UPDATE_WINDOW: "):
        parse_window(text, NEW_YORK)


def test_00_00_to_24_00_is_always_open() -> None:
    window = parse_window("00:00-24:00", NEW_YORK)
    assert window is not None and window.spans == (Span(0, MINUTES_PER_DAY),)
    assert window.is_open(at(NEW_YORK, 2024, 3, 10, 3, 0))


def test_the_settings_read_tz_and_refuse_an_unknown_zone() -> None:
    base = {"CONTAINER_IMAGE": "r/app", "UPDATE_WINDOW": "02:00-04:00"}
    settings_ = load_settings({**base, "TZ": "Europe/Berlin"})
    assert settings_.update_window is not None
    assert settings_.update_window.zone.key == "Europe/Berlin"
    assert load_settings(base).update_window.zone.key == "UTC"  # type: ignore[union-attr]
    for bad in ("Mars/Olympus", "../etc/passwd", "Europe", ""):
        if not bad:
            continue
        with pytest.raises(ConfigError, match=r"^TZ: "):
            load_settings({**base, "TZ": bad})
    # TZ means nothing to the agent without a window: not checked then
    assert load_settings({"CONTAINER_IMAGE": "r/app", "TZ": "Mars/Olympus"}).update_window is None
    with pytest.raises(ConfigError, match=r"^UPDATE_WINDOW: "):
        load_settings({**base, "UPDATE_WINDOW": "soon"})


spans = st.lists(
    st.tuples(st.integers(0, MINUTES_PER_DAY - 1), st.integers(0, MINUTES_PER_DAY - 1))
    .filter(lambda s: s[0] != s[1]).map(lambda s: Span(*s)), min_size=1, max_size=4)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2035, 1, 1),
                       timezones=st.just(UTC))


@settings(max_examples=400)
@given(spans=spans, zone=st.sampled_from(ZONES), now=moments,
       probes=st.lists(st.floats(0.0, 1.0), max_size=8))
def test_next_open_is_the_first_open_instant(
    spans: list[Span], zone: ZoneInfo, now: datetime, probes: list[float]
) -> None:
    """next_open(now) is open, not before now, and nothing between them is open."""
    window = UpdateWindow(tuple(spans), zone)
    opening = window.next_open(now)
    assert opening >= now
    assert window.is_open(opening)
    assert opening - now < timedelta(days=3)
    if opening > now:
        assert not window.is_open(now)
        assert not window.is_open(max(now, opening - timedelta(seconds=1)))
        for share in probes:
            assert not window.is_open(now + (opening - now) * share * 0.999)


@settings(max_examples=300)
@given(text=st.text(max_size=40))
def test_any_text_is_a_window_or_a_config_error(text: str) -> None:
    try:
        parse_window(text, NEW_YORK)
    except ConfigError as exc:
        assert str(exc).startswith("UPDATE_WINDOW: ")
