"""The fleet page's questions about the device list, as pure functions of device views.

Which statuses a device counts under (``statuses``), whether it matches a filter
(``DeviceFilter``), how the list sorts (``sort_key``) and the fleet's counts
(``summarize``). No locks, no I/O: ``fleet.Fleet`` calls these under its lock on the
views it keeps; device data is untrusted, so every lookup tolerates any shape.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol.events import EventName
from edge_agent.protocol.state import UpdateStatus

# the statuses a filter may ask for; a device counts under several at once
STATUSES = ("online", "offline", "unknown", "updating", "failed", "fallback", "deferred",
            "available")
UPDATING = frozenset({UpdateStatus.CHECKING, UpdateStatus.PULLING, UpdateStatus.INSTALLING,
                      UpdateStatus.VERIFYING, UpdateStatus.ROLLING_BACK})
UPDATING_NOW = UPDATING - {UpdateStatus.CHECKING}  # a routine check is not an update
FAILED_EVENTS = frozenset({EventName.UPDATE_FAILED, EventName.ROLLED_BACK})
SORT_FIELDS = ("id", "availability", "running", "desired", "update", "last_seen", "group")
MAX_VERSIONS_SHOWN = 20  # the rest of the distribution counts as "other"
NO_VERSION = "(none)"
OTHER_VERSIONS = "(other)"
MAX_QUERY_CHARS = 128


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def running_tag(view: dict[str, Any]) -> str:
    """The tag a device runs, as its state says; "" when unknown."""
    state = view.get("state")
    return _text(_get(state, "running", "tag")) or _text(_get(state, "installed_version"))


def groups(view: dict[str, Any]) -> list[str]:
    value = _get(view, "state", "groups")
    return [g for g in value if isinstance(g, str)] if isinstance(value, list) else []


def statuses(view: dict[str, Any]) -> set[str]:
    """Every status the device counts under (``STATUSES``)."""
    out = {view.get("availability") if view.get("availability") in ("online", "offline")
           else "unknown"}
    update = _get(view, "state", "update")
    status = _get(update, "status")
    if status in UPDATING_NOW:
        out.add("updating")
    if status == UpdateStatus.ERROR or _get(view, "last_event", "event") in FAILED_EVENTS:
        out.add("failed")
    if _get(view, "state", "fallback", "active") is True:
        out.add("fallback")
    if status == UpdateStatus.DEFERRED:
        out.add("deferred")
    if status == UpdateStatus.AVAILABLE:
        out.add("available")
    return {s for s in out if isinstance(s, str)}


@dataclass(frozen=True)
class DeviceFilter:
    """``?q=&group=&tag=&status=``: all given ones must match; ``q`` is a case-insensitive
    substring of the id, image, running or desired tag, or a group."""

    q: str = ""
    group: str = ""
    tag: str = ""
    status: str = ""

    @property
    def empty(self) -> bool:
        return not (self.q or self.group or self.tag or self.status)

    def matches(self, view: dict[str, Any]) -> bool:
        if self.group and self.group not in groups(view):
            return False
        if self.tag and running_tag(view) != self.tag:
            return False
        if self.status and self.status not in statuses(view):
            return False
        if self.q:
            needle = self.q.lower()
            state = view.get("state")
            haystack = [_text(view.get("id")), _text(_get(state, "image")), running_tag(view),
                        _text(_get(state, "desired", "tag")), *groups(view)]
            return any(needle in h.lower() for h in haystack)
        return True


def sort_key(field: str, view: dict[str, Any]) -> tuple[str, str]:
    """A key for ``field`` (one of ``SORT_FIELDS``); ties break on the id."""
    state = view.get("state")
    value = ""
    if field in ("availability", "last_seen"):
        value = _text(view.get(field))
    elif field == "running":
        value = _version_key(running_tag(view))
    elif field == "desired":
        value = _version_key(_text(_get(state, "desired", "tag")))
    elif field == "update":
        value = _text(_get(state, "update", "status"))
    elif field == "group":
        value = ",".join(groups(view))
    return value, _text(view.get("id"))


def _version_key(tag: str) -> str:
    # 1.10 after 1.9: runs of digits padded so that they compare as numbers
    return re.sub(r"[0-9]+", lambda m: m.group(0).rjust(12, "0"), tag)


class Tally:
    """The fleet's counts, kept up to date one device at a time: what each device counts
    under is remembered, so a change costs the same whatever the fleet's size."""

    def __init__(self) -> None:
        self._each: dict[str, tuple[frozenset[str], str]] = {}
        self._statuses: Counter[str] = Counter()
        self._versions: Counter[str] = Counter()

    def update(self, device_id: str, view: dict[str, Any] | None) -> None:
        """``device_id`` now shows ``view`` (None: it is gone)."""
        old = self._each.pop(device_id, None)
        if old is not None:
            self._statuses.subtract(old[0])
            self._versions[old[1]] -= 1
            if not self._versions[old[1]]:
                del self._versions[old[1]]
        if view is not None:
            new = (frozenset(statuses(view)), running_tag(view) or NO_VERSION)
            self._each[device_id] = new
            self._statuses.update(new[0])
            self._versions[new[1]] += 1

    def summary(self) -> dict[str, Any]:
        """Devices per status and per running version (the ``MAX_VERSIONS_SHOWN`` with the
        most devices, the rest as "(other)")."""
        # the most devices first, ties by tag: the same order however the counts came about
        shown = sorted(self._versions.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_VERSIONS_SHOWN]
        rest = len(self._each) - sum(n for _, n in shown)
        distribution = [{"tag": tag, "devices": n} for tag, n in shown]
        if rest:
            distribution.append({"tag": OTHER_VERSIONS, "devices": rest})
        return {"devices": len(self._each),
                "counts": {status: self._statuses[status] for status in STATUSES},
                "versions": distribution}


def summarize(views: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts of a list of views (``Tally`` over them)."""
    tally = Tally()
    for index, view in enumerate(views):
        tally.update(str(index), view)
    return tally.summary()
