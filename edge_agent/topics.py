"""MQTT topic names of SPEC section 6, in one place for the agent, bridge and CLI."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Device ids and group names: one MQTT topic level in the character set that the shipped
# broker setup accepts for user names (mosquitto/add-device): never a separator, wildcard,
# control character or "..". The agent, the bridge and openapi.json all use this pattern.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
ID_RE = re.compile(ID_PATTERN)


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
        return f"{self.prefix}/devices/{device_id}/reply/{token}"

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

    @property
    def all_replies(self) -> str:
        return f"{self.prefix}/devices/+/reply/#"

    def device_of(self, topic: str) -> str | None:
        """The device id in ``P/devices/<id>/...``, or None for other topics."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if parts[: len(head)] != head or len(parts) < len(head) + 3:
            return None
        if parts[len(head)] != "devices":
            return None
        return parts[len(head) + 1]
