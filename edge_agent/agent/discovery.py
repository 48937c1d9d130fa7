"""Home Assistant MQTT discovery for the managed application (HA_DISCOVERY=true).

One ``update`` entity per device, on the agent's own state topic. Home Assistant's MQTT
update platform accepts only its own keys in a state payload (since 2024.11 it rejects
any other key, so the whole state document would be refused), so the state document
carries Home Assistant's view in a ``home_assistant`` object (``update_payload``) and
the entity's ``value_template`` hands just that object over; the same config works on
releases before and after 2024.11. The entity's attributes are picked out of the state
document by a template; the install button publishes ``install`` to ``cmd/install``.

Home Assistant decides "update available" by itself: ``on`` when ``latest_version``
differs from ``installed_version`` and AwesomeVersion does not read it as older (two
versions it cannot compare count as newer). The agent wants ``on`` whenever installing
would change what runs, downgrades and rebuilt tags included, so ``update_payload``
shows a target that does not read as plainly newer with a marker that no version scheme
(and no Docker tag: tags have no spaces) can parse.
"""

from __future__ import annotations

import re
from typing import Any

from edge_agent import __version__
from edge_agent.agent.config import Settings
from edge_agent.protocol.topics import Topics

DISCOVERY_PREFIX = "homeassistant"
INSTALL_PAYLOAD = "install"
OBJECT_ID = "app"
# Home Assistant's longest release summary
MAX_SUMMARY_CHARS = 255
_NOT_ID = re.compile(r"[^A-Za-z0-9_-]")

#: ``installed_version`` when no container runs (a fresh device): not a possible tag
NOT_INSTALLED = "not installed"
# Why a target is shown with a marker (see ``shown_latest``).
DOWNGRADE = "downgrade"
REBUILT = "new image"
OTHER_TAG = "tag change"

# Dotted numbers with an optional leading "v" (1.4.2, v2, 2024.11.0): the only tags whose
# order the agent states itself. Bounded, as tags are untrusted input.
_NUMERIC = re.compile(r"v?(\d{1,20}(?:\.\d{1,20}){0,9})")

# The state payload Home Assistant gets: only its own keys (``update_payload``).
# ``.get``: a retained state of an older agent has no such object; "{}" is ignored.
VALUE_TEMPLATE = "{{ value_json.get('home_assistant', {}) | tojson }}"

# Attributes shown on the entity: what runs, where the desired tag came from, the update
# machinery and the fallback. Brackets, not dots: ``value_json.update`` would be the
# dict's ``update`` method in Jinja.
_ATTRIBUTES = {
    "running_tag": "['running']['tag']",
    "container_status": "['running']['status']",
    "health": "['running']['health']",
    "restart_count": "['running']['restart_count']",
    "desired_tag": "['desired']['tag']",
    "desired_source": "['desired']['source']",
    "update_status": "['update']['status']",
    "last_check_at": "['update']['last_check_at']",
    "last_success_at": "['update']['last_success_at']",
    "last_error": "['update']['last_error']",
    "error_code": "['update'].get('error_code')",
    "fallback_active": "['fallback']['active']",
    "fallback_requested_tag": "['fallback']['requested_tag']",
    "fallback_reason": "['fallback']['reason']",
    # .get: the state of an agent from before deferrals has no such key
    "deferred": "['update'].get('deferred')",
    "agent_version": "['agent_version']",
}
ATTRIBUTES_TEMPLATE = (
    "{{ {" + ", ".join(f"'{name}': value_json{path}" for name, path in _ATTRIBUTES.items())
    + "} | tojson }}"
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
        "value_template": VALUE_TEMPLATE,
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


def update_payload(  # noqa: PLR0913 - the entity's fields, keyword-only
    installed: str | None, latest: str | None, *, pending: bool, in_progress: bool,
    percentage: float | None, deferred: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Home Assistant's update-entity state: ``installed`` runs, ``latest`` is the target;
    ``pending`` when an update waits for install or is under way. Versions are always
    strings; "update available" shows exactly when ``pending`` or the two differ.
    ``deferred`` (``update.deferred``) becomes the release summary; always a string, as
    Home Assistant refuses a null one and keeps an old one when the key is left out."""
    shown_installed = installed or NOT_INSTALLED
    shown = latest or shown_installed  # no target known yet: nothing to offer
    if pending or shown != shown_installed:
        shown = shown_latest(shown, shown_installed)
    return {
        "installed_version": shown_installed,
        "latest_version": shown,
        "in_progress": in_progress,
        "update_percentage": percentage if in_progress else None,
        "release_summary": deferred_summary(deferred),
    }


def deferred_summary(deferred: dict[str, Any] | None) -> str:
    """The release summary of a deferred update (at most 255 characters, Home
    Assistant's limit); empty when none is deferred."""
    if deferred is None:
        return ""
    until = deferred.get("until")
    when = f"until {until}" if until else "until the app releases its update lock"
    summary = f"Deferred {when} ({deferred.get('reason')}): {deferred.get('detail')}"
    return summary if len(summary) <= MAX_SUMMARY_CHARS else summary[:MAX_SUMMARY_CHARS - 1] + "…"


def shown_latest(latest: str, installed: str) -> str:
    """``latest`` as Home Assistant must see it to offer the update: as it is when it is
    plainly newer (dotted numbers, or nothing installed, which no scheme can compare),
    else with a marker that makes the two incomparable, which Home Assistant shows as
    an available update: "1.0 (downgrade)", "2.0 (new image)", "edge (tag change)"."""
    if latest == installed:
        return f"{latest} ({REBUILT})"
    if installed == NOT_INSTALLED:
        return latest
    order = _compare(latest, installed)
    if order is None:
        return f"{latest} ({OTHER_TAG})"
    if order > 0:
        return latest
    return f"{latest} ({DOWNGRADE if order < 0 else OTHER_TAG})"


def _compare(a: str, b: str) -> int | None:
    """-1, 0 or 1 for two dotted-number tags (1.0 == 1.0.0 == v1.0); None otherwise."""
    ma, mb = _NUMERIC.fullmatch(a), _NUMERIC.fullmatch(b)
    if ma is None or mb is None:
        return None
    na = [int(part) for part in ma[1].split(".")]
    nb = [int(part) for part in mb[1].split(".")]
    width = max(len(na), len(nb))
    na += [0] * (width - len(na))
    nb += [0] * (width - len(nb))
    return (na > nb) - (na < nb)
