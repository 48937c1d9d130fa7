"""Bridge settings from the environment: BRIDGE_* for HTTP, MQTT_* exactly as the agent."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import MqttSettings, load_mqtt_settings, parse_int, parse_number
from edge_agent.registry_probe import PROBE_SETTINGS, ProbeSettings, load_probe_settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_MAX_WAIT_S = 300.0
DEFAULT_CLIENT_CONNECTIONS = 32
MAX_CONNECTIONS = 512
MAX_TOKEN_CHARS = 4096
SHORT_TOKEN_CHARS = 16
NO_REGISTRY_CHECK = ProbeSettings(enabled=False)

#: (variable, default as shown, meaning) for ``edge-bridge --help``
BRIDGE_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("BRIDGE_TOKEN", "(required)", "bearer token every /api request must carry"),
    ("BRIDGE_TOKEN_FILE", "(none)", "file holding the token (instead of BRIDGE_TOKEN)"),
    ("BRIDGE_METRICS_TOKEN", "(none)", "a second bearer token good only for GET /metrics "
     "(for Prometheus); /metrics also takes BRIDGE_TOKEN"),
    ("BRIDGE_METRICS_TOKEN_FILE", "(none)", "file holding the metrics token"),
    ("BRIDGE_HOST", DEFAULT_HOST, "address to listen on (0.0.0.0 in a container)"),
    ("BRIDGE_PORT", str(DEFAULT_PORT), "TCP port to listen on (0 = any free port)"),
    ("BRIDGE_MAX_WAIT", f"{DEFAULT_MAX_WAIT_S:g}", "largest ?wait= in seconds a client may ask"),
    ("BRIDGE_CLIENT_CONNECTIONS", str(DEFAULT_CLIENT_CONNECTIONS),
     f"connections one client address may hold (of {MAX_CONNECTIONS}); raise it behind a "
     "proxy"),
    ("BRIDGE_DATA_DIR", "(none: rollouts off)", "directory for rollout records and the "
     "rollout controller's lock (rollouts/ below it); unset or unwritable, the bridge serves "
     "devices and answers 503 to the rollout routes"),
    *PROBE_SETTINGS,
    ("MQTT_HOST ...", "", "MQTT_* broker settings, exactly as for edge-agent (MQTT_HOST required)"),
    ("LOG_LEVEL / LOG_FORMAT", "INFO / text", "as for edge-agent"),
)


@dataclass(frozen=True)
class BridgeSettings:
    """Validated bridge configuration. ``token`` is never logged."""

    token: str
    host: str
    port: int
    max_wait_s: float
    mqtt: MqttSettings
    log_level: str
    log_format: str
    max_client_connections: int = DEFAULT_CLIENT_CONNECTIONS
    metrics_token: str | None = None
    data_dir: Path | None = None
    # the registry check before publishing a tag: off unless configured (the environment
    # turns it on by default, load_bridge_settings)
    registry: ProbeSettings = NO_REGISTRY_CHECK

    def __repr__(self) -> str:  # keep the token out of tracebacks and logs
        return (f"BridgeSettings(host={self.host!r}, port={self.port}, "
                f"max_wait_s={self.max_wait_s:g}, mqtt={self.mqtt.where})")


def load_bridge_settings(environ: Mapping[str, str] | None = None) -> BridgeSettings:
    """Read and validate the bridge's settings; raise ConfigError naming the variable."""
    env = dict(os.environ if environ is None else environ)
    token = _token(env)
    metrics_token = _token(env, "BRIDGE_METRICS_TOKEN", required=False) or None
    host = env.get("BRIDGE_HOST", "").strip() or DEFAULT_HOST
    port = parse_int(env, "BRIDGE_PORT", DEFAULT_PORT, minimum=0, maximum=65535)
    max_wait = parse_number(env, "BRIDGE_MAX_WAIT", DEFAULT_MAX_WAIT_S, minimum=0.1,
                            maximum=3600.0)
    client_connections = parse_int(env, "BRIDGE_CLIENT_CONNECTIONS", DEFAULT_CLIENT_CONNECTIONS,
                                   minimum=1, maximum=MAX_CONNECTIONS)
    data_dir_text = env.get("BRIDGE_DATA_DIR", "").strip()
    data_dir = Path(data_dir_text) if data_dir_text else None
    if data_dir is not None and not data_dir.is_absolute():
        raise ConfigError(f"BRIDGE_DATA_DIR: must be an absolute path, got {data_dir_text!r}")
    mqtt = load_mqtt_settings(env)
    registry = load_probe_settings(env)
    log_level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR")
    log_format = (env.get("LOG_FORMAT") or "text").strip().lower()
    if log_format not in ("text", "json"):
        raise ConfigError("LOG_FORMAT: must be text or json")
    return BridgeSettings(token, host, port, max_wait, mqtt, log_level, log_format,
                          client_connections, metrics_token, data_dir, registry)


def _token(env: dict[str, str], variable: str = "BRIDGE_TOKEN", *,
           required: bool = True) -> str:
    """The token in ``variable`` or the file named by ``variable``_FILE ("" if neither
    is set and it is not required)."""
    direct = env.get(variable, "")
    path = env.get(f"{variable}_FILE", "").strip()
    if direct and path:
        raise ConfigError(f"{variable}: set {variable} or {variable}_FILE, not both")
    name = variable
    if path:
        name = f"{variable}_FILE"
        try:
            direct = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{name}: {path} is not UTF-8 text") from None
    token = direct.strip()
    if not token and not required:
        if path or direct:
            raise ConfigError(f"{name}: empty (unset it to have no {variable})")
        return ""
    if not token:
        raise ConfigError("BRIDGE_TOKEN: required (or BRIDGE_TOKEN_FILE); "
                          "the bridge does not start without a token")
    if len(token) > MAX_TOKEN_CHARS or not all("\x21" <= c <= "\x7e" for c in token):
        raise ConfigError(f"{name}: the token must be 1-{MAX_TOKEN_CHARS} printable ASCII "
                          "characters without spaces")
    return token
