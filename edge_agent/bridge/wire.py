"""HTTP/1.1 request heads, parsed strictly (RFC 9112). Pure: bytes in, a ``RequestHead``
or ``BadRequest`` out; the sockets are in ``server``.

Strict where leniency lets two parsers disagree about where a request ends (request
smuggling): Content-Length is digits only and given once, Transfer-Encoding is refused,
lines end in CRLF, no folded lines, no whitespace before a colon, one Host, and no
control characters anywhere. The server closes the connection after any of these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 64
MAX_TARGET_CHARS = 8192
MAX_METHOD_CHARS = 20

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE_RE = re.compile(
    rf"({_TCHAR}{{1,{MAX_METHOD_CHARS}}}) ([\x21-\x7e]{{1,{MAX_TARGET_CHARS}}}) HTTP/(1\.[01])")
_NAME_RE = re.compile(rf"{_TCHAR}+")
_VALUE_RE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no control characters but tab
_DIGITS_RE = re.compile(r"[0-9]{1,15}")
# headers whose repetition is ambiguous: refused rather than guessed
SINGLE = frozenset({"content-length", "transfer-encoding", "host", "authorization",
                    "content-type", "expect"})


class BadRequest(Exception):
    """The request cannot be read safely: answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestHead:
    """A request line and its headers (names in lower case, values trimmed)."""

    method: str
    target: str
    version: str  # "1.1" or "1.0"
    headers: dict[str, str]
    content_length: int
    keep_alive: bool
    expect_continue: bool


def parse_head(head: bytes) -> RequestHead:
    """Parse the bytes before the blank line that ends a request head (no leading empty
    lines, no final CRLF CRLF). Raises BadRequest."""
    if len(head) > MAX_HEAD_BYTES:
        raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise BadRequest(400, "lines must end in CRLF; a bare CR or LF was sent")
    match = _REQUEST_LINE_RE.fullmatch(lines[0].decode("latin-1"))
    if match is None:
        raise BadRequest(400, "malformed request line; expected METHOD /path HTTP/1.1")
    method, target, version = match.groups()
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"more than {MAX_HEADERS} header fields")
    headers = _parse_fields(lines[1:])
    if version == "1.1" and "host" not in headers:
        raise BadRequest(400, "HTTP/1.1 requests need a Host header")
    if "transfer-encoding" in headers:
        raise BadRequest(400, "Transfer-Encoding is not supported; send the body with "
                              "Content-Length")
    length_text = headers.get("content-length")
    if length_text is not None and not _DIGITS_RE.fullmatch(length_text):
        raise BadRequest(400, "Content-Length must be a number in plain digits")
    expect = headers.get("expect")
    if expect is not None and expect.lower() != "100-continue":
        raise BadRequest(417, "the only Expect supported is 100-continue")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return RequestHead(
        method=method,
        target=target,
        version=version,
        headers=headers,
        content_length=int(length_text) if length_text is not None else 0,
        keep_alive=version == "1.1" and "close" not in tokens,
        expect_continue=expect is not None,
    )


def _parse_fields(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("latin-1")
        if line[:1] in (" ", "\t"):
            raise BadRequest(400, "folded header lines are not accepted")
        name, colon, value = line.partition(":")
        if not colon or not _NAME_RE.fullmatch(name):
            raise BadRequest(400, "malformed header line (a name, a colon, no space "
                                  "before it)")
        value = value.strip(" \t")
        if not _VALUE_RE.fullmatch(value):
            raise BadRequest(400, f"control character in the {name[:40]} header")
        key = name.lower()
        if key in headers:
            if key in SINGLE:
                raise BadRequest(400, f"{name[:40]} given more than once")
            headers[key] += ", " + value
        else:
            headers[key] = value
    return headers
