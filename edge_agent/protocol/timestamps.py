"""The one timestamp format of the wire, and its reader for timestamps written by others.

Written: ISO 8601 in UTC with milliseconds and ``Z`` (``2026-11-29T10:08:03.480Z``).
Read: any RFC 3339 date-time with an offset, from 1970 to 9000 (far from datetime's
year 1 and 9999, where the offset arithmetic overflows); anything else is no timestamp.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

RFC3339_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                        r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$")
MIN_EPOCH = 0.0
MAX_EPOCH = datetime(9000, 1, 1, tzinfo=UTC).timestamp()


def format_utc(epoch: float | None = None) -> str:
    """``epoch`` (default: now) in the wire format."""
    moment = datetime.fromtimestamp(time.time() if epoch is None else epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    """Now, in the wire format."""
    return format_utc()


def parse_utc(value: object) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp, or None when ``value`` is not one (not a
    string, no offset, before 1970 or after 9000). Never raises."""
    if not isinstance(value, str) or not RFC3339_RE.fullmatch(value):
        return None
    try:
        epoch = datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError):
        return None
    return epoch if MIN_EPOCH <= epoch <= MAX_EPOCH else None


def local_time(value: object, *, with_date: bool = False) -> str | None:
    """A timestamp as the local wall-clock time for people (``HH:MM:SS``, or with the
    date), or None when it is not one."""
    epoch = parse_utc(value)
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S")
