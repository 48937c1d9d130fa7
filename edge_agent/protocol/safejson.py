"""Decoding JSON that someone else wrote: bounded in size and depth, never raising
anything but ``UntrustedJson``.

The standard decoder recurses once per nesting level, so a few kilobytes of ``[[[[``
raise RecursionError, and it accepts ``NaN``/``Infinity`` and integers of thousands of
digits. Every parser of device payloads, operator requests and files in DATA_DIR goes
through ``loads`` so that one rule covers them all.
"""

from __future__ import annotations

import json
from typing import Any

# Deeper than any document of ours (the state document nests three levels).
MAX_DEPTH = 32


class UntrustedJson(ValueError):
    """The bytes are not acceptable JSON; the message says why, in a few words."""


def nesting_depth(text: str) -> int:
    """The deepest ``[``/``{`` nesting in ``text``, ignoring brackets inside strings.
    Linear and without recursion, so it is safe on any input."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise UntrustedJson(f"{name} is not a JSON number")


def loads(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Decode ``data`` (UTF-8 when bytes) or raise UntrustedJson saying why."""
    size = len(data.encode() if isinstance(data, str) else data)
    if size > max_bytes:
        raise UntrustedJson(f"too large ({size} bytes, limit {max_bytes})")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedJson(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    else:
        text = data
    depth = nesting_depth(text)
    if depth > max_depth:
        raise UntrustedJson(f"nested {depth} levels deep (limit {max_depth})")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except UntrustedJson:
        raise
    except json.JSONDecodeError as exc:
        raise UntrustedJson(f"not valid JSON: {exc.msg} (character {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of too many digits
        raise UntrustedJson(f"not acceptable JSON: {exc}") from None


def loads_object(data: bytes | str, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> dict[
        str, Any]:
    """Like ``loads``, for documents that must be a JSON object."""
    value = loads(data, max_bytes=max_bytes, max_depth=max_depth)
    if not isinstance(value, dict):
        raise UntrustedJson(f"expected a JSON object, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"
