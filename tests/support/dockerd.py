"""A second Docker daemon of the test's own, on its own socket, data root, exec root and
bridge, so a test can fill its disk or restart it without touching the shared daemon.

Started as::

    dockerd --host unix://<dir>/docker.sock --data-root <dir>/root --exec-root <dir>/exec
            --pidfile <dir>/docker.pid --config-file <dir>/daemon.json
            --bridge <own bridge> --iptables=false --ip-masq=false --ip6tables=false

Never ``--bridge none``: a daemon started that way deletes the host's ``docker0``
interface (moby's ``removeDefaultBridgeInterface``), which breaks every container of
the shared daemon. Instead the daemon gets a bridge of its own (``edgebr<hex>``, created
here with its own /24 and deleted at ``close()``), and no iptables rules. Containers of
this daemon get no published ports; tests reach the app with ``exec`` (``serving()``).

``size_mb`` puts the data root on a tmpfs of that size (overlay2 works on tmpfs), for
disk-full tests. Needs root.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

import docker
import docker.errors
import requests

from tests.support import terminate

__all__ = ["PrivateDockerd", "bridge_exists"]


def bridge_exists(name: str = "docker0") -> bool:
    return Path(f"/sys/class/net/{name}/bridge").exists()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class PrivateDockerd:
    """One private dockerd; ``stop()``/``start()`` keep its data (a daemon restart)."""

    def __init__(self, *, size_mb: int | None = None) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a private dockerd needs root")
        if shutil.which("dockerd") is None:
            raise RuntimeError("dockerd not installed: run scripts/stack")
        token = uuid.uuid4().hex[:8]
        # short: containerd's sockets live under the exec root (108-byte socket paths)
        self.dir = Path(tempfile.mkdtemp(prefix=f"edd{token[:4]}-", dir="/tmp"))
        self.data_root = self.dir / "root"
        self.exec_root = self.dir / "exec"
        self.socket = self.dir / "docker.sock"
        self.pidfile = self.dir / "docker.pid"
        self.log_path = self.dir / "dockerd.log"
        self.config_file = self.dir / "daemon.json"
        self.configure({})  # not /etc/docker/daemon.json
        self.data_root.mkdir()
        self.size_mb = size_mb
        self.bridge = f"edgebr{token}"[:15]
        self.subnet_octet = random.randint(16, 250)
        self._proc: subprocess.Popen[bytes] | None = None
        self._mounted = False
        self._bridge_made = False
        self.client: docker.DockerClient | None = None

    def configure(self, config: dict[str, object]) -> None:
        """This daemon's daemon.json (e.g. ``{"insecure-registries": [...]}``), read at
        the next ``start()``."""
        self.config_file.write_text(json.dumps(config) + "\n")

    @property
    def bridge_address(self) -> str:
        """The host's address on this daemon's bridge: local, but not loopback (it exists
        once the daemon has started)."""
        return f"10.231.{self.subnet_octet}.1"

    @property
    def base_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _prepare(self) -> None:
        if self.size_mb is not None and not self._mounted:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m",
                            "tmpfs", str(self.data_root)], check=True, capture_output=True)
            self._mounted = True
        if not self._bridge_made:
            _ip("link", "add", "name", self.bridge, "type", "bridge")
            self._bridge_made = True
            _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        self._prepare()
        args = [
            "dockerd", "--host", self.base_url, "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
            "--config-file", str(self.config_file), "--bridge", self.bridge,
            "--iptables=false", "--ip-masq=false", "--ip6tables=false",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self._proc = None
                raise RuntimeError(f"private dockerd exited at start:\n{tail}")
            if self._ping():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"private dockerd did not answer within {timeout} s")
            time.sleep(0.1)
        self.client = docker.DockerClient(base_url=self.base_url, version="auto")

    def _ping(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            probe = docker.DockerClient(base_url=self.base_url, version="auto", timeout=2)
        except (docker.errors.DockerException, requests.RequestException):
            return False
        try:
            return bool(probe.ping())
        except (docker.errors.DockerException, requests.RequestException):
            return False
        finally:
            probe.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, as an init system would: the daemon stops its containers and exits."""
        if self.client is not None:
            self.client.close()
            self.client = None
        proc, self._proc = self._proc, None
        terminate(proc, timeout)

    def serving(self, container: str) -> str | None:
        """What the app in ``container`` answers on its port 8080, via exec (no ports here)."""
        if self.client is None:
            return None
        try:
            result = self.client.containers.get(container).exec_run(
                ["/bin/busybox", "wget", "-q", "-O", "-",
                 "http://127.0.0.1:8080/version"])
        except (docker.errors.DockerException, requests.RequestException):
            return None
        if result.exit_code != 0:
            return None
        output = result.output
        if not isinstance(output, bytes):  # only a streamed exec gives an iterator
            return None
        return output.decode(errors="replace").strip()

    def close(self) -> None:
        """Remove every container, stop the daemon, unmount, delete the bridge and files."""
        if self.client is not None:
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                for container in self.client.containers.list(all=True):
                    container.remove(force=True)
        self.stop()
        if self._mounted:
            # overlay mounts of stopped containers are gone with the daemon; lazy just in case
            subprocess.run(["umount", "-l", str(self.data_root)], check=False,
                           capture_output=True)
            self._mounted = False
        if self._bridge_made:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("link", "delete", self.bridge)
            self._bridge_made = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
