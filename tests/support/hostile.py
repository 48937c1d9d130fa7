"""What a hostile device publishes, for tests of every surface that shows device data
(edge-ctl, the bridge, the fleet page, soak benches).

A compromised device may write anything to its own topics (the broker's ACL stops it at
the others): JSON nested thousands of levels deep, terminal escapes that clear the
screen or set the window title, CR/LF that forge table rows, bidi overrides and
zero-width characters that make text read differently than it is, numbers out of every
range, timestamps at the ends of time, wrong types everywhere.

For fuzzing: ``hostile_payloads()`` mixes random bytes with the shapes that break
parsers: deep nesting (arrays and objects, up to far beyond any limit), sizes around and
over a limit, other encodings (UTF-16 with BOM, overlong UTF-8, encoded surrogates, NUL,
a UTF-8 BOM), out-of-range values (huge integers, 1e999, NaN/Infinity literals) and JSON
objects whose known fields hold any JSON type. ``json_values`` is any decoded JSON value.
``RecordsWithTracebacks`` is a log handler for fuzz tests of code that must never raise
but logs what it caught: any record with a traceback is a bug found.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hypothesis import strategies as st

from edge_agent.protocol.tags import REQUEST_ID_RE

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
    return nested(depth, "[", key)


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


# -- hypothesis strategies --------------------------------------------------
json_leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
               | st.sampled_from(["1.0", "latest", "sha256:" + "a" * 64, "../x", ""]))
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=12,
)
#: valid request ids, and strings and values that are not
request_ids = st.one_of(st.from_regex(REQUEST_ID_RE), st.text(max_size=140), json_values)

# Byte sequences no UTF-8 decoder may accept, and characters that are not text.
ENCODING_TRAPS = [
    b"\xc0\xae\xc0\xae/",  # overlong "../"
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xff\xfe",  # a UTF-16 BOM
    b"\xef\xbb\xbf",  # a UTF-8 BOM
    b"\x00",
    b"\x1b[2J",  # a terminal escape
]


def nested(depth: int, opener: str, key: str = "tag") -> bytes:
    """``{"<key>": [[[...1...]]]}`` (or ``{"a": {"a": ...}}``) nested ``depth`` levels."""
    if opener == "[":
        inner = b"[" * depth + b"1" + b"]" * depth
    else:
        inner = b'{"a": ' * depth + b"1" + b"}" * depth
    return b'{"' + key.encode() + b'": ' + inner + b"}"


def _json_object(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, allow_nan=True).encode()


def hostile_payloads(limit: int = 4096, key: str = "tag") -> st.SearchStrategy[bytes]:
    """Payloads for a parser that takes at most ``limit`` bytes of a JSON object whose
    main field is ``key``."""
    objects = st.fixed_dictionaries(
        {}, optional={key: json_values, "request_id": request_ids, "issued_at": json_values,
                      "x": json_values})
    return st.one_of(
        st.binary(max_size=limit + 200),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.text(max_size=100).map(lambda t: t.encode("utf-16")),
        st.lists(st.sampled_from(ENCODING_TRAPS) | st.binary(max_size=8), max_size=6)
        .map(b"1.0".join),
        objects.map(_json_object),
        objects.map(lambda d: "\ufeff".encode() + _json_object(d)),
        st.builds(nested, st.integers(0, limit), st.sampled_from(["[", "{"]), st.just(key)),
        st.integers(limit - 200, limit + 200)
        .map(lambda n: b'{"' + key.encode() + b'": "' + b"a" * n + b'"}'),
        st.integers(1, limit + 100)
        .map(lambda n: b'{"' + key.encode() + b'": ' + b"7" * n + b"}"),
        st.sampled_from([b"NaN", b"-Infinity", b"1e999", b"-0", b"{}", b"[]", b"null", b'""',
                         b'{"' + key.encode() + b'": NaN}', b"{" * 50_000, b"[" * 50_000,
                         b"x" * (1 << 20)]),
    )


class RecordsWithTracebacks(logging.Handler):
    """Keeps the log records that carry a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)
