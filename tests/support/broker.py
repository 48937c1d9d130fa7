"""Mosquitto for the tests, started from the repository's own ``mosquitto/`` files.

``Broker`` copies ``mosquitto/mosquitto.conf`` and ``mosquitto/acl`` into a temporary
directory, changing only what a test must (the ``/mosquitto/`` paths and the two
listener ports, bound to 127.0.0.1); users are added with ``mosquitto/add-device``, as
an operator would. ``make_pki`` makes a throwaway CA and server certificate with
openssl for the TLS listener.

``MqttWatcher`` is a plain subscriber that records what arrives, for assertions.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from paho.mqtt.client import Client, MQTTMessage

from edge_agent.protocol.mqtt import connect_client, disconnect_client
from edge_agent.protocol.settings import MqttSettings
from tests.support import REPO_ROOT, free_port, terminate, wait_until

MOSQUITTO_DIR = REPO_ROOT / "mosquitto"
ADD_DEVICE = MOSQUITTO_DIR / "add-device"
HOST = "127.0.0.1"


def _run(args: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([str(a) for a in args], check=True, capture_output=True,
                              text=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {exc.stderr}") from exc


# The operator user the agent tests log in as (tests/agent/conftest.py)
OPERATOR = "operator"


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate for 127.0.0.1/localhost, as PEM files."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    def issue(self, name: str, *, client: bool = True) -> tuple[Path, Path]:
        """Another certificate signed by this CA: (cert, key)."""
        return _issue(self.dir, name, self.ca_cert, self.ca_key,
                      usage="clientAuth" if client else "serverAuth")


def make_pki(directory: Path, name: str = "test") -> Pki:
    """A fresh CA (``<name>-ca``) and a server certificate signed by it, with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / f"{name}-ca.crt", directory / f"{name}-ca.key"
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-keyout", ca_key, "-out", ca_cert, "-days", "2",
          "-subj", f"/CN=edge-agent {name} CA",
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    server_cert, server_key = _issue(directory, f"{name}-server", ca_cert, ca_key,
                                     usage="serverAuth")
    return Pki(directory, ca_cert, ca_key, server_cert, server_key)


