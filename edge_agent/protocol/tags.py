"""Tag validation and desired-tag payload parsing.

Shared by the agent and the HTTP bridge so both accept exactly the same tags.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from edge_agent.protocol.errors import TagError
from edge_agent.protocol.safejson import UntrustedJson, loads_object

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_PAYLOAD_BYTES = 4096
# Request ids travel in payloads, logs, HTTP answers and the fleet page: one grammar for
# every program (agent, bridge, edge-ctl), printable and safe in any of those places.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
# a rejected tag is quoted in its error up to this many characters
SHOWN_TAG_CHARS = 40
# The grammar as people read it, for messages.
REQUEST_ID_RULE = REQUEST_ID_PATTERN.strip("^$")
# ``spread``: a fleet-wide change's random per-device delay, at most a day (seconds)
MAX_SPREAD_S = 86400
SPREAD_RULE = f'"spread" must be a number of seconds from 0 to {MAX_SPREAD_S}'


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a Docker tag or a ``sha256:`` digest, else raise TagError."""
    if not isinstance(tag, str):
        raise TagError(f"tag must be a string, got {type(tag).__name__}")
    if TAG_RE.fullmatch(tag) or DIGEST_RE.fullmatch(tag):
        return tag
    shown = tag if len(tag) <= SHOWN_TAG_CHARS else tag[:SHOWN_TAG_CHARS] + "..."
    raise TagError(
        f"invalid tag {shown!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}} or sha256:<64 hex>"
    )


def is_request_id(value: object) -> bool:
    """True when ``value`` is a string that follows the one request-id grammar."""
    return isinstance(value, str) and REQUEST_ID_RE.fullmatch(value) is not None


def new_request_id() -> str:
    """A fresh request id (32 hex digits, within the request-id grammar)."""
    return uuid.uuid4().hex


def is_spread(value: object) -> bool:
    """True when ``value`` is a JSON number of seconds in [0, MAX_SPREAD_S]."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value <= MAX_SPREAD_S)


def desired_tag_payload(tag: str, request_id: str, issued_at: str,
                        spread: float | None = None) -> bytes:
    """The JSON form of a desired-tag message, as operators publish it."""
    body: dict[str, object] = {"tag": tag, "request_id": request_id, "issued_at": issued_at}
    if spread:
        body["spread"] = spread
    return json.dumps(body, separators=(",", ":")).encode()


def command_payload(request_id: str, issued_at: str, *, force: bool = False,
                    spread: float | None = None, reply_to: str | None = None) -> bytes:
    """The JSON body of a command (``cmd/check``, ``cmd/install``) with its request id;
    ``reply_to`` asks for the answer on ``reply/<reply_to>`` (MQTT 3.1.1)."""
    body: dict[str, object] = {"request_id": request_id, "issued_at": issued_at}
    if force:
        body["force"] = True
    if spread:
        body["spread"] = spread
    if reply_to is not None:
        body["reply_to"] = reply_to
    return json.dumps(body, separators=(",", ":")).encode()


def is_digest(tag: str) -> bool:
    """True when ``tag`` pins an image by digest rather than naming a tag."""
    return bool(DIGEST_RE.fullmatch(tag))


@dataclass(frozen=True)
class DesiredTag:
    """One desired-tag message: the tag (None clears) and optional request metadata."""

    tag: str | None
    request_id: str | None = None
    issued_at: str | None = None
    # seconds over which a group or fleet tag's devices spread their updates (0: at once)
    spread: float = 0.0


class PayloadRejected(TagError):
    """A desired-tag payload that changes nothing; ``request_id`` is the payload's own
    request id when it had a valid one (the rejection answers that request, no other)."""

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        super().__init__(reason)
        self.request_id = request_id


def parse_tag_payload(payload: bytes) -> DesiredTag:
    """Parse a desired-tag message body: plain text, JSON object, or empty to clear.

    Never raises anything but PayloadRejected (a TagError), with a reason a human can
    act on: the JSON goes through the bounded decoder, so no size, depth or number
    can make it fail otherwise.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadRejected(f"payload too large ({len(payload)} bytes, limit "
                              f"{MAX_PAYLOAD_BYTES})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise PayloadRejected(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") \
            from None
    if not text:
        return DesiredTag(tag=None)
    if not text.startswith("{"):
        return DesiredTag(tag=_valid_tag(text, None))
    try:
        obj = loads_object(text, max_bytes=MAX_PAYLOAD_BYTES)
    except UntrustedJson as exc:
        raise PayloadRejected(f"JSON payload refused: {exc}") from None
    request_id = obj.get("request_id")
    if request_id is not None and not is_request_id(request_id):
        raise PayloadRejected(f'"request_id" must be a string matching {REQUEST_ID_RULE}')
    issued_at = _optional_str(obj, "issued_at", 64, request_id)
    spread = obj.get("spread", 0)
    if not is_spread(spread):
        raise PayloadRejected(SPREAD_RULE, request_id)
    if "tag" not in obj:
        raise PayloadRejected('JSON payload has no "tag" field', request_id)
    tag = obj["tag"]
    if tag is None or tag == "":
        return DesiredTag(tag=None, request_id=request_id, issued_at=issued_at)
    if not isinstance(tag, str):
        raise PayloadRejected(f'"tag" must be a string, got {_json_type(tag)}', request_id)
    return DesiredTag(tag=_valid_tag(tag, request_id), request_id=request_id,
                      issued_at=issued_at, spread=float(spread))


def _valid_tag(tag: str, request_id: str | None) -> str:
    try:
        return validate_tag(tag)
    except TagError as exc:
        raise PayloadRejected(str(exc), request_id) from None


def _optional_str(
    obj: dict[str, object], key: str, limit: int, request_id: str | None
) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise PayloadRejected(f'"{key}" must be a string of at most {limit} characters',
                              request_id)
    return value


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages ("got a number")."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def split_image(image: str) -> tuple[str, str | None]:
    """Split ``repo[:tag]`` into repository and tag; a registry port is not a tag.

    A digest reference (``repo@sha256:...``) is refused: CONTAINER_IMAGE names a
    repository, and pins belong in the desired tag.
    """
    if "@" in image:
        raise TagError("CONTAINER_IMAGE must not contain a digest; pin with the desired tag")
    last_slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > last_slash:
        repo, tag = image[:colon], image[colon + 1 :]
        return repo, validate_tag(tag)
    return image, None
