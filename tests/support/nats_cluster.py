"""A three-node NATS cluster (JetStream, MQTT 3.1.1 listener) for the tests, run from
the repository's own ``nats/`` files.

``NatsCluster`` starts ``nats-server -c nats/nats-server.conf`` three times, each node
with its own environment (name, free ports, routes to the other two, its JetStream
store); users are added with ``nats/add-device``, as an operator would, and every node
reloads them. ``kill(i)`` SIGKILLs a node (a crash), ``start(i)`` brings it back.
It offers what the tests use of ``tests.support.broker.Broker``: ``add_device``,
``add_operator``, ``passwords``, ``settings`` and ``agent_env`` (those two take the
node(s) a client is given, in MQTT_HOST's order).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from edge_agent.protocol.mqtt import connect_client, disconnect_client
from edge_agent.protocol.settings import BrokerAddress, MqttSettings
from tests.support import REPO_ROOT, free_port, terminate, wait_until

NATS_DIR = REPO_ROOT / "nats"
ADD_DEVICE = NATS_DIR / "add-device"
HOST = "127.0.0.1"
NODES = 3


def nats_server() -> str | None:
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)


class NatsNode:
    def __init__(self, index: int, directory: Path) -> None:
        self.index = index
        self.name = f"n{index + 1}"
        self.dir = directory / self.name
        self.dir.mkdir()
        self.mqtt_port = free_port()
        self.client_port = free_port()
        self.cluster_port = free_port()
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(HOST, self.mqtt_port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsCluster:
    """Three nodes on free ports; users shared through one ``users.conf``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edge-nats-"))
        self.config_dir = self.dir / "config"
        self.config_dir.mkdir()
        shutil.copy(NATS_DIR / "nats-server.conf", self.config_dir / "nats-server.conf")
        self.nodes = [NatsNode(i, self.dir) for i in range(NODES)]
        self.passwords: dict[str, str] = {}
        # a user the probes log in as, present from the start
        self._probe_user = "probe-" + uuid.uuid4().hex[:8]
        self._add(self._probe_user, operator=True)

    # -- users --------------------------------------------------------------------------
    def _add(self, name: str, groups: Sequence[str] = (), *, operator: bool = False,
             password: str | None = None) -> str:
        password = password or uuid.uuid4().hex
        args = [str(ADD_DEVICE), "--config-dir", str(self.config_dir)]
        if operator:
            args.append("--operator")
        try:
            subprocess.run([*args, name, *groups], check=True, capture_output=True, text=True,
                           env={**os.environ, "DEVICE_PASSWORD": password})
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"nats/add-device failed: {exc.stderr}") from exc
        self.passwords[name] = password
        return password

    def add_device(self, name: str, groups: Sequence[str] = (), *,
                   operator: bool = False, password: str | None = None) -> str:
        """Add a user with ``nats/add-device`` (again: new groups; ``password`` keeps the
        one it has), reload every node, return the password."""
        password = self._add(name, groups, operator=operator, password=password)
        self.reload()
        for node in self.nodes:
            if node.running:
                index = node.index
                wait_until(lambda: self._can_login(name, index), timeout=15,  # noqa: B023
                           message=f"node {node.name} to accept {name}")
        return password

    def add_operator(self, name: str) -> str:
        return self.add_device(name, operator=True)

    def reload(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGHUP)

    def _can_login(self, name: str, node: int) -> bool:
        try:
            client = connect_client(self.settings(name, nodes=[node]),
                                    f"probe-{uuid.uuid4().hex[:8]}", wait_s=3)
        except Exception:  # noqa: BLE001 - any failure just means "not yet"
            return False
        disconnect_client(client)
        return True

    # -- settings for clients ---------------------------------------------------------
    def addresses(self, nodes: Sequence[int] | None = None) -> tuple[BrokerAddress, ...]:
        order = range(NODES) if nodes is None else nodes
        return tuple(self.nodes[i].address for i in order)

    def host_list(self, nodes: Sequence[int] | None = None) -> str:
        """MQTT_HOST for these nodes, in this order (all three by default)."""
        return ",".join(str(address) for address in self.addresses(nodes))

    def settings(self, user: str | None, *, prefix: str = "edge",
                 nodes: Sequence[int] | None = None, protocol: str = "3.1.1"
                 ) -> MqttSettings:
        brokers = self.addresses(nodes)
        return MqttSettings(
            host=brokers[0].host, port=brokers[0].port, username=user,
            password=self.passwords.get(user or ""), tls=False, ca_file=None,
            cert_file=None, key_file=None, protocol=protocol, topic_prefix=prefix,
            brokers=brokers,
        )

    def agent_env(self, user: str, prefix: str, *, nodes: Sequence[int] | None = None,
                  **extra: str) -> dict[str, str]:
        """MQTT_* variables for a program logging in as ``user`` on these nodes."""
        return {
            "MQTT_HOST": self.host_list(nodes),
            "MQTT_USERNAME": user,
            "MQTT_PASSWORD": self.passwords[user],
            "MQTT_TOPIC_PREFIX": prefix,
            "MQTT_PROTOCOL": "3.1.1",
            **extra,
        }

    # -- lifecycle --------------------------------------------------------------------
    def _env(self, node: NatsNode) -> dict[str, str]:
        routes = ",".join(f"nats-route://{HOST}:{other.cluster_port}"
                          for other in self.nodes if other is not node)
        return {**os.environ, "NATS_HOST": HOST, "NATS_SERVER_NAME": node.name,
                "NATS_CLIENT_PORT": str(node.client_port),
                "NATS_CLUSTER_PORT": str(node.cluster_port),
                "NATS_MQTT_PORT": str(node.mqtt_port), "NATS_ROUTES": routes,
                "NATS_STORE_DIR": str(node.dir / "jetstream")}

    def start(self, index: int | None = None, timeout: float = 60.0) -> None:
        """Start one node (or all), and wait until each takes MQTT logins."""
        server = nats_server()
        if server is None:
            raise RuntimeError("nats-server is not installed (scripts/stack installs it)")
        chosen = self.nodes if index is None else [self.nodes[index]]
        for node in chosen:
            if node.running:
                continue
            with node.log_path.open("ab") as log:
                node.proc = subprocess.Popen(
                    [server, "-c", str(self.config_dir / "nats-server.conf")],
                    env=self._env(node), cwd=self.config_dir, stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
        deadline = time.monotonic() + timeout
        for node in chosen:
            # MQTT logins work once JetStream has a leader (retained store ready)
            while not self._can_login(self._probe_user, node.index):
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited:\n{node.log()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} took no MQTT login within "
                                       f"{timeout} s:\n{node.log()[-3000:]}")
                time.sleep(0.2)

    def kill(self, index: int) -> None:
        """SIGKILL: the node crashes (its clients' connections drop, no goodbye)."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)

    def stop(self) -> None:
        for node in self.nodes:
            proc, node.proc = node.proc, None
            terminate(proc, 10)

    def log(self) -> str:
        return "\n".join(f"----- {node.name}\n{node.log()[-3000:]}" for node in self.nodes)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False
