"""MQTT topic names (docs/PROTOCOL.md, section 3): one place for all three programs."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Device ids and group names: one MQTT topic level in the character set that the shipped
# broker setup accepts for user names (mosquitto/add-device): never a separator, wildcard,
# control character or "..". The agent, the bridge and openapi.json all use this pattern.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ID_RE = re.compile(ID_PATTERN)
# One level below a device's reply/ subtree: not empty, no wildcard or separator, no
# control character (C0, DEL, C1), not "." or ".." (nothing may read it as a path).
_REPLY_LEVEL_RE = re.compile(r"[^\x00-\x1f\x7f-\x9f/+#]+")
MAX_TOPIC_BYTES = 65535


@dataclass(frozen=True)
class Topics:
    """Topic names under ``prefix``; device topics need ``device_id``."""

    prefix: str

    # desired state (retained)
    @property
    def fleet_tag(self) -> str:
        return f"{self.prefix}/fleet/tag"

    def group_tag(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/tag"

    def device_tag(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/tag"

    # desired agent version (retained): the agent image tag this device's agent runs
    @property
    def fleet_agent(self) -> str:
        return f"{self.prefix}/fleet/agent"

    def group_agent(self, group: str) -> str:
        return f"{self.prefix}/groups/{group}/agent"

    def device_agent(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/agent"

    # commands (not retained)
    @property
    def fleet_check(self) -> str:
        return f"{self.prefix}/fleet/cmd/check"

    def device_check(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/cmd/check"

    def device_install(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/cmd/install"

    # written by the agent
    def availability(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/availability"

    def state(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/state"

    def events(self, device_id: str) -> str:
        return f"{self.prefix}/devices/{device_id}/events"

    def reply(self, device_id: str, token: str) -> str:
        """A Response Topic for an MQTT 5 request to ``device_id``; the shipped ACL lets a
        device write below its own ``reply/`` only, so requesters should use this."""
        return f"{self.reply_root(device_id)}{token}"

    def reply_root(self, device_id: str) -> str:
        """``P/devices/<id>/reply/``: the only place ``device_id`` answers requests."""
        return f"{self.prefix}/devices/{device_id}/reply/"

    def is_reply_topic(self, device_id: str, topic: object) -> bool:
        """True when ``topic`` is a topic name below the reply subtree of ``device_id``.
        Anything else (its own state, availability or discovery topic, another device's
        topics, wildcards) must never receive a reply: a request names the topic."""
        if not isinstance(topic, str):
            return False
        try:
            size = len(topic.encode())
        except UnicodeEncodeError:  # lone surrogates: not a topic a broker accepts
            return False
        root = self.reply_root(device_id)
        if size > MAX_TOPIC_BYTES or not topic.startswith(root):
            return False
        levels = topic[len(root):].split("/")
        return all(_REPLY_LEVEL_RE.fullmatch(level) and level not in (".", "..")
                   for level in levels)

    # wildcards for observers (bridge, edge-ctl)
    @property
    def all_states(self) -> str:
        return f"{self.prefix}/devices/+/state"

    @property
    def all_availability(self) -> str:
        return f"{self.prefix}/devices/+/availability"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}/devices/+/events"

    def device_of(self, topic: str) -> str | None:
        """The device id in ``P/devices/<id>/...``, or None for other topics."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head or len(parts) < len(head) + 3:
            return None
        if parts[len(head)] != "devices":
            return None
        return parts[len(head) + 1]
