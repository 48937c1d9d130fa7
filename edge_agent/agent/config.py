"""Agent settings: read from the environment and an optional YAML file, validated once.

The environment wins over the YAML file (lower-case keys). Every problem raises
ConfigError naming the variable, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edge_agent.agent.window import UpdateWindow, parse_window
from edge_agent.protocol.errors import ConfigError, TagError
from edge_agent.protocol.settings import (
    MqttSettings,
    check,
    mqtt_settings_from,
    parse_bool,
    parse_int,
    parse_number,
    topic_prefix,
)
from edge_agent.protocol.tags import split_image, validate_tag
from edge_agent.protocol.topics import ID_PATTERN, ID_RE

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
# Docker's reference grammar for a repository: an optional registry host[:port], then
# lower-case path components separated by "/" ("._-" only inside a component). Stricter
# than "any of these characters", so what passes here docker-py also accepts (no scheme).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(
    rf"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$"
)


MAX_SHOWN_ZONE_CHARS = 60  # of an unknown TZ, quoted in its error
# An hour: far beyond any critical operation an app should hold updates off for (a job,
# a transfer, a calibration), short enough that a stuck app misses at most one rollout wave.
DEFAULT_LOCK_MAX_HOLD_S = 3600
# Cellular links: carrier NATs drop idle TCP flows after a few minutes to hours; 5 min
# keeps the flow open under most of them at ~290 pings a day, and the broker's will
# reports a silent loss within 1.5 x this (docs/BENCHMARKS.md, "Wire cost").
DEFAULT_MQTT_KEEPALIVE_S = 300
MAX_MQTT_KEEPALIVE_S = 65535  # the protocol's limit (a 16-bit field)
# An unchanged state is sent again after an hour: its ts (the bridge's "last seen") is
# never older; with the default POLL_INTERVAL each check's last_check_at is a change anyway.
DEFAULT_HEARTBEAT_INTERVAL_S = 3600


@dataclass(frozen=True)
class Setting:
    """One documented setting: its variable, default (as shown) and meaning."""

    name: str
    default: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("CONFIG_FILE", "DATA_DIR/agent.yaml if present",
            "YAML file with the same settings (lower-case keys); the environment wins"),
    Setting("CONTAINER_IMAGE", "(required)",
            "image repository; a tag in it (repo:1.2) is the initial tag when no tag file exists"),
    Setting("POLL_INTERVAL", "30", "minutes between registry checks; a float (0.05 = 3 s)"),
    Setting("DATA_DIR", "/app/data", "holds tag, docker_config.json and the agent's state"),
    Setting("CONTAINER_NAME", "edge-app", "name of the managed container"),
    Setting("DEVICE_ID", "hostname", "this device's id in MQTT topics"),
    Setting("DEVICE_GROUPS", "(none)", "comma-separated group names"),
    Setting("FALLBACK_TAG", "latest",
            "tag used when the desired tag does not exist; empty disables the fallback"),
    Setting("UPDATE_MODE", "auto", "auto applies updates; notify only reports them until told"),
    Setting("HEALTH_TIMEOUT", "60", "seconds a new container gets to prove itself healthy"),
    Setting("DOCKER_DATA_ROOT", "the daemon's DockerRootDir if visible",
            "where the agent sees Docker's data root, to check free space before a pull "
            "(in a container: mount it read-only); off skips the check"),
    Setting("UPDATE_WINDOW", "(always open)",
            "daily local-time windows for applying updates, e.g. 02:00-04:00,23:00-01:00"),
    Setting("TZ", "UTC", "time zone of UPDATE_WINDOW (zoneinfo name, e.g. Europe/Berlin)"),
    Setting("UPDATE_LOCK_FILE", "(none)",
            "path of the app's update lock: no update while this file exists"),
    Setting("UPDATE_LOCK_MAX_HOLD", str(DEFAULT_LOCK_MAX_HOLD_S),
            "seconds the lock may hold one update back before it is applied anyway; 0 = forever"),
    Setting("TRUSTED_KEYS", "(none: signatures not checked)",
            "comma-separated PEM public key files (ECDSA P-256 or Ed25519): run only images "
            "with a sigstore signature by one of them (docs/SIGNING.md)"),
    Setting("AGENT_IMAGE", "the agent container's own image repository",
            "repository the agent pulls its own new versions from (docs/SELF-UPDATE.md)"),
    Setting("AGENT_UPDATE_TIMEOUT", "120",
            "seconds a new agent gets to prove itself before the old one takes over again"),
    Setting("MQTT_HOST", "(none)", "broker host, or a comma-separated list host[:port],... "
            "tried in turn (docs/BROKERS.md); unset = standalone (tag file + polling)"),
    Setting("MQTT_PORT", "1883 (8883 with TLS)", "broker port (of MQTT_HOST entries without one)"),
    Setting("MQTT_USERNAME", "(none)", "broker user name"),
    Setting("MQTT_PASSWORD", "(none)", "broker password"),
    Setting("MQTT_PASSWORD_FILE", "(none)", "file holding the broker password"),
    Setting("MQTT_TLS", "false", "connect with TLS; the server certificate is verified"),
    Setting("MQTT_CA_FILE", "(system CAs)", "CA bundle used to verify the broker"),
    Setting("MQTT_CERT_FILE", "(none)", "client certificate for TLS client auth"),
    Setting("MQTT_KEY_FILE", "(none)", "client key for TLS client auth"),
    Setting("MQTT_PROTOCOL", "5", "MQTT protocol version: 5 or 3.1.1"),
    Setting("MQTT_TOPIC_PREFIX", "edge", "root of every topic"),
    Setting("MQTT_KEEPALIVE", str(DEFAULT_MQTT_KEEPALIVE_S),
            "seconds of MQTT keepalive: a ping when the link is otherwise idle; the broker "
            "says offline (the will) within 1.5 x this after a silent loss"),
    Setting("TELEMETRY_INTERVAL", "60",
            "seconds between looks at the container and status.json refreshes; "
            "a change is published over MQTT at once"),
    Setting("HEARTBEAT_INTERVAL", str(DEFAULT_HEARTBEAT_INTERVAL_S),
            "seconds after which an unchanged state is published over MQTT again "
            "(its ts refreshed)"),
    Setting("HA_DISCOVERY", "false", "publish Home Assistant MQTT discovery for an update entity"),
    Setting("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    Setting("LOG_FORMAT", "text", "text, or json for one JSON object per line"),
)


@dataclass(frozen=True)
class Settings:
    """Validated agent configuration."""

    repository: str
    image_tag: str | None
    poll_interval_s: float
    data_dir: Path
    container_name: str
    device_id: str
    device_groups: tuple[str, ...]
    fallback_tag: str | None
    update_mode: str
    health_timeout_s: float
    mqtt: MqttSettings | None
    telemetry_interval_s: float
    ha_discovery: bool
    log_level: str
    log_format: str
    topic_prefix: str
    # DEVICE_ID was not set: the host name stands in (random in a container)
    device_id_is_hostname: bool = False
    # where Docker's data root is seen ("": the daemon's DockerRootDir; "off": no check)
    docker_data_root: str = ""
    update_window: UpdateWindow | None = None
    update_lock_file: Path | None = None
    update_lock_max_hold_s: float = float(DEFAULT_LOCK_MAX_HOLD_S)
    # TRUSTED_KEYS: when set, only images signed by one of these keys run (docs/SIGNING.md)
    trusted_keys: tuple[Path, ...] = ()
    mqtt_keepalive_s: int = DEFAULT_MQTT_KEEPALIVE_S
    heartbeat_interval_s: float = float(DEFAULT_HEARTBEAT_INTERVAL_S)
    agent_image: str = ""  # "": the repository of the agent container's own image
    agent_update_timeout_s: float = 120.0


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment (and CONFIG_FILE); raise ConfigError on bad input."""
    env = dict(os.environ if environ is None else environ)
    data_dir = Path(env.get("DATA_DIR") or "/app/data")
    raw = _merge_yaml(env, data_dir)
    return _parse(raw)


