"""Events as published: stamped, and no text field longer than the wire allows."""

from __future__ import annotations

from edge_agent.protocol.events import MAX_TEXT_CHARS, EventName, event_body
from edge_agent.protocol.timestamps import parse_utc


def test_an_event_is_stamped_and_names_its_request() -> None:
    body = event_body(EventName.ROLLED_BACK, "dev1", "r1", tag="2.0", restored=True)
    assert body["event"] == "rolled_back" and body["device_id"] == "dev1"
    assert body["request_id"] == "r1" and body["restored"] is True
    assert parse_utc(body["ts"]) is not None
    assert "request_id" not in event_body(EventName.FALLBACK, "dev1", None)


def test_long_texts_are_cut() -> None:
    """Docker's error texts can be of any length; a message must stay far below the
    broker's packet limit."""
    body = event_body(EventName.UPDATE_FAILED, "dev1", None, error="x" * 100_000, code=7)
    assert len(body["error"]) == MAX_TEXT_CHARS and body["error"].endswith("…")
    assert body["code"] == 7
