"""The retained desired tags as the bridge sees them (``P/fleet/tag``,
``P/groups/+/tag``, ``P/devices/+/tag``): fed from the MQTT thread (through the
bridge's ``Fleet``, which shows with each device the group or fleet tag its own tag
shadows), read by the rollout controller to know a device's override before the rollout
(for ``on_halt`` = revert) and whether clearing an override at the end would change the
device's effective tag. The one place the bridge parses desired tags.
"""

from __future__ import annotations

import threading

from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import parse_tag_payload
from edge_agent.protocol.topics import ID_RE, Topics
from edge_agent.rollout.plan import DesiredView, RetainedTag

MAX_ENTRIES = 20_000


class DesiredTags:
    """The last retained tag of each scope; an unreadable payload counts as no tag."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self._lock = threading.Lock()
        self._devices: dict[str, RetainedTag] = {}
        self._groups: dict[str, RetainedTag] = {}
        self._fleet: RetainedTag | None = None

    @property
    def subscriptions(self) -> list[str]:
        prefix = self.topics.prefix
        return [self.topics.fleet_tag, f"{prefix}/groups/+/tag", f"{prefix}/devices/+/tag"]

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> bool:
        """Take the message if it is a desired tag; True when it was one."""
        parts = topic.split("/")
        head = self.topics.prefix.split("/")
        rest = parts[len(head):]
        if parts[: len(head)] != head or not rest or rest[-1] != "tag":
            return False
        try:
            parsed = parse_tag_payload(payload)
            value = None if parsed.tag is None else RetainedTag(parsed.tag, parsed.request_id)
        except TagError:
            value = None
        with self._lock:
            if rest == ["fleet", "tag"]:
                self._fleet = value
            elif len(rest) == 3 and rest[0] in ("groups", "devices") and ID_RE.fullmatch(rest[1]):  # noqa: PLR2004
                table = self._groups if rest[0] == "groups" else self._devices
                if value is None:
                    table.pop(rest[1], None)
                elif rest[1] in table or len(table) < MAX_ENTRIES:
                    table[rest[1]] = value
            else:
                return False
        return True

    def scope_tags(self) -> tuple[dict[str, str], str | None]:
        """The group tags by group, and the fleet tag (for ``precedence.shadowed``)."""
        with self._lock:
            fleet = self._fleet.tag if self._fleet is not None else None
            return {group: value.tag for group, value in self._groups.items()}, fleet

    def view(self) -> DesiredView:
        with self._lock:
            return DesiredView(dict(self._devices), dict(self._groups), self._fleet)
