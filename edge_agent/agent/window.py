"""Maintenance windows (``UPDATE_WINDOW``): daily local-time spans in which updates may
be applied. Pure: no I/O, the clock is an argument.

A window is wall-clock time in the agent's zone (``TZ``): ``02:00-04:00`` is open while
the clock on the wall reads 02:00 to 03:59:59, whatever the UTC offset that day. So on a
day the clock jumps forward into a window (a DST gap), the window opens at the jump; on
a day the clock falls back through one, the hour repeats and so does the window.
``23:00-01:00`` crosses midnight; ``00:00-24:00`` is always open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from edge_agent.protocol.errors import ConfigError

SETTING = "UPDATE_WINDOW"
MINUTES_PER_DAY = 24 * 60
MAX_WINDOWS = 24
MAX_SHOWN_CHARS = 40  # of a malformed window, quoted in its error
_SPAN_RE = re.compile(r"^([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})$")


@dataclass(frozen=True)
class Span:
    """One daily window, in minutes after local midnight; ``end`` may be below
    ``start`` (crosses midnight)."""

    start: int
    end: int

    def contains(self, second_of_day: float) -> bool:
        start, end = self.start * 60, self.end * 60
        if start < end:
            return start <= second_of_day < end
        return second_of_day >= start or second_of_day < end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


@dataclass(frozen=True)
class UpdateWindow:
    """The union of daily spans in ``zone``."""

    spans: tuple[Span, ...]
    zone: ZoneInfo

    def is_open(self, now: datetime) -> bool:
        """Whether ``now`` (an aware datetime) falls in a window."""
        local = now.astimezone(self.zone)
        second = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
        return any(span.contains(second) for span in self.spans)

    def next_open(self, now: datetime) -> datetime:
        """The first instant at or after ``now`` when a window is open (UTC)."""
        now = now.astimezone(UTC)
        if self.is_open(now):
            return now
        today = now.astimezone(self.zone).date()
        candidates: list[datetime] = []
        # Two days ahead always holds an opening (no zone skips two days of clock).
        for offset in range(4):
            day = today + timedelta(days=offset)
            for span in self.spans:
                candidates += [t for t in self._openings(day, span.start) if t > now]
        if not candidates:  # every span lies in DST gaps only: cannot happen with real zones
            raise ValueError(f"{self}: no opening within four days of {now.isoformat()}")
        return min(candidates)

    def _openings(self, day: date, minute: int) -> list[datetime]:
        """When the wall clock of ``day`` reads ``minute`` (twice on a fall-back fold) or,
        in a DST gap, jumps past it into an open window."""
        wall = datetime.combine(day, time(minute // 60, minute % 60))
        readings = {wall.replace(tzinfo=self.zone, fold=fold).astimezone(UTC)
                    for fold in (0, 1)}
        shown = [t for t in readings if t.astimezone(self.zone).replace(tzinfo=None) == wall]
        if shown:
            return sorted(shown)
        # A gap: the clock jumps over ``wall`` between the two readings. Zones change
        # offsets on whole seconds: search the first second that reads past it.
        low, high = (int(t.timestamp()) for t in sorted(readings))
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, self.zone).replace(tzinfo=None) < wall:
                low = middle
            else:
                high = middle
        jump = datetime.fromtimestamp(high, UTC)
        return [jump] if self.is_open(jump) else []

    def __str__(self) -> str:
        return ",".join(str(span) for span in self.spans) + f" ({self.zone.key})"


def parse_window(text: str, zone: ZoneInfo) -> UpdateWindow | None:
    """``UPDATE_WINDOW`` as a window; None when unset (always open). Raises ConfigError
    naming the setting for anything else than ``HH:MM-HH:MM[,HH:MM-HH:MM...]``."""
    text = text.strip()
    if not text:
        return None
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_WINDOWS:
        raise ConfigError(f"{SETTING}: at most {MAX_WINDOWS} windows, got {len(parts)}")
    spans = tuple(_parse_span(part) for part in parts)
    return UpdateWindow(spans, zone)


def _parse_span(part: str) -> Span:
    shown = part if len(part) <= MAX_SHOWN_CHARS else part[:MAX_SHOWN_CHARS] + "..."
    match = _SPAN_RE.fullmatch(part)
    if match is None:
        raise ConfigError(f"{SETTING}: {shown!r} is not a window; expected HH:MM-HH:MM "
                          "(local time, e.g. 02:00-04:00 or 23:00-01:00)")
    start_h, start_m, end_h, end_m = (int(group) for group in match.groups())
    start, end = start_h * 60 + start_m, end_h * 60 + end_m
    if max(start_m, end_m) >= 60 or start >= MINUTES_PER_DAY or end > MINUTES_PER_DAY:  # noqa: PLR2004
        raise ConfigError(f"{SETTING}: {shown!r} has a time out of range (00:00 to 23:59; "
                          "24:00 only as an end)")
    if end == MINUTES_PER_DAY and start == 0:
        return Span(0, MINUTES_PER_DAY)  # always open
    end %= MINUTES_PER_DAY
    if start == end:
        raise ConfigError(f"{SETTING}: {shown!r} is empty (start equals end); use "
                          "00:00-24:00 for always")
    return Span(start, end)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"
