"""Which state documents go over MQTT: a change at once, an unchanged state only as a
heartbeat.

The agent refreshes its state every TELEMETRY_INTERVAL (the status file, the container's
health); sending each refresh over the broker would cost ~1.3 KB on the wire every minute
(docs/BENCHMARKS.md, "Wire cost"). Only ``ts`` moves in an unchanged document, so a
document equal to the last one sent but for ``ts`` waits until HEARTBEAT_INTERVAL has
passed since that send. Liveness does not depend on it: the broker's will says
``offline`` within 1.5 x MQTT_KEEPALIVE of a silent loss.
"""

from __future__ import annotations

import threading
from typing import Any

# the one field that changes in a document that says nothing new
VOLATILE_FIELDS = frozenset({"ts"})


def content_of(document: dict[str, Any]) -> dict[str, Any]:
    """The document without its volatile fields: what a change is judged on."""
    return {key: value for key, value in document.items() if key not in VOLATILE_FIELDS}


class StateGate:
    """Remembers the last state sent on this connection and says whether the next is due."""

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()  # reset() runs on paho's thread, the rest on the agent's
        self._sent: dict[str, Any] | None = None
        self._sent_at = 0.0

    def due(self, document: dict[str, Any], now: float) -> bool:
        """True for the first document of a connection, a changed one, or a heartbeat."""
        with self._lock:
            return (self._sent is None or content_of(document) != self._sent
                    or now - self._sent_at >= self.heartbeat_s)

    def sent(self, document: dict[str, Any], now: float) -> None:
        with self._lock:
            self._sent = content_of(document)
            self._sent_at = now

    def reset(self) -> None:
        """A new connection: the next document is sent whatever it holds (states were
        dropped while disconnected)."""
        with self._lock:
            self._sent = None