def load_file_settings(environ: Mapping[str, str] | None = None) -> tuple[Path, float]:
    """DATA_DIR and TELEMETRY_INTERVAL (s) only: what ``status`` and ``healthcheck`` need."""
    env = dict(os.environ if environ is None else environ)
    raw = _merge_yaml(env, Path(env.get("DATA_DIR") or "/app/data"))
    return (Path(raw.get("DATA_DIR") or "/app/data"),
            parse_number(raw, "TELEMETRY_INTERVAL", 60.0, minimum=0.1))


def _merge_yaml(env: dict[str, str], data_dir: Path) -> dict[str, str]:
    """Return settings as strings: YAML values overlaid by the environment."""
    names = {s.name for s in SETTINGS}
    explicit = env.get("CONFIG_FILE")
    path = Path(explicit) if explicit else data_dir / "agent.yaml"
    merged: dict[str, str] = {}
    if explicit or path.exists():
        # imported only when there is a file: PyYAML costs ~1 MB of RSS (docs/BENCHMARKS.md)
        import yaml  # noqa: PLC0415

        try:
            loaded: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"CONFIG_FILE: cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"CONFIG_FILE: {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"CONFIG_FILE: {path} must hold a mapping of settings")
        for key, value in loaded.items():
            name = str(key).upper()
            if name not in names or name == "CONFIG_FILE":
                raise ConfigError(f"CONFIG_FILE: unknown setting {key!r} in {path}")
            merged[name] = _yaml_scalar(value)
    for name in names:
        if name in env:
            merged[name] = env[name]
    return merged


