"""Device data as text for the operator: safe strings, the fleet table, status and event
lines, progress bars, and the ``Printer`` that writes them. Pure but for the Printer.

Everything a device publishes is untrusted, and every string a device chose reaches the
terminal through ``printable``: control, bidi and zero-width characters become visible
escapes and the length is capped, so a device can neither write to the operator's
terminal nor forge a line of the output. edge-ctl shows what a device sent (a value it
does not know is shown, escaped, not dropped: it is where an operator looks at what a
device really says); a field of the wrong type shows as ``?``. ``--json`` output is
plain ``json.dumps`` with ``ensure_ascii``: every control and non-ASCII character is a
``\\uXXXX`` escape.
"""

from __future__ import annotations

import json
import math
import sys
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from edge_agent.protocol.answers import lookup
from edge_agent.protocol.events import CheckOutcome
from edge_agent.protocol.state import UpdateStatus
from edge_agent.protocol.timestamps import local_time, utc_now

BAR_WIDTH = 20
# How much of a device-chosen string is shown: in a table cell or short field, and in a
# longer text (an error, a reason). Longer ones end in ELLIPSIS.
CELL_CHARS = 64
TEXT_CHARS = 300
ELLIPSIS = "\u2026"
# Event fields shown on one watch line.
MAX_DETAILS = 12
# Distinct notes and progress bars remembered per run.
MAX_NOTED = 1000
# Never printed as they are: controls (C0, DEL, C1; ESC starts terminal sequences, CR and
# LF forge lines), format characters (bidi overrides and isolates, zero-width ones), line
# and paragraph separators, surrogates, private-use and unassigned code points.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


# -- safe text --------------------------------------------------------------------------
def printable(value: object, limit: int = TEXT_CHARS) -> str:
    """``value`` (a device-chosen string, or any JSON value) as text that is safe on a
    terminal: hidden characters (see HIDDEN_CATEGORIES) become visible escapes such as
    ``\\x1b`` or ``\\u202e``, and at most ``limit`` characters are shown, the last being
    ELLIPSIS when something was cut. Printable text passes unchanged, so it is idempotent."""
    text = value if isinstance(value, str) else _compact(value)
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _escape(char)
        if size + len(piece) > limit:
            while pieces and size + len(ELLIPSIS) > limit:
                size -= len(pieces.pop())
            return "".join(pieces) + ELLIPSIS if limit >= len(ELLIPSIS) else ""
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _escape(char: str) -> str:
    if " " <= char <= "~":
        return char
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if unicodedata.category(char) not in HIDDEN_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFF:  # noqa: PLR2004 - the widest \xNN
        return f"\\x{code:02x}"
    if code <= 0xFFFF:  # noqa: PLR2004 - the widest \uNNNN
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _compact(value: object) -> str:
    """A JSON value that is not a string, in a few characters."""
    try:
        if value is None or isinstance(value, bool | int | float):
            return str(value)
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (ValueError, TypeError, RecursionError):  # e.g. an int of too many digits
        return "?"


# -- reading a device's fields ----------------------------------------------------------
def text_at(document: Any, *path: str) -> str | None:
    """A string field of a device document: None when missing or null, "?" when the
    device put something else there. Not yet printable."""
    value = lookup(document, *path)
    if value is None or isinstance(value, str):
        return value
    return "?"


def percent(value: Any) -> float | None:
    """A progress figure from a device, clamped to 0-100; None unless a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        return None
    return min(100.0, max(0.0, number)) if math.isfinite(number) else None


def clock(ts: Any) -> str:
    """The local time of a device's message: its ``ts``, or now when that is none."""
    return local_time(ts) or local_time(utc_now()) or "--:--:--"


def date_time(value: Any) -> str:
    """A timestamp field in local time with the date; what the device sent (printable)
    when it is no timestamp, ``-`` when it sent nothing."""
    if not isinstance(value, str):
        return "-"
    return local_time(value, with_date=True) or printable(value, CELL_CHARS)


# -- the fleet table --------------------------------------------------------------------
@dataclass
class DeviceView:
    """One row of ``edge-ctl devices``: what the device's retained messages say."""

    device_id: str
    online: bool | None = None
    state: dict[str, Any] | None = None
    # why the device's retained state was not used (too large, too deep, not JSON, ...)
    state_error: str | None = None
    # the group or fleet tag that this device's own tag (set for it alone) overrides
    # (protocol.precedence.shadowed): {"scope", "group", "tag"}
    shadows: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "online": self.online, "state": self.state,
                "state_error": self.state_error, "shadows": self.shadows}

    def override_note(self) -> str | None:
        """Says that a device tag wins over group and fleet tags, which is easy to forget
        (a device tag set once, even a mistyped one, stays until it is cleared)."""
        if text_at(self.state, "desired", "source") != "device":
            return None
        clear = f"edge-ctl clear-tag --device {self.device_id}"
        if self.shadows is not None:
            what = (f"group {self.shadows['group']}" if self.shadows["group"] is not None
                    else "fleet")
            return (f"its device tag shadows the {what} tag {self.shadows['tag']} "
                    f"(follow it: {clear})")
        return f"its device tag wins over group and fleet tags ({clear} to follow them)"


