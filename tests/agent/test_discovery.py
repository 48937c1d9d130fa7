"""Home Assistant MQTT discovery (HA_DISCOVERY=true): the config message and the state
Home Assistant is given, as pure functions. What a real Home Assistant makes of them
(each release the stack installs, with a real agent and broker) is
tests/test_home_assistant.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.config import load_settings
from edge_agent.agent.discovery import (
    ATTRIBUTES_TEMPLATE,
    NOT_INSTALLED,
    VALUE_TEMPLATE,
    discovery_config,
    discovery_topic,
    node_id,
    shown_latest,
    update_payload,
)
from edge_agent.agent.reconcile import Desired
from edge_agent.agent.status import FallbackView, RunningView, Status
from edge_agent.protocol.state import Source, UpdateStatus
from edge_agent.protocol.tags import DIGEST_RE, TAG_RE
from edge_agent.protocol.topics import Topics

# Home Assistant's own rule for the node and object ids of a discovery topic.
HA_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
# The only keys the MQTT update platform accepts in a state payload (2024.11 and later).
HA_UPDATE_KEYS = {"installed_version", "latest_version", "title", "release_summary",
                  "release_url", "entity_picture", "in_progress", "update_percentage"}


def settings_for(device_id: str, **extra: str) -> Any:
    return load_settings({"CONTAINER_IMAGE": "registry.example.com/acme/app:1.0",
                          "DEVICE_ID": device_id, "DATA_DIR": "/nonexistent",
                          "MQTT_HOST": "broker", "MQTT_TOPIC_PREFIX": "fleet1",
                          "HA_DISCOVERY": "true", **extra})


def test_discovery_config_describes_an_update_entity_on_the_agents_topics() -> None:
    topic, config = discovery_config(settings_for("pump-7"))
    topics = Topics("fleet1")
    assert topic == "homeassistant/update/pump-7/app/config"
    assert config["state_topic"] == topics.state("pump-7")
    assert config["json_attributes_topic"] == topics.state("pump-7")
    assert config["command_topic"] == topics.device_install("pump-7")
    assert config["availability_topic"] == topics.availability("pump-7")
    assert (config["payload_available"], config["payload_not_available"]) == ("online", "offline")
    assert config["payload_install"] == "install"
    assert config["unique_id"] == "edge-agent-pump-7-app"
    assert config["device"]["identifiers"] == ["edge-agent-pump-7"]
    assert config["device"]["name"] == "pump-7"
    assert config["title"] == "registry.example.com/acme/app"
    # the state document has more keys than Home Assistant accepts: a template hands
    # over only its own object
    assert config["value_template"] == VALUE_TEMPLATE
    assert "home_assistant" in VALUE_TEMPLATE
    json.dumps(config)  # it is sent as JSON


def test_attribute_template_never_reaches_a_dict_method() -> None:
    """``value_json.update`` is the dict's ``update`` method in Jinja, not our key: every
    key is looked up with brackets."""
    assert ".update" not in ATTRIBUTES_TEMPLATE
    assert not re.search(r"value_json\.", ATTRIBUTES_TEMPLATE)
    for key in ("running_tag", "health", "last_check_at", "fallback_active", "update_status"):
        assert f"'{key}'" in ATTRIBUTES_TEMPLATE


def test_device_ids_become_valid_discovery_ids() -> None:
    for device_id in ("pump-7", "pump.7", "a b", "x:y", "ünï"):
        node = node_id(device_id)
        assert HA_ID.match(node), node
        assert discovery_topic(device_id).split("/")[2] == node
    assert node_id("pump.7") == "pump_7"  # what mosquitto/add-device allows in the ACL


# -- what Home Assistant is given --------------------------------------------------------
@pytest.mark.parametrize(("installed", "target", "pending", "shown"), [
    ("1.0", "1.0", False, ("1.0", "1.0")),                      # current: off
    ("1.0", None, False, ("1.0", "1.0")),                       # nothing known yet: off
    (None, None, False, (NOT_INSTALLED, NOT_INSTALLED)),        # nothing at all: off
    (None, "2.0", True, (NOT_INSTALLED, "2.0")),                # a fresh device: on
    ("1.0", "2.0", True, ("1.0", "2.0")),                       # an upgrade as it is
    ("1.9", "1.10", True, ("1.9", "1.10")),                     # numbers, not text
    ("v1.2", "v1.3", True, ("v1.2", "v1.3")),
    ("2.0", "1.0", True, ("2.0", "1.0 (downgrade)")),           # would read as "up to date"
    ("2.0", "2.0", True, ("2.0", "2.0 (new image)")),           # same tag, rebuilt image
    ("latest", "1.0", True, ("latest", "1.0 (tag change)")),    # words and numbers
    ("1.0", "1.0.0", True, ("1.0", "1.0.0 (tag change)")),      # the same number
    ("edge-1", "edge-2", True, ("edge-1", "edge-2 (tag change)")),
    ("2.0", "1.0", False, ("2.0", "1.0 (downgrade)")),          # differs while idle: on
])
def test_home_assistant_is_offered_the_update_whenever_installing_changes_something(
    installed: str | None, target: str | None, pending: bool, shown: tuple[str, str],
) -> None:
    payload = update_payload(installed, target, pending=pending, in_progress=False,
                             percentage=None)
    assert (payload["installed_version"], payload["latest_version"]) == shown
    assert payload["in_progress"] is False and payload["update_percentage"] is None


def test_progress_is_shown_only_while_an_update_runs() -> None:
    running = update_payload("1.0", "2.0", pending=True, in_progress=True, percentage=42.5)
    assert (running["in_progress"], running["update_percentage"]) == (True, 42.5)
    idle = update_payload("1.0", "2.0", pending=True, in_progress=False, percentage=42.5)
    assert (idle["in_progress"], idle["update_percentage"]) == (False, None)


TAGS = st.one_of(
    st.from_regex(TAG_RE, fullmatch=True),
    st.from_regex(DIGEST_RE, fullmatch=True),
    st.from_regex(r"v?\d{1,25}(\.\d{1,25}){0,12}", fullmatch=True),  # past the parser's bounds
)


@given(installed=st.none() | TAGS, target=st.none() | TAGS, pending=st.booleans(),
       in_progress=st.booleans(),
       percentage=st.none() | st.floats(min_value=0, max_value=100))
def test_update_payload_keeps_home_assistants_rules_for_any_tags(
    installed: str | None, target: str | None, pending: bool, in_progress: bool,
    percentage: float | None,
) -> None:
    payload = update_payload(installed, target, pending=pending, in_progress=in_progress,
                             percentage=percentage)
    assert set(payload) <= HA_UPDATE_KEYS
    assert isinstance(payload["installed_version"], str)
    assert isinstance(payload["latest_version"], str)
    assert isinstance(payload["in_progress"], bool)
    differs = target is not None and target != (installed or NOT_INSTALLED)
    # equal strings are Home Assistant's "up to date"; different ones an update (the
    # version order is Home Assistant's: tests/test_home_assistant.py holds it)
    assert (payload["latest_version"] != payload["installed_version"]) == (pending or differs)
    if payload["latest_version"] != (target or payload["installed_version"]):
        assert " (" in payload["latest_version"]  # marked: no version scheme parses it
    json.dumps(payload, allow_nan=False)


def test_shown_latest_of_huge_numbers_is_cheap_and_marked() -> None:
    huge = ".".join(["9" * 25] * 5)
    assert shown_latest(huge, "1.0") == f"{huge} (tag change)"  # past the bounds: not ordered
    assert shown_latest("1." + "0" * 19 + "1", "1.0") == "1." + "0" * 19 + "1"


def status_with(update: UpdateStatus, running: str | None, desired: str,
                latest: str | None = None, **extra: Any) -> dict[str, Any]:
    state = Status(device_id="d", image="repo")
    state.desired = Desired(desired, Source.DEVICE)
    state.running = RunningView(tag=running, status="running" if running else "missing")
    state.update_status = update
    state.latest_version = latest
    for key, value in extra.items():
        setattr(state, key, value)
    document: dict[str, Any] = state.document()
    return document


@pytest.mark.parametrize("status", list(UpdateStatus))
def test_state_carries_home_assistants_update_keys(status: UpdateStatus) -> None:
    document = status_with(status, "1.0", "2.0",
                           progress=40.0 if status is UpdateStatus.PULLING else None)
    # the plain tags, for operators and the bridge
    assert document["installed_version"] == "1.0"
    assert document["latest_version"] == "2.0"
    assert isinstance(document["in_progress"], bool)
    percentage = document["update_percentage"]
    assert percentage is None or (document["in_progress"] and 0 <= percentage <= 100)
    # Home Assistant's view
    ha = document["home_assistant"]
    assert set(ha) <= HA_UPDATE_KEYS
    assert (ha["installed_version"], ha["latest_version"]) == ("1.0", "2.0")
    assert (ha["in_progress"], ha["update_percentage"]) == (document["in_progress"], percentage)
    if status is UpdateStatus.PULLING:
        assert (ha["in_progress"], ha["update_percentage"]) == (True, 40.0)


def test_a_fresh_device_offers_its_first_install_with_string_versions() -> None:
    document = status_with(UpdateStatus.AVAILABLE, None, "1.0", latest="1.0")
    assert document["installed_version"] is None  # the plain view says "nothing"
    assert document["home_assistant"]["installed_version"] == NOT_INSTALLED
    assert document["home_assistant"]["latest_version"] == "1.0"


def test_a_waiting_downgrade_is_offered_not_shown_as_up_to_date() -> None:
    document = status_with(UpdateStatus.AVAILABLE, "2.0", "1.0", latest="1.0")
    assert document["home_assistant"]["latest_version"] == "1.0 (downgrade)"


def test_fallback_shows_current_unless_an_update_waits() -> None:
    fallback = FallbackView(True, "9.9", "tag 9.9 not found in registry (manifest unknown)")
    idle = status_with(UpdateStatus.IDLE, "latest", "9.9", latest="latest", fallback=fallback)
    assert idle["home_assistant"]["installed_version"] == "latest"
    assert idle["home_assistant"]["latest_version"] == "latest"
    # notify mode: the fallback tag waits for the button; it must be offered
    waiting = status_with(UpdateStatus.AVAILABLE, "1.0", "9.9", latest="latest",
                          fallback=fallback)
    assert waiting["latest_version"] == "1.0"  # the plain view is unchanged
    assert waiting["home_assistant"]["latest_version"] == "latest (tag change)"
