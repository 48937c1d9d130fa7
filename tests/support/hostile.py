"""What a hostile device publishes, for tests of every surface that shows device data
(edge-ctl, the bridge, the fleet page, soak benches).

A compromised device may write anything to its own topics (the broker's ACL stops it at
the others): JSON nested thousands of levels deep, terminal escapes that clear the
screen or set the window title, CR/LF that forge table rows, bidi overrides and
zero-width characters that make text read differently than it is, numbers out of every
range, timestamps at the ends of time, wrong types everywhere.
"""

from __future__ import annotations

import json
from typing import Any

# Terminal control: clear screen, set the window title (OSC ... BEL), colour, the 8-bit
# CSI (C1 control), a cursor move, backspaces over text.
ESCAPES = ("\x1b[2J", "\x1b]0;pwned\x07", "\x1b[31mred", "\x9b2J", "\x1b[10;1H", "ok\b\b\bno")
# A line that, printed raw, looks like a row of the fleet table for another device.
FORGED_ROW = "\r\nforged-dev  yes  6.6.6  6.6.6 (fleet)  idle  healthy  -"
BIDI = ("\u202eevil\u202c", "\u2066isolated\u2069", "\u202aembed\u202c", "\u202bx\u202d")
ZERO_WIDTH = "a\u200bb\u200cc\u200dd\u2060e\ufeff"
# Printed raw, none of these may reach an operator's terminal.
FORBIDDEN = frozenset("\x1b\r\x07\x9b\b\x00\u202a\u202b\u202c\u202d\u202e"
                      "\u2066\u2067\u2068\u2069\u200b\u200c\u200d\u2060\ufeff")
# Large, but under the shipped broker's packet limit together with the rest of a state.
HUGE = "A" * 20_000 + "\x1b[2J" + "B" * 20_000
FAR_TIMES = ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00", "x" * 500, "")
HOSTILE_STRINGS = (*ESCAPES, FORGED_ROW, *BIDI, ZERO_WIDTH)


def hostile_text() -> str:
    """Every hostile string in one."""
    return "|".join(HOSTILE_STRINGS)


def deep_json(depth: int = 5_000, key: str = "update") -> bytes:
    """``{"<key>": [[[...]]]}``: a few kilobytes that overflow a recursive decoder."""
    return b'{"' + key.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"


def good_state(device_id: str, tag: str = "2.0", *, status: str = "idle") -> dict[str, Any]:
    """A well-formed state document (the agent's shape) of a device running ``tag``."""
    return {
        "device_id": device_id, "agent_version": "0.1.0", "ts": "2026-11-29T10:08:08.283Z",
        "image": "127.0.0.1:5000/acme/app",
        "desired": {"tag": tag, "source": "fleet", "group": None, "request_id": None},
        "running": {"tag": tag, "digest": "sha256:" + "a" * 64, "container_id": "c" * 64,
                    "status": "running", "health": "healthy",
                    "started_at": "2026-11-29T10:08:04.154180635Z", "restart_count": 0},
        "fallback": {"active": False, "requested_tag": None, "reason": None},
        "update": {"status": status, "progress": None, "last_check_at": "2026-11-29T10:08:08Z",
                   "last_success_at": "2026-11-29T10:08:07.217Z", "last_error": None},
        "installed_version": tag, "latest_version": tag, "in_progress": False,
        "update_percentage": None,
    }


def hostile_state(device_id: str, *, request_id: str | None = None,
                  huge: bool = False) -> dict[str, Any]:
    """A state document whose every string field is hostile (``huge``: one is 40 KB)."""
    text = hostile_text()
    state = good_state(device_id)
    state["desired"] = {"tag": ESCAPES[0] + "2.0", "source": FORGED_ROW, "group": BIDI[0],
                        "request_id": request_id or text}
    state["running"].update(tag=ESCAPES[1] + FORGED_ROW, status=BIDI[1], health=ZERO_WIDTH)
    state["fallback"] = {"active": True, "requested_tag": FORGED_ROW, "reason": text}
    state["update"].update(status=ESCAPES[3], progress=1e308, last_check_at=FAR_TIMES[0],
                           last_error=HUGE if huge else text)
    state["ts"] = FAR_TIMES[1]
    return state


def wrong_types_state(device_id: str) -> bytes:
    """A state whose fields have the wrong JSON types and numbers out of every range."""
    body = json.dumps({
        "device_id": [device_id], "ts": 12,
        "desired": {"tag": ["2.0"], "source": {"x": 1}, "group": 7, "request_id": False},
        "running": {"tag": {"tag": "2.0"}, "status": ["running"], "health": 1.5},
        "fallback": {"active": "yes", "requested_tag": 3},
        "update": {"status": "pulling", "progress": "45", "last_check_at": ["now"],
                   "last_error": {"nested": ESCAPES[0]}},
    })
    # 1e999 decodes to infinity; the integer is far beyond any float
    return body.replace('"45"', "1e999").replace('"ts": 12', '"ts": ' + "9" * 4000).encode()


def hostile_events(request_id: str | None = None) -> list[bytes]:
    """Events a hostile device sends: bad progress, escapes in every field, deep JSON,
    a forged device id, not JSON at all."""
    text = hostile_text()
    extra = {"request_id": request_id} if request_id else {}
    events: list[dict[str, Any] | bytes] = [
        {"event": "update_started", "from_tag": FORGED_ROW, "to_tag": ESCAPES[0], **extra},
        {"event": "pull_progress", "tag": ESCAPES[1], "progress": "lots", **extra},
        {"event": "pull_progress", "tag": BIDI[0], "progress": -1e308, **extra},
        {"event": ESCAPES[0] + "update_failed", "reason": text, "ts": FAR_TIMES[0],
         "device_id": "forged-dev", "type": "availability", FORGED_ROW: ESCAPES[1], **extra},
        {"event": "rolled_back", "reason": HUGE, "request_id": FORGED_ROW,
         "ts": FAR_TIMES[1]},
        {"event": ["update_succeeded"], "tag": {"t": [1, 2, ESCAPES[2]]}, **extra},
        {"event": "container_exited", **{f"k{i}": ESCAPES[0] for i in range(50)}},
    ]
    encoded = [e if isinstance(e, bytes) else json.dumps(e).encode() for e in events]
    encoded += [deep_json(5_000, "event"), b"\xff\xfe\x1b[2J", b"[" * 50_000,
                b'{"event": "pull_progress", "progress": 1e999}',
                b'{"event": "x", "n": ' + b"9" * 5000 + b"}",
                json.dumps({"event": "x"}).encode("utf-16")]
    return encoded
