"""MQTT connection settings (``MQTT_*``), read the same way by all three programs, and
the number and switch parsers every program's settings use.

Every problem raises ConfigError naming the variable; the programs turn it into exit
code 2 with that one line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edge_agent.protocol.errors import ConfigError

# The exit code of every program for a bad setting (one line on stderr names it).
EXIT_CONFIG = 2


# A host name or IPv4 address (letters, digits, ``.``, ``-``, ``_``), or an IPv6 address
# in brackets: what a socket can connect to, and nothing a typo could smuggle in.
_HOST_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}(%[A-Za-z0-9_.-]{1,32})?")
MAX_BROKERS = 16
MAX_PORT = 65535


@dataclass(frozen=True)
class BrokerAddress:
    """One entry of MQTT_HOST."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class MqttSettings:
    """Broker connection settings; only present when MQTT_HOST is set.

    ``host``/``port`` are the first broker; ``brokers`` all of them in MQTT_HOST's
    order (empty: just ``host``/``port``), tried in turn (``addresses``).
    """

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
    brokers: tuple[BrokerAddress, ...] = ()

    @property
    def addresses(self) -> tuple[BrokerAddress, ...]:
        """The brokers to try, in order: the first, then the next on a failure or loss."""
        return self.brokers or (BrokerAddress(self.host, self.port),)

    @property
    def where(self) -> str:
        """The brokers for a log line: ``a:1883, b:1883``."""
        return ", ".join(str(address) for address in self.addresses)


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
    text = raw.get("MQTT_HOST", "").strip()
    if not text:
        return None
    tls = parse_bool(raw, "MQTT_TLS")
    port = parse_int(raw, "MQTT_PORT", 8883 if tls else 1883, minimum=1, maximum=65535)
    brokers = parse_brokers(text, port)
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
        host=brokers[0].host,
        port=brokers[0].port,
        username=raw.get("MQTT_USERNAME") or None,
        password=password,
        tls=tls,
        ca_file=existing_file(raw, "MQTT_CA_FILE"),
        cert_file=existing_file(raw, "MQTT_CERT_FILE"),
        key_file=existing_file(raw, "MQTT_KEY_FILE"),
        protocol=protocol,
        topic_prefix=prefix,
        brokers=brokers,
    )


def parse_brokers(text: str, default_port: int) -> tuple[BrokerAddress, ...]:
    """MQTT_HOST: ``host[:port]`` entries separated by commas (an IPv6 address bare or
    as ``[addr]:port``); an entry without a port gets ``default_port`` (MQTT_PORT)."""
    entries = [entry.strip() for entry in text.split(",")]
    check(len(entries) <= MAX_BROKERS, "MQTT_HOST", f"at most {MAX_BROKERS} brokers")
    brokers: list[BrokerAddress] = []
    for entry in entries:
        address = _parse_broker(entry, default_port)
        check(address not in brokers, "MQTT_HOST", f"{address} is listed twice")
        brokers.append(address)
    return tuple(brokers)


def _parse_broker(entry: str, default_port: int) -> BrokerAddress:
    check(entry, "MQTT_HOST", "an empty entry in the list (host[:port],host[:port],...)")
    port_text: str | None = None
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        check(bracket and _IPV6_RE.fullmatch(host) and ":" in host, "MQTT_HOST",
              f"{entry!r} is not an IPv6 address in brackets ([::1]:1883)")
        if rest:
            check(rest.startswith(":"), "MQTT_HOST", f"{entry!r}: expected :port after ]")
            port_text = rest[1:]
    elif entry.count(":") > 1:  # a bare IPv6 address: no port possible
        host = entry
        check(_IPV6_RE.fullmatch(host), "MQTT_HOST",
              f"{entry!r} is not host[:port] (an IPv6 address with a port goes in brackets)")
    else:
        host, colon, port_text_or_empty = entry.partition(":")
        port_text = port_text_or_empty if colon else None
        check(_HOST_RE.fullmatch(host), "MQTT_HOST", f"{entry!r} is not host[:port]")
    if port_text is None:
        return BrokerAddress(host, default_port)
    check(port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= MAX_PORT,
          "MQTT_HOST", f"{entry!r}: the port must be a number in 1-65535")
    return BrokerAddress(host, int(port_text))


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
