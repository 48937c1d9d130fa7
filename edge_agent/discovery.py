"""Home Assistant MQTT discovery for the managed application (HA_DISCOVERY=true).

One ``update`` entity per device. It reads the agent's own state topic, whose JSON
already carries Home Assistant's keys (``installed_version``, ``latest_version``,
``in_progress``, ``update_percentage``), so no templates are needed for them; the
install button publishes ``install`` to ``cmd/install``.
"""

from __future__ import annotations

import re
from typing import Any

from edge_agent import __version__
from edge_agent.config import Settings
from edge_agent.topics import Topics

DISCOVERY_PREFIX = "homeassistant"
INSTALL_PAYLOAD = "install"
OBJECT_ID = "app"
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")

# Extra attributes shown on the entity: where the desired tag came from, and how the
# container and the update machinery are doing.
ATTRIBUTES_TEMPLATE = (
    "{{ {'desired_tag': value_json.desired.tag, 'desired_source': value_json.desired.source, "
    "'container_status': value_json.running.status, 'health': value_json.running.health, "
    "'update_status': value_json.update.status, 'last_error': value_json.update.last_error, "
    "'fallback_active': value_json.fallback.active} | tojson }}"
)


def node_id(device_id: str) -> str:
    """The device id as a discovery topic level (Home Assistant allows [A-Za-z0-9_-])."""
    return _NOT_ID.sub("_", device_id)


def discovery_topic(device_id: str) -> str:
    return f"{DISCOVERY_PREFIX}/update/{node_id(device_id)}/{OBJECT_ID}/config"


def discovery_config(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The retained discovery message: (topic, config)."""
    topics = Topics(settings.topic_prefix)
    device = settings.device_id
    node = node_id(device)
    app = settings.repository.rsplit("/", 1)[-1]
    config: dict[str, Any] = {
        "name": app,
        "unique_id": f"edge-agent-{node}-{OBJECT_ID}",
        "device": {
            "identifiers": [f"edge-agent-{node}"],
            "name": device,
            "manufacturer": "edge-agent",
            "model": settings.repository,
            "sw_version": __version__,
        },
        "origin": {"name": "edge-agent", "sw_version": __version__},
        "title": settings.repository,
        "state_topic": topics.state(device),
        "json_attributes_topic": topics.state(device),
        "json_attributes_template": ATTRIBUTES_TEMPLATE,
        "command_topic": topics.device_install(device),
        "payload_install": INSTALL_PAYLOAD,
        "availability_topic": topics.availability(device),
        "payload_available": "online",
        "payload_not_available": "offline",
        "qos": 1,
        "retain": False,
    }
    return discovery_topic(device), config
