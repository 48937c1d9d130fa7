"""The bounded JSON decoder: pure, no I/O."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.safejson import UntrustedJson, loads, loads_object, nesting_depth


def test_deep_nesting_is_refused_without_recursion() -> None:
    payload = b'{"tag": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(UntrustedJson, match="nested 100001 levels deep"):
        loads(payload, max_bytes=1 << 20)


def test_brackets_inside_strings_do_not_count() -> None:
    assert nesting_depth('{"a": "[[[[{{{{\\"[["}') == 1
    assert loads('{"a": "[[[["}', max_bytes=100, max_depth=1) == {"a": "[[[["}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * 101, "too large (101 bytes, limit 100)"),
        (b"\xff", "not UTF-8"),
        (b"{", "not valid JSON"),
        (b"NaN", "NaN is not a JSON number"),
        (b"[Infinity]", "Infinity is not a JSON number"),
        (b"9" * 99, None),
    ],
)
def test_refusals_say_why(payload: bytes, reason: str | None) -> None:
    if reason is None:  # a long integer within the size limit is fine
        assert loads(payload, max_bytes=100) == int(payload)
        return
    with pytest.raises(UntrustedJson, match=reason.replace("(", r"\(").replace(")", r"\)")):
        loads(payload, max_bytes=100)


def test_huge_integers_are_refused() -> None:
    with pytest.raises(UntrustedJson, match="not acceptable JSON"):
        loads(b"1" * 5000, max_bytes=10_000)


def test_object_required() -> None:
    assert loads_object(b'{"a": 1}', max_bytes=100) == {"a": 1}
    with pytest.raises(UntrustedJson, match="expected a JSON object, got an array"):
        loads_object(b"[1]", max_bytes=100)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_untrusted_json(data: bytes) -> None:
    with contextlib.suppress(UntrustedJson):
        loads(data, max_bytes=200, max_depth=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False,
                                                                     allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=20,
)


@given(json_values)
def test_what_json_writes_reads_back(value: object) -> None:
    text = json.dumps(value)
    assert loads(text, max_bytes=len(text.encode())) == value
