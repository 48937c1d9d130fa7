"""Settings from environment and YAML (pure apart from temp files)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.agent.config import SETTINGS, load_settings
from edge_agent.protocol.errors import ConfigError


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"CONTAINER_IMAGE": "reg.example.com/acme/app", "DATA_DIR": str(tmp_path), **extra}


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, DEVICE_ID="dev1"))
    assert settings.repository == "reg.example.com/acme/app"
    assert settings.image_tag is None
    assert settings.poll_interval_s == 30 * 60
    assert settings.container_name == "edge-app"
    assert settings.fallback_tag == "latest"
    assert settings.update_mode == "auto"
    assert settings.health_timeout_s == 60
    assert settings.mqtt is None
    assert settings.topic_prefix == "edge"


def test_poll_interval_is_float_minutes(tmp_path: Path) -> None:
    assert load_settings(env(tmp_path, POLL_INTERVAL="0.05")).poll_interval_s == pytest.approx(3)


def test_image_tag_and_empty_fallback(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, CONTAINER_IMAGE="r:5000/app:1.2", FALLBACK_TAG=""))
    assert (settings.repository, settings.image_tag, settings.fallback_tag) == ("r:5000/app", "1.2", None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("POLL_INTERVAL", "soon"),
        ("POLL_INTERVAL", "-1"),
        ("POLL_INTERVAL", "nan"),
        ("HEALTH_TIMEOUT", "0"),
        ("UPDATE_MODE", "sometimes"),
        ("FALLBACK_TAG", "../x"),
        ("CONTAINER_IMAGE", ""),
        ("CONTAINER_IMAGE", "Bad Repo"),
        ("CONTAINER_NAME", "no/slash"),
        ("DEVICE_ID", "a/b"),
        ("DEVICE_GROUPS", "ok,bad#"),
        ("HA_DISCOVERY", "perhaps"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_bad_values_name_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: "):
        load_settings(env(tmp_path, **{name: value}))


def test_mqtt_settings(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = load_settings(env(tmp_path, MQTT_HOST="broker", MQTT_TLS="true",
                                 MQTT_USERNAME="dev1", MQTT_PASSWORD_FILE=str(secret)))
    assert settings.mqtt is not None
    assert (settings.mqtt.port, settings.mqtt.password, settings.mqtt.tls) == (8883, "s3cret", True)
    with pytest.raises(ConfigError, match=r"^MQTT_PORT: "):
        load_settings(env(tmp_path, MQTT_HOST="broker", MQTT_PORT="70000"))


def test_yaml_file_with_env_winning(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(
        "container_image: r:5000/app\npoll_interval: 2\ndevice_groups: [a, b]\nha_discovery: true\n"
    )
    settings = load_settings({"DATA_DIR": str(tmp_path), "POLL_INTERVAL": "1"})
    assert settings.repository == "r:5000/app"
    assert settings.poll_interval_s == 60
    assert settings.device_groups == ("a", "b")
    assert settings.ha_discovery is True


def test_yaml_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("pol_interval: 2\n")
    with pytest.raises(ConfigError, match=r"^CONFIG_FILE: unknown setting 'pol_interval'"):
        load_settings(env(tmp_path, CONFIG_FILE=str(config)))


def test_cli_exit_code_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent"],
        env={"CONTAINER_IMAGE": "r/app", "DATA_DIR": str(tmp_path), "POLL_INTERVAL": "x"},
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "edge-agent: configuration error: POLL_INTERVAL: 'x' is not a number"
    ]


def test_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "--help"],
        capture_output=True, text=True, timeout=30, check=True,
    )
    for setting in SETTINGS:
        assert setting.name in result.stdout
        assert f"default: {setting.default}" in result.stdout
