"""Tag grammar and desired-tag payload parsing (pure)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings

from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import (
    MAX_PAYLOAD_BYTES,
    REQUEST_ID_RULE,
    DesiredTag,
    PayloadRejected,
    is_digest,
    is_request_id,
    parse_tag_payload,
    split_image,
    validate_tag,
)
from tests.support.hostile import hostile_payloads

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("tag", ["1.0", "latest", "_x", "v1.2.3-rc.1", "A" * 128, DIGEST])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag


@pytest.mark.parametrize(
    "tag", ["", "../x", "-x", ".x", "a/b", "a b", "A" * 129, "sha256:abc", "tag\n", "é"]
)
def test_invalid_tags(tag: str) -> None:
    with pytest.raises(TagError, match="invalid tag"):
        validate_tag(tag)


def test_is_digest() -> None:
    assert is_digest(DIGEST)
    assert not is_digest("1.0")


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"1.4.2", DesiredTag("1.4.2")),
        (b"  1.4.2\n", DesiredTag("1.4.2")),
        (b"", DesiredTag(None)),
        (b'{"tag": "2.0", "request_id": "r1", "issued_at": "t"}', DesiredTag("2.0", "r1", "t")),
        (b'{"tag": ""}', DesiredTag(None)),
        (b'{"tag": null, "request_id": "r2"}', DesiredTag(None, "r2")),
    ],
)
def test_parse_payload(payload: bytes, expected: DesiredTag) -> None:
    assert parse_tag_payload(payload) == expected


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"../x", "invalid tag"),
        (b"{}", 'no "tag"'),
        (b"[1]", "invalid tag"),
        (b"{\"a\": 1}x", "not valid JSON"),
        (b'{"tag": 5}', "must be a string"),
        (b'{"tag": "1.0", "request_id": 7}', "request_id"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * 5000, "too large"),
        (b'{"tag": ', "not valid JSON"),
    ],
)
def test_parse_payload_rejects(payload: bytes, reason: str) -> None:
    with pytest.raises(TagError, match=reason):
        parse_tag_payload(payload)


def test_split_image() -> None:
    assert split_image("registry:5000/acme/app") == ("registry:5000/acme/app", None)
    assert split_image("registry:5000/acme/app:1.2") == ("registry:5000/acme/app", "1.2")
    assert split_image("app:1.2") == ("app", "1.2")
    with pytest.raises(TagError):
        split_image("app@" + DIGEST)


# -- untrusted payloads: depth, size, encodings, out-of-range values ------------------------
DEEP_4K = b'{"tag": ' + b"[" * 2040 + b"]" * 2040 + b"}"


def test_deeply_nested_payload_is_rejected_not_a_crash() -> None:
    """Finding 2: 4 KB of nesting made the standard decoder raise RecursionError."""
    assert len(DEEP_4K) <= MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadRejected, match="nested 2041 levels deep"):
        parse_tag_payload(DEEP_4K)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xef\xbb\xbf1.0", "invalid tag"),  # UTF-8 BOM: not part of any tag
        ("1.0".encode("utf-16"), "not UTF-8"),  # UTF-16 with BOM
        (b"\xc0\xae\xc0\xae/x", "not UTF-8"),  # overlong "../"
        (b"\xed\xa0\x801.0", "not UTF-8"),  # an encoded surrogate
        (b"1.0\x00", "invalid tag"),
        (b'{"tag": "1.0\\u0000"}', "invalid tag"),
        (b'{"tag": "\\ud800"}', "invalid tag"),
        (b'{"tag": NaN}', "NaN is not a JSON number"),
        (b'{"tag": "1.0", "x": -Infinity}', "Infinity is not a JSON number"),
        (b'{"tag": 1e999}', "must be a string, got a number"),
        pytest.param(b'{"tag": ' + b"9" * 4000 + b"}", "must be a string, got a number",
                     id="4000-digit-int"),
        (b'{"tag": true}', "must be a string, got a boolean"),
        (b'{"tag": ["1.0"]}', "must be a string, got an array"),
        (b'{"tag": {"tag": "1.0"}}', "must be a string, got an object"),
        (b'{"tag": "1.0"} {"tag": "2.0"}', "not valid JSON"),
        pytest.param(b'{"tag": "' + b"a" * 4090 + b'"}', "too large", id="4100-bytes"),
    ],
)
def test_hostile_payloads_are_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(PayloadRejected, match=re.escape(reason)):
        parse_tag_payload(payload)


@pytest.mark.parametrize("request_id", ["r1", "A", "a" * 128, "req-7f3a", "x.y:z_1-2",
                                        "0123456789abcdef0123456789abcdef"])
def test_request_ids_of_the_one_grammar_are_accepted(request_id: str) -> None:
    payload = json.dumps({"tag": "1.0", "request_id": request_id}).encode()
    assert parse_tag_payload(payload) == DesiredTag("1.0", request_id)


@pytest.mark.parametrize("request_id", [
    "", "-r1", ".r1", "r 1", "r1\n", "r1\x1b[2J", "a" * 129, "é", "r\u202e1", "r/1", "r#1",
    "\ud800", 5, 1.5, True, ["r1"], {"id": "r1"},
])
def test_request_ids_outside_the_grammar_reject_the_payload(request_id: object) -> None:
    """Finding 12: the agent took any characters; the bridge takes only the grammar."""
    payload = json.dumps({"tag": "1.0", "request_id": request_id}).encode()
    with pytest.raises(PayloadRejected, match=re.escape(f'"request_id" must be a string '
                                                        f"matching {REQUEST_ID_RULE}")) as info:
        parse_tag_payload(payload)
    assert info.value.request_id is None  # a rejection never answers a malformed id


def test_a_rejection_answers_the_payloads_own_valid_request_id() -> None:
    with pytest.raises(PayloadRejected) as info:
        parse_tag_payload(b'{"tag": "../x", "request_id": "r9"}')
    assert info.value.request_id == "r9"
    with pytest.raises(PayloadRejected) as info:
        parse_tag_payload(b'{"request_id": "r9"}')
    assert info.value.request_id == "r9"


@settings(max_examples=500, deadline=None)
@given(hostile_payloads())
def test_any_payload_parses_or_is_rejected_with_a_reason(payload: bytes) -> None:
    try:
        parsed = parse_tag_payload(payload)
    except PayloadRejected as exc:
        assert str(exc)
        assert exc.request_id is None or is_request_id(exc.request_id)
        return
    assert parsed.tag is None or validate_tag(parsed.tag) == parsed.tag
    assert parsed.request_id is None or is_request_id(parsed.request_id)
