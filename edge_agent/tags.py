"""Tag validation and desired-tag payload parsing.

Shared by the agent and the HTTP bridge so both accept exactly the same tags.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from edge_agent.errors import TagError

TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
MAX_PAYLOAD_BYTES = 4096
# Request ids travel in payloads, logs, HTTP answers and the fleet page: one grammar for
# every program (agent, bridge, edge-ctl), printable and safe in any of those places.
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
REQUEST_ID_RE = re.compile(REQUEST_ID_PATTERN)
MAX_REQUEST_ID_CHARS = 128


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it is a Docker tag or a ``sha256:`` digest, else raise TagError."""
    if not isinstance(tag, str):
        raise TagError(f"tag must be a string, got {type(tag).__name__}")
    if TAG_RE.fullmatch(tag) or DIGEST_RE.fullmatch(tag):
        return tag
    shown = tag if len(tag) <= 40 else tag[:40] + "..."
    raise TagError(
        f"invalid tag {shown!r}: expected [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}} or sha256:<64 hex>"
    )


def is_request_id(value: object) -> bool:
    """True when ``value`` is a string that follows the one request-id grammar."""
    return isinstance(value, str) and REQUEST_ID_RE.fullmatch(value) is not None


def is_digest(tag: str) -> bool:
    """True when ``tag`` pins an image by digest rather than naming a tag."""
    return bool(DIGEST_RE.fullmatch(tag))


@dataclass(frozen=True)
class DesiredTag:
    """One desired-tag message: the tag (None clears) and optional request metadata."""

    tag: str | None
    request_id: str | None = None
    issued_at: str | None = None


def parse_tag_payload(payload: bytes) -> DesiredTag:
    """Parse a desired-tag message body: plain text, JSON object, or empty to clear.

    Raises TagError with a reason a human can act on.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise TagError(f"payload too large ({len(payload)} bytes, limit {MAX_PAYLOAD_BYTES})")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise TagError(f"payload is not UTF-8: {exc.reason} at byte {exc.start}") from None
    if not text:
        return DesiredTag(tag=None)
    if not text.startswith("{"):
        return DesiredTag(tag=validate_tag(text))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TagError(f"payload is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise TagError("JSON payload must be an object")
    request_id = _optional_str(obj, "request_id", MAX_REQUEST_ID_CHARS)
    issued_at = _optional_str(obj, "issued_at", 64)
    if "tag" not in obj:
        raise TagError('JSON payload has no "tag" field')
    tag = obj["tag"]
    if tag is None or tag == "":
        return DesiredTag(tag=None, request_id=request_id, issued_at=issued_at)
    if not isinstance(tag, str):
        raise TagError(f'"tag" must be a string, got {type(tag).__name__}')
    return DesiredTag(tag=validate_tag(tag), request_id=request_id, issued_at=issued_at)


def _optional_str(obj: dict[str, object], key: str, limit: int) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise TagError(f'"{key}" must be a string of at most {limit} characters')
    return value


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
