"""Unit tests of the bridge's settings (environment only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.bridge.settings import load_bridge_settings
from edge_agent.protocol.errors import ConfigError

BASE = {"MQTT_HOST": "broker.local", "BRIDGE_TOKEN": "a-long-enough-token-123"}


def test_defaults() -> None:
    settings = load_bridge_settings(BASE)
    assert (settings.host, settings.port, settings.max_wait_s) == ("127.0.0.1", 8080, 300.0)
    assert settings.max_client_connections == 32
    assert load_bridge_settings({**BASE, "BRIDGE_CLIENT_CONNECTIONS": "200"}
                                ).max_client_connections == 200
    assert settings.mqtt.host == "broker.local" and settings.mqtt.topic_prefix == "edge"
    assert "a-long-enough-token-123" not in repr(settings)


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("from-a-file-token\n")
    env = {"MQTT_HOST": "b", "BRIDGE_TOKEN_FILE": str(path)}
    assert load_bridge_settings(env).token == "from-a-file-token"


@pytest.mark.parametrize(("env", "names"), [
    ({"MQTT_HOST": "b"}, "BRIDGE_TOKEN"),
    ({"MQTT_HOST": "b", "BRIDGE_TOKEN": "   "}, "BRIDGE_TOKEN"),
    ({"MQTT_HOST": "b", "BRIDGE_TOKEN": "has space"}, "BRIDGE_TOKEN"),
    ({"MQTT_HOST": "b", "BRIDGE_TOKEN": "x", "BRIDGE_TOKEN_FILE": "/f"}, "BRIDGE_TOKEN"),
    ({"MQTT_HOST": "b", "BRIDGE_TOKEN_FILE": "/nonexistent/token"}, "BRIDGE_TOKEN_FILE"),
    ({**BASE, "BRIDGE_PORT": "http"}, "BRIDGE_PORT"),
    ({**BASE, "BRIDGE_PORT": "70000"}, "BRIDGE_PORT"),
    ({**BASE, "BRIDGE_MAX_WAIT": "0"}, "BRIDGE_MAX_WAIT"),
    ({**BASE, "BRIDGE_MAX_WAIT": "nan"}, "BRIDGE_MAX_WAIT"),
    ({**BASE, "BRIDGE_CLIENT_CONNECTIONS": "0"}, "BRIDGE_CLIENT_CONNECTIONS"),
    ({**BASE, "BRIDGE_CLIENT_CONNECTIONS": "513"}, "BRIDGE_CLIENT_CONNECTIONS"),
    ({"BRIDGE_TOKEN": "t"}, "MQTT_HOST"),
    ({**BASE, "MQTT_PORT": "0"}, "MQTT_PORT"),
    ({**BASE, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_bridge_settings(env)
    assert str(info.value).startswith(names + ":")
