"""Just enough MQTT 3.1.1 on a raw socket to stream a PUBLISH of any size, as a
misbehaving device would, without building it in memory first (paho would). And the
resident memory of a process, from /proc, to see what such a message costs a broker."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


def _varint(number: int) -> bytes:
    """MQTT's Remaining Length encoding."""
    out = bytearray()
    while True:
        digit, number = number % 128, number // 128
        out.append(digit | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


@dataclass(frozen=True)
class Streamed:
    """What happened to a streamed PUBLISH: bytes of payload sent before the broker
    closed the connection, and the broker's answer (a PUBACK is ``b"@\\x02..."``)."""

    sent: int
    answer: bytes
    closed_by_broker: bool


def stream_publish(port: int, user: str, password: str, topic: str, size: int, *,  # noqa: PLR0913
                   retain: bool = True, host: str = "127.0.0.1") -> Streamed:
    """Log in as ``user`` and publish ``size`` bytes (QoS 1) to ``topic`` in 1 MiB
    chunks, stopping when the broker hangs up."""
    with socket.create_connection((host, port), timeout=10) as sock:
        header = _string("MQTT") + bytes([4, 0b11000010]) + struct.pack("!H", 60)
        body = _string(f"raw-{user}") + _string(user) + _string(password)
        sock.sendall(b"\x10" + _varint(len(header) + len(body)) + header + body)
        connack = sock.recv(4)
        if len(connack) < 4 or connack[3] != 0:
            raise ConnectionError(f"the broker refused {user}: CONNACK {connack!r}")
        head = _string(topic) + struct.pack("!H", 1)
        sock.sendall(bytes([0x32 | int(retain)]) + _varint(len(head) + size) + head)
        sent, chunk = 0, b"x" * CHUNK
        try:
            while sent < size:
                part = min(CHUNK, size - sent)
                sock.sendall(chunk[:part])
                sent += part
            answer = sock.recv(16)
            return Streamed(sent, answer, closed_by_broker=not answer)
        except (ConnectionResetError, BrokenPipeError):
            return Streamed(sent, b"", closed_by_broker=True)


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for process {pid}")