def _yaml_scalar(value: Any) -> str:
    """A YAML value as the string the environment would carry."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def _parse(raw: dict[str, str]) -> Settings:
    image = raw.get("CONTAINER_IMAGE", "").strip()
    if not image:
        raise ConfigError("CONTAINER_IMAGE: required (an image repository, e.g. registry/app)")
    if "://" in image:
        raise ConfigError(f"CONTAINER_IMAGE: {image!r} has a scheme; drop it "
                          "(registry/app, not https://registry/app)")
    try:
        repository, image_tag = split_image(image)
    except TagError as exc:
        raise ConfigError(f"CONTAINER_IMAGE: {exc}") from None
    if not REPOSITORY_RE.fullmatch(repository):
        raise ConfigError(f"CONTAINER_IMAGE: {repository!r} is not a valid repository name")

    container_name = raw.get("CONTAINER_NAME") or "edge-app"
    check(NAME_RE.fullmatch(container_name), "CONTAINER_NAME", "must be a Docker container name")
    device_id = raw.get("DEVICE_ID") or socket.gethostname()
    check(ID_RE.fullmatch(device_id), "DEVICE_ID",
           f"{device_id!r} must match {ID_PATTERN} (one MQTT topic level)")
    groups = tuple(g.strip() for g in raw.get("DEVICE_GROUPS", "").split(",") if g.strip())
    for group in groups:
        check(ID_RE.fullmatch(group), "DEVICE_GROUPS", f"group {group!r} must match {ID_PATTERN}")

    fallback_raw = raw.get("FALLBACK_TAG", "latest").strip()
    fallback_tag: str | None = None
    if fallback_raw:
        try:
            fallback_tag = validate_tag(fallback_raw)
        except TagError as exc:
            raise ConfigError(f"FALLBACK_TAG: {exc}") from None

    update_mode = (raw.get("UPDATE_MODE") or "auto").strip().lower()
    check(update_mode in ("auto", "notify"), "UPDATE_MODE", "must be auto or notify")
    log_level = (raw.get("LOG_LEVEL") or "INFO").strip().upper()
    check(log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "LOG_LEVEL",
           "must be DEBUG, INFO, WARNING or ERROR")
    log_format = (raw.get("LOG_FORMAT") or "text").strip().lower()
    check(log_format in ("text", "json"), "LOG_FORMAT", "must be text or json")

    prefix = topic_prefix(raw)
    window = _update_window(raw)
    lock_file = raw.get("UPDATE_LOCK_FILE", "").strip()
    check(not lock_file or Path(lock_file).is_absolute(), "UPDATE_LOCK_FILE",
          f"{lock_file!r} must be an absolute path")

    trusted_keys = tuple(Path(k.strip()) for k in raw.get("TRUSTED_KEYS", "").split(",")
                         if k.strip())
    for key in trusted_keys:
        check(key.is_absolute(), "TRUSTED_KEYS", f"{str(key)!r} must be an absolute path")

    agent_image = raw.get("AGENT_IMAGE", "").strip()
    check(not agent_image or REPOSITORY_RE.fullmatch(agent_image), "AGENT_IMAGE",
          f"{agent_image!r} must be an image repository without a tag")
    return Settings(
        repository=repository,
        image_tag=image_tag,
        poll_interval_s=parse_number(raw, "POLL_INTERVAL", 30.0, minimum=0.001) * 60.0,
        data_dir=Path(raw.get("DATA_DIR") or "/app/data"),
        container_name=container_name,
        device_id=device_id,
        device_groups=groups,
        fallback_tag=fallback_tag,
        update_mode=update_mode,
        health_timeout_s=parse_number(raw, "HEALTH_TIMEOUT", 60.0, minimum=0.1),
        mqtt=mqtt_settings_from(raw, prefix),
        telemetry_interval_s=parse_number(raw, "TELEMETRY_INTERVAL", 60.0, minimum=0.1),
        ha_discovery=parse_bool(raw, "HA_DISCOVERY"),
        log_level=log_level,
        log_format=log_format,
        topic_prefix=prefix,
        device_id_is_hostname=not raw.get("DEVICE_ID"),
        docker_data_root=_docker_data_root(raw.get("DOCKER_DATA_ROOT", "").strip()),
        update_window=window,
        update_lock_file=Path(lock_file) if lock_file else None,
        update_lock_max_hold_s=parse_number(raw, "UPDATE_LOCK_MAX_HOLD",
                                            float(DEFAULT_LOCK_MAX_HOLD_S), minimum=0.0),
        trusted_keys=trusted_keys,
        mqtt_keepalive_s=parse_int(raw, "MQTT_KEEPALIVE", DEFAULT_MQTT_KEEPALIVE_S,
                                   minimum=5, maximum=MAX_MQTT_KEEPALIVE_S),
        heartbeat_interval_s=parse_number(raw, "HEARTBEAT_INTERVAL",
                                          float(DEFAULT_HEARTBEAT_INTERVAL_S), minimum=0.1),
        agent_image=agent_image,
        agent_update_timeout_s=parse_number(raw, "AGENT_UPDATE_TIMEOUT", 120.0, minimum=1.0),
    )


def _docker_data_root(value: str) -> str:
    if value.lower() == "off":
        return "off"
    check(value == "" or value.startswith("/"), "DOCKER_DATA_ROOT",
          f"{value!r} must be an absolute path or off")
    return value


def _update_window(raw: dict[str, str]) -> UpdateWindow | None:
    """UPDATE_WINDOW in the zone TZ names (checked only when there is a window: TZ is
    the system's variable, and means nothing else to the agent)."""
    text = raw.get("UPDATE_WINDOW", "")
    if not text.strip():
        return None
    name = raw.get("TZ", "").strip().removeprefix(":") or "UTC"
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        shown = name if len(name) <= MAX_SHOWN_ZONE_CHARS else name[:MAX_SHOWN_ZONE_CHARS] + "..."
        raise ConfigError(f"TZ: unknown time zone {shown!r} (needed by UPDATE_WINDOW); use a "
                          "zoneinfo name such as Europe/Berlin or UTC") from None
    return parse_window(text, zone)


def describe_settings(format_row: Callable[[Setting], str]) -> str:
    """Render the settings table for --help and docs."""
    return "\n".join(format_row(s) for s in SETTINGS)
