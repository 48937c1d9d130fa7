"""Hypothesis strategies for untrusted payloads: what a hostile or broken publisher sends.

``hostile_payloads()`` mixes random bytes with the shapes that break parsers: deep
nesting (arrays and objects, up to far beyond any limit), sizes around and over a limit,
other encodings (UTF-16 with BOM, overlong UTF-8, encoded surrogates, NUL, a UTF-8 BOM),
out-of-range values (huge integers, 1e999, NaN/Infinity literals) and JSON objects whose
known fields hold any JSON type. ``json_values`` is any decoded JSON value.

``RecordsWithTracebacks`` is a log handler for fuzz tests of code that must never raise
but logs what it caught: any record with a traceback is a bug found.
"""

from __future__ import annotations

import json
import logging

from hypothesis import strategies as st

from edge_agent.tags import REQUEST_ID_RE

__all__ = ["RecordsWithTracebacks", "hostile_payloads", "json_values", "nested",
           "request_ids"]

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
