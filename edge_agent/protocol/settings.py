"""MQTT connection settings (``MQTT_*``), read the same way by all three programs, and
the number and switch parsers every program's settings use.

Every problem raises ConfigError naming the variable; the programs turn it into exit
code 2 with that one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.errors import ConfigError

# The exit code of every program for a bad setting (one line on stderr names it).
EXIT_CONFIG = 2


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection settings; only present when MQTT_HOST is set."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    protocol: str
    topic_prefix: str


def load_mqtt_settings(environ: Mapping[str, str] | None = None) -> MqttSettings:
    """The MQTT_* settings, required (the bridge and edge-ctl need a broker)."""
    raw = dict(os.environ if environ is None else environ)
    settings = mqtt_settings_from(raw, topic_prefix(raw))
    if settings is None:
        raise ConfigError("MQTT_HOST: required")
    return settings


def topic_prefix(raw: Mapping[str, str]) -> str:
    """MQTT_TOPIC_PREFIX: the root of every topic (default ``edge``)."""
    prefix = (raw.get("MQTT_TOPIC_PREFIX") or "edge").strip().strip("/")
    check(prefix and not set(prefix) & set("#+\x00"), "MQTT_TOPIC_PREFIX",
          "must be non-empty and free of # and +")
    return prefix


def mqtt_settings_from(raw: Mapping[str, str], prefix: str) -> MqttSettings | None:
    """The MQTT_* settings, or None without MQTT_HOST (the agent then runs standalone)."""
    host = raw.get("MQTT_HOST", "").strip()
    if not host:
        return None
    tls = parse_bool(raw, "MQTT_TLS")
    port = parse_int(raw, "MQTT_PORT", 8883 if tls else 1883, minimum=1, maximum=65535)
    password = raw.get("MQTT_PASSWORD") or None
    password_file = raw.get("MQTT_PASSWORD_FILE")
    if password_file:
        try:
            password = Path(password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"MQTT_PASSWORD_FILE: cannot read {password_file}: "
                              f"{exc.strerror or exc}") from None
    protocol = (raw.get("MQTT_PROTOCOL") or "5").strip()
    check(protocol in ("5", "3.1.1"), "MQTT_PROTOCOL", "must be 5 or 3.1.1")
    return MqttSettings(
        host=host,
        port=port,
        username=raw.get("MQTT_USERNAME") or None,
        password=password,
        tls=tls,
        ca_file=existing_file(raw, "MQTT_CA_FILE"),
        cert_file=existing_file(raw, "MQTT_CERT_FILE"),
        key_file=existing_file(raw, "MQTT_KEY_FILE"),
        protocol=protocol,
        topic_prefix=prefix,
    )


def check(ok: object, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def parse_number(
    raw: Mapping[str, str], name: str, default: float, *, minimum: float,
    maximum: float = float("inf"),
) -> float:
    """The setting ``name`` as a finite float in [minimum, maximum]; ``default`` if unset."""
    text = raw.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number") from None
    if not minimum <= value <= maximum or value == float("inf"):
        bound = f"<= {maximum:g}" if maximum != float("inf") else "finite"
        raise ConfigError(f"{name}: {text!r} must be a number >= {minimum:g} and {bound}")
    return value


def parse_int(raw: Mapping[str, str], name: str, default: int, *, minimum: int,
              maximum: int) -> int:
    """The setting ``name`` as a whole number in [minimum, maximum]; ``default`` if unset."""
    text = raw.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a whole number") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}: {value} is not in {minimum}-{maximum}")
    return value


def parse_bool(raw: Mapping[str, str], name: str) -> bool:
    text = raw.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: {text!r} is not a boolean (true/false)")


def existing_file(raw: Mapping[str, str], name: str) -> Path | None:
    text = raw.get(name, "").strip()
    if not text:
        return None
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"{name}: {text} is not a readable file")
    return path
