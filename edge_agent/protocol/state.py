"""The vocabulary of the state document (``P/devices/<id>/state``): the values its
enumerated fields take. The agent writes them; the bridge, edge-ctl and dashboards
read them (``device_data`` checks a received document against these lists).
"""

from __future__ import annotations

import enum


class Availability(enum.StrEnum):
    """The payload of ``P/devices/<id>/availability`` (retained; the will is offline)."""

    ONLINE = "online"
    OFFLINE = "offline"


class Source(enum.StrEnum):
    """``desired.source``: where the effective desired tag came from, strongest first."""

    DEVICE = "device"
    GROUP = "group"
    FLEET = "fleet"
    FILE = "file"
    IMAGE = "image"
    FALLBACK = "fallback_tag"


class UpdateStatus(enum.StrEnum):
    """``update.status``: where the update machinery is (docs/ARCHITECTURE.md has the
    transitions)."""

    IDLE = "idle"
    CHECKING = "checking"
    AVAILABLE = "available"  # notify mode: an update waits for cmd/install
    DEFERRED = "deferred"  # an update waits for a window, the app's lock or a spread delay
    PULLING = "pulling"
    INSTALLING = "installing"
    VERIFYING = "verifying"
    ROLLING_BACK = "rolling_back"
    ERROR = "error"


class DeferReason(enum.StrEnum):
    """``update.deferred.reason``: what holds a pending update back."""

    WINDOW = "window"  # outside UPDATE_WINDOW
    LOCK = "lock"  # the app holds UPDATE_LOCK_FILE
    SPREAD = "spread"  # a fleet-wide change's random per-device delay
    BROKER = "broker"  # after a reconnect, the broker has not confirmed the desired tags yet


# The statuses in which an update is under way and the container is the updater's.
BUSY = frozenset(
    {UpdateStatus.PULLING, UpdateStatus.INSTALLING, UpdateStatus.VERIFYING,
     UpdateStatus.ROLLING_BACK}
)

# ``running.status``: Docker's container states, and the agent's "missing" (no container)
CONTAINER_STATUSES = frozenset({"created", "restarting", "running", "removing", "paused",
                                "exited", "dead", "missing", "unknown"})
# ``running.health``: Docker's health states (null without a HEALTHCHECK)
HEALTH_STATUSES = frozenset({"starting", "healthy", "unhealthy", "none"})


class AgentUpdateStatus(enum.StrEnum):
    """``agent.status``: where the agent's own update is (docs/SELF-UPDATE.md)."""

    IDLE = "idle"  # runs the desired agent version, or none is set
    UPDATING = "updating"  # a handover is under way
    FAILED = "failed"  # the desired version failed; not retried until it changes
    UNAVAILABLE = "unavailable"  # not in a container (or it cannot see its own): no handover