def _issue(
    directory: Path, name: str, ca_cert: Path, ca_key: Path, usage: str
) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   f"extendedKeyUsage={usage}\n")
    _run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"])
    _run(["openssl", "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
          "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext])
    return cert, key



PORT_ATTEMPTS = 3


class _PortTaken(Exception):
    """Mosquitto could not bind a port that was free a moment before."""

class Broker:
    """One Mosquitto process on free ports; ``stop()``/``start()`` keep ports and data."""

    def __init__(self, pki: Pki | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edge-mosquitto-"))
        self.config_dir = self.dir / "config"
        self.data_dir = self.dir / "data"
        self.certs_dir = self.dir / "certs"
        for d in (self.config_dir, self.data_dir, self.certs_dir):
            d.mkdir()
        self.port = free_port()
        self.tls_port = free_port()
        self.log_path = self.dir / "mosquitto.log"
        self.pki = pki or make_pki(self.dir / "pki")
        shutil.copy(self.pki.ca_cert, self.certs_dir / "ca.crt")
        shutil.copy(self.pki.server_cert, self.certs_dir / "server.crt")
        shutil.copy(self.pki.server_key, self.certs_dir / "server.key")
        shutil.copy(MOSQUITTO_DIR / "acl", self.config_dir / "acl")
        (self.config_dir / "passwd").touch()  # Mosquitto refuses to start without one
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text(self._rewrite((MOSQUITTO_DIR / "mosquitto.conf").read_text()))
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self.passwords: dict[str, str] = {}

    def _rewrite(self, text: str) -> str:
        """The shipped config with test paths and ports; fails loudly if it drifted."""
        replacements = {
            "/mosquitto/config/": f"{self.config_dir}/",
            "/mosquitto/data/": f"{self.data_dir}/",
            "/mosquitto/certs/": f"{self.certs_dir}/",
            "\nlistener 1883\n": f"\nlistener {self.port} {HOST}\n",
            "\nlistener 8883\n": f"\nlistener {self.tls_port} {HOST}\n",
        }
        for old, new in replacements.items():
            if old not in text:
                raise RuntimeError(f"mosquitto/mosquitto.conf no longer contains {old!r}")
            text = text.replace(old, new)
        return text

    def _hand_over_files(self) -> None:
        """Mosquitto started as root drops to the ``mosquitto`` user: let it read its files
        and write its data, as in a real installation."""
        if os.geteuid() != 0:
            return
        try:
            user = pwd.getpwnam("mosquitto")
        except KeyError:
            return
        for path in [self.dir, *self.dir.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)

    # -- users --------------------------------------------------------------------
    def add_device(self, name: str, groups: Sequence[str] = (), *,
                   operator: bool = False, password: str | None = None) -> str:
        """Add a user with ``mosquitto/add-device``, reload the broker, return the password
        (``password``, e.g. the one the user has on another broker, else a new one)."""
        password = password or uuid.uuid4().hex
        args: list[str | Path] = [ADD_DEVICE, "--config-dir", self.config_dir]
        if operator:
            args.append("--operator")
        _run([*args, name, *groups], env={**os.environ, "DEVICE_PASSWORD": password})
        self.passwords[name] = password
        self.reload()
        wait_until(lambda: self._can_login(name, password), timeout=10,
                   message=f"broker to accept {name}")
        return password

    def add_operator(self, name: str) -> str:
        return self.add_device(name, operator=True)

    def add_devices(self, names: Sequence[str], groups_of: Callable[[str], Sequence[str]],
                    password: str) -> None:
        """Many devices at once (the 10,000 of a bench), all with ``password``: the
        password file and the ACL sections that ``mosquitto/add-device`` writes (a test
        holds the two to the same text), hashed with ``mosquitto_passwd -U`` in one go
        instead of one script run and reload per device. Reloads the broker once."""
        plain = self.config_dir / "passwd.new"
        plain.write_text("".join(f"{name}:{password}\n" for name in names))
        _run(["mosquitto_passwd", "-U", plain])
        with (self.config_dir / "passwd").open("a") as passwd:
            passwd.write(plain.read_text())
        plain.unlink()
        with (self.config_dir / "acl").open("a") as acl:
            acl.write("".join(device_acl_section(name, groups_of(name)) for name in names))
        self.passwords.update(dict.fromkeys(names, password))
        self.reload()

    def _can_login(self, name: str, password: str) -> bool:
        try:
            client = connect_client(self.settings(name), f"probe-{uuid.uuid4().hex[:8]}",
                                    wait_s=2)
        except Exception:  # noqa: BLE001 - any failure just means "not yet"
            return False
        disconnect_client(client)
        return True

    # -- settings for clients -------------------------------------------------------
    def settings(self, user: str | None, *, prefix: str = "edge", tls: bool = False,  # noqa: PLR0913
                 ca_file: Path | None = None, protocol: str = "5",
                 password: str | None = None) -> MqttSettings:
        return MqttSettings(
            host=HOST,
            port=self.tls_port if tls else self.port,
            username=user,
            password=password if password is not None else self.passwords.get(user or ""),
            tls=tls,
            ca_file=ca_file if ca_file is not None else (self.pki.ca_cert if tls else None),
            cert_file=None,
            key_file=None,
            protocol=protocol,
            topic_prefix=prefix,
        )

    def agent_env(self, user: str, prefix: str, **extra: str) -> dict[str, str]:
        """MQTT_* variables for an agent logging in as ``user`` (plaintext listener)."""
        return {
            "MQTT_HOST": HOST,
            "MQTT_PORT": str(self.port),
            "MQTT_USERNAME": user,
            "MQTT_PASSWORD": self.passwords[user],
            "MQTT_TOPIC_PREFIX": prefix,
            **extra,
        }

    # -- lifecycle ------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The Mosquitto process id while it runs (e.g. to read its memory in /proc)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start(timeout)
                break
            except _PortTaken:
                # free_port() only found the ports free: another process may take one
                # before Mosquitto binds it. Before anyone knows our ports, take others.
                if self._started_once or attempt == PORT_ATTEMPTS - 1:
                    raise RuntimeError(f"mosquitto exited at start:\n{self.log()[-3000:]}") from None
                self.port, self.tls_port = free_port(), free_port()
                self.config.write_text(
                    self._rewrite((MOSQUITTO_DIR / "mosquitto.conf").read_text()))
        self._started_once = True

    def _start(self, timeout: float) -> None:
        self._hand_over_files()
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen([mosquitto, "-c", str(self.config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (_listening(self.port) and _listening(self.tls_port)):
            if self._proc.poll() is not None:
                if "Address already in use" in self.log()[log_from:]:
                    self._proc = None
                    raise _PortTaken
                raise RuntimeError(f"mosquitto exited at start:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mosquitto did not listen within {timeout} s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: Mosquitto saves its persistence database and exits."""
        proc, self._proc = self._proc, None
        terminate(proc, timeout)

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the password file and the ACL."""
        self._hand_over_files()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def device_acl_section(name: str, groups: Sequence[str]) -> str:
    """A device's section of the ACL, as ``mosquitto/add-device`` writes it."""
    lines = [f"# >>> user {name}", f"user {name}", "topic read +/fleet/tag",
             "topic read +/fleet/cmd/check", "topic read +/fleet/agent",
             *(f"topic read +/groups/{group}/{what}" for group in groups
               for what in ("tag", "agent"))]
    if "." in name:
        lines.append(f"topic write homeassistant/update/{name.replace('.', '_')}/#")
    lines.append(f"# <<< user {name}")
    return "".join(f"{line}\n" for line in lines)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float
    properties: Any = None

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def text(self) -> str:
        return self.payload.decode(errors="replace")


@dataclass
class MqttWatcher:
    """A subscriber that records every message; ``wait_for`` polls the record."""

    settings: MqttSettings
    topics: Sequence[str]
    messages: list[Received] = field(default_factory=list)
    client: Client | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Self:
        ready = threading.Event()
        self.client = connect_client(
            self.settings, f"watch-{uuid.uuid4().hex[:8]}", subscriptions=self.topics,
            on_message=self._on_message, on_subscribed=lambda _c: ready.set(),
        )
        if self.topics and not ready.wait(10):
            raise TimeoutError("no SUBACK for the watcher")
        return self

    def _on_message(self, client: Client, message: MQTTMessage) -> None:
        received = Received(message.topic, bytes(message.payload), bool(message.retain),
                            time.monotonic(), getattr(message, "properties", None))
        with self._lock:
            self.messages.append(received)

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> Received | None:
        found = self.on(topic)
        return found[-1] if found else None

    def wait_for(self, topic: str, predicate: Callable[[Received], bool] = lambda m: True,
                 timeout: float = 20.0, message: str | None = None,
                 since: float = 0.0) -> Received:
        """The first message on ``topic`` (received after ``since``) matching ``predicate``."""
        def find() -> Received | None:
            for m in self.on(topic):
                if m.at >= since and _safe(predicate, m):
                    return m
            return None
        return wait_until(find, timeout=timeout, message=message or f"a message on {topic}")

    def publish(self, topic: str, payload: str | bytes, *, retain: bool = False,
                properties: Any = None) -> None:
        assert self.client is not None
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        info.wait_for_publish(5)

    def close(self) -> None:
        if self.client is not None:
            disconnect_client(self.client)
            self.client = None


def text_is(text: str) -> Callable[[Received], bool]:
    """A ``wait_for`` predicate: the message's payload reads ``text``."""
    return lambda m: m.text == text


def payload_is(payload: bytes) -> Callable[[Received], bool]:
    """A ``wait_for`` predicate: the message's payload is exactly ``payload``."""
    return lambda m: m.payload == payload


def _safe(predicate: Callable[[Received], bool], message: Received) -> bool:
    try:
        return predicate(message)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