def status_text(state: dict[str, Any] | None) -> str:
    """The update status as an operator reads it: ``pulling 45%``, ``fallback``, ...
    Safe to print: device strings in it are ``printable``."""
    if state is None:
        return "-"
    status = text_at(state, "update", "status") or "-"
    progress = percent(lookup(state, "update", "progress"))
    if status == UpdateStatus.PULLING and progress is not None:
        status = f"pulling {progress:.0f}%"
    status = printable(status, CELL_CHARS)
    if status == UpdateStatus.DEFERRED:
        reason = printable(text_at(state, "update", "deferred", "reason") or "?", CELL_CHARS)
        until = local_time(lookup(state, "update", "deferred", "until"), with_date=True)
        status += f" ({reason}{f' until {until}' if until else ''})"
    if lookup(state, "fallback", "active") is True:
        requested = printable(text_at(state, "fallback", "requested_tag") or "?", CELL_CHARS)
        status += f" (fallback: {requested} not found)"
    return status


def note_text(view: DeviceView) -> str:
    """The NOTE column: a shadowed group or fleet tag first (the device will not follow
    it, whatever else goes on), then why its state is unusable or its last error."""
    problem = view.state_error or text_at(view.state, "update", "last_error")
    if view.shadows is not None:
        return "; ".join(filter(None, [view.override_note(), problem]))
    return problem or view.override_note() or ""


