"""Tag grammar and desired-tag payload parsing (pure)."""

from __future__ import annotations

import pytest

from edge_agent.errors import TagError
from edge_agent.tags import DesiredTag, is_digest, parse_tag_payload, split_image, validate_tag

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
