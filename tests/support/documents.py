"""State documents as the agent publishes them, for tests of everything that reads one
(the answers judge, the bridge, edge-ctl)."""

from __future__ import annotations

from typing import Any


def state(**overrides: Any) -> dict[str, Any]:
    """An agent state document (docs/PROTOCOL.md) with a few fields overridden."""
    doc: dict[str, Any] = {
        "device_id": "dev1",
        "agent_version": "0.1.0",
        "ts": "2024-05-01T12:00:00.000Z",
        "image": "registry/app",
        "desired": {"tag": "2.0", "source": "device", "group": None, "request_id": "r1"},
        "running": {"tag": "2.0", "digest": "sha256:" + "a" * 64, "container_id": "c",
                    "status": "running", "health": None, "started_at": None,
                    "restart_count": 0},
        "fallback": {"active": False, "requested_tag": None, "reason": None},
        "update": {"status": "idle", "progress": None, "last_check_at": None,
                   "last_success_at": None, "last_error": None},
        "installed_version": "2.0",
        "latest_version": "2.0",
        "in_progress": False,
        "update_percentage": None,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def settled_on(tag: str, **overrides: Any) -> dict[str, Any]:
    """An idle state of a device that runs ``tag`` (the agent sets both fields alike)."""
    return state(running={"tag": tag}, installed_version=tag, **overrides)


def fallen_back(status: str = "idle", requested: str = "2.0") -> dict[str, Any]:
    return settled_on("latest", update={"status": status}, fallback={
        "active": True, "requested_tag": requested, "reason": "tag 2.0 not found"})