def devices_table(devices: Sequence[DeviceView]) -> str:
    header = ("DEVICE", "ONLINE", "RUNNING", "DESIRED", "STATUS", "HEALTH", "LAST CHECK", "NOTE")
    rows = [header]
    for view in devices:
        state = view.state
        desired = text_at(state, "desired", "tag")
        source = text_at(state, "desired", "source")
        group = text_at(state, "desired", "group")
        if desired and source:
            desired = f"{desired} ({source}{':' + group if group else ''})"
        running = text_at(state, "running", "tag")
        container = text_at(state, "running", "status")
        if running and container not in (None, "running"):
            running = f"{running} ({container})"
        elif not running and container:
            running = f"- ({container})"
        rows.append((
            printable(view.device_id, CELL_CHARS),
            {True: "yes", False: "no", None: "?"}[view.online],
            printable(running or "-", CELL_CHARS),
            printable(desired or "-", CELL_CHARS),
            status_text(state),
            printable(text_at(state, "running", "health") or "-", CELL_CHARS),
            date_time(lookup(state, "update", "last_check_at")),
            printable(note_text(view), TEXT_CHARS),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  " + row[-1]
        for row in rows
    ).rstrip()


# -- answers and events -----------------------------------------------------------------
# A device's answer to check/install, by its outcome; ``{tag}`` is the printable tag.
OUTCOMES: dict[CheckOutcome, str] = {
    CheckOutcome.UNCHANGED: "up to date: runs {tag}",
    CheckOutcome.UPDATED: "updated to {tag}",
    CheckOutcome.STARTED: "{tag} was not running: started it",
    CheckOutcome.ROLLED_BACK: "update to {tag} rolled back",
    CheckOutcome.SKIPPED: "{tag} not applied: this digest failed verification before "
                          "(push a new image or set another tag)",
    CheckOutcome.AVAILABLE: "update to {tag} available (UPDATE_MODE=notify): edge-ctl install",
    CheckOutcome.INTERRUPTED: "update to {tag} interrupted (the agent is stopping)",
    CheckOutcome.DEFERRED: "update to {tag} deferred{why}; --force applies it now",
}


def describe_outcome(answer: dict[str, Any]) -> str:
    """A device's answer to check/install in words (safe to print)."""
    outcome = answer.get("outcome")
    tag = printable(text_at(answer, "tag") or "-", CELL_CHARS)
    if isinstance(outcome, str) and outcome in OUTCOMES:
        # the template is ours, picked by the device's outcome: never a device string
        return OUTCOMES[CheckOutcome(outcome)].format(tag=tag, why=deferred_why(answer))
    return f"{printable(outcome, CELL_CHARS)} ({tag})"


def deferred_why(answer: dict[str, Any]) -> str:
    """`` (window until 2026-01-02 02:00:00)`` from a deferred answer's ``deferred``."""
    reason = text_at(answer, "deferred", "reason")
    if reason is None:
        return ""
    until = local_time(lookup(answer, "deferred", "until"), with_date=True)
    return f" ({printable(reason, CELL_CHARS)}{f' until {until}' if until else ''})"


def superseded_text(event: dict[str, Any]) -> str:
    """What a ``tag_superseded`` event says about its request, in words (safe to print):
    ``replaced by 3.0 (request r2) before it was applied``, or ``cleared before ...``."""
    new_tag = text_at(event, "new_tag")
    by = text_at(event, "superseded_by")
    if new_tag is None:
        what = "cleared"
    else:
        what = f"replaced by {printable(new_tag, CELL_CHARS)}"
        if by:
            what += f" (request {printable(by, CELL_CHARS)})"
    return f"{what} before it was applied"


def event_details(body: dict[str, Any]) -> str:
    """``key=value ...`` of an event's own fields, each ``printable``, at most MAX_DETAILS."""
    skip = ("event", "ts", "device_id", "request_id")
    shown = [(key, value) for key, value in body.items() if key not in skip and value is not None]
    parts = [f"{printable(key, CELL_CHARS)}={printable(value, CELL_CHARS * 2)}"
             for key, value in shown[:MAX_DETAILS]]
    if len(shown) > MAX_DETAILS:
        parts.append(f"(+{len(shown) - MAX_DETAILS} more)")
    return " ".join(parts)


def bar(value: float) -> str:
    """``[#####...............]`` for ``value`` percent."""
    if not math.isfinite(value):
        value = 0.0
    filled = max(0, min(BAR_WIDTH, round(value / 100 * BAR_WIDTH)))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


# -- output -----------------------------------------------------------------------------
class Printer:
    """Human output (progress to stderr, results to stdout) or JSON lines on stdout."""

    def __init__(self, as_json: bool, out: TextIO | None = None,
                 err: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.tty = self.err.isatty()
        self._bar_open = False
        self._last_bucket: dict[tuple[str, str], int] = {}
        self._noted: set[tuple[str, ...]] = set()

    def result(self, obj: Any, text: str) -> None:
        """The command's result: ``text`` for humans, ``obj`` as one JSON line."""
        self._close_bar()
        if self.as_json:
            # ensure_ascii: device strings reach scripts as \\uXXXX escapes, never raw
            print(json.dumps(obj, sort_keys=True, ensure_ascii=True), file=self.out,
                  flush=True)
        else:
            print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """Progress for humans (stderr); nothing in JSON mode."""
        if self.as_json:
            return
        self._close_bar()
        print(text, file=self.err, flush=True)

    def note_once(self, key: tuple[str, ...], text: str) -> None:
        """``note``, once per ``key`` (a device that keeps sending junk is named once)."""
        if key in self._noted:
            return
        if len(self._noted) < MAX_NOTED:
            self._noted.add(key)
        self.note(text)

    def warn(self, text: str) -> None:
        """``edge-ctl: warning: ...`` on stderr, also in JSON mode (stdout stays JSON)."""
        self._close_bar()
        print(f"edge-ctl: warning: {text}", file=self.err, flush=True)

    def error(self, text: str) -> None:
        """The one-line ``edge-ctl: ...`` on stderr, for humans (JSON has the result)."""
        if not self.as_json:
            self._close_bar()
            print(f"edge-ctl: {text}", file=self.err, flush=True)

    def progress(self, device_id: str, tag: str, value: float) -> None:
        """A progress bar on a terminal; lines every 10 % otherwise. ``tag`` may come
        from the device: it is shown ``printable``."""
        if self.as_json:
            return
        line = (f"{printable(device_id, CELL_CHARS)}: pulling {printable(tag, CELL_CHARS)} "
                f"{bar(value)} {value:5.1f}%")
        if self.tty:
            print(f"\r{line}", end="", file=self.err, flush=True)
            self._bar_open = True
            return
        bucket = int(value // 10)
        if len(self._last_bucket) >= MAX_NOTED:
            self._last_bucket.clear()  # a device inventing tags must not grow this forever
        if self._last_bucket.get((device_id, tag)) != bucket:
            self._last_bucket[(device_id, tag)] = bucket
            print(line, file=self.err, flush=True)

    def new_pull(self, device_id: str) -> None:
        """An update starts: its progress is shown from 0 again."""
        for key in [k for k in self._last_bucket if k[0] == device_id]:
            del self._last_bucket[key]

    def _close_bar(self) -> None:
        if self._bar_open:
            print(file=self.err, flush=True)
            self._bar_open = False
