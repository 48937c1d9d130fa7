"""The bridge as its own process (``python -m edge_agent.bridge.cli``), as an operator runs
it: for edge-ctl's end-to-end tests, the rollout tests (which SIGKILL it and start it again
on the same ``BRIDGE_DATA_DIR``) and the benches. It listens on a free port (the line it
prints says which) and logs to a file; ``get``/``post`` speak to its API with the token.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from tests.support import REPO_ROOT, wait_until
from tests.support.broker import Broker
from tests.support.nats_cluster import NatsCluster

BRIDGE_USER = "bridge"
LISTENING = "edge-bridge listening on "


class BridgeProcess:
    """An ``edge-bridge`` logged in to ``broker`` as BRIDGE_USER (an operator the caller
    made), under ``prefix``; ``data_dir`` set gives it BRIDGE_DATA_DIR (its rollouts)."""

    def __init__(self, broker: Broker | NatsCluster, prefix: str, token: str, log_path: Path, *,  # noqa: PLR0913
                 data_dir: Path | None = None, log_level: str = "INFO",
                 **extra: str) -> None:
        settings = broker.settings(BRIDGE_USER, prefix=prefix)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MQTT_"))},
            "BRIDGE_TOKEN": token, "BRIDGE_PORT": "0", "LOG_LEVEL": log_level,
            "MQTT_HOST": settings.host, "MQTT_PORT": str(settings.port),
            "MQTT_USERNAME": BRIDGE_USER, "MQTT_PASSWORD": broker.passwords[BRIDGE_USER],
            "MQTT_TOPIC_PREFIX": prefix, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
            **({"BRIDGE_DATA_DIR": str(data_dir)} if data_dir is not None else {}),
            **extra,
        }
        self.log_path = log_path
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def start(self) -> Self:
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_agent.bridge.cli"], env=self.env, cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(LISTENING):
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"edge-bridge did not start: {line!r}\n{self.log()[-3000:]}")
        self.url = line.split()[-1]
        wait_until(lambda: self.get("/healthz").status_code == 200, timeout=15,
                   message="the bridge's broker connection")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.stop(signal.SIGKILL)

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.url}{path}", timeout=30)

    def post(self, path: str, body: Any = None, data: bytes | None = None) -> requests.Response:
        if data is not None:
            return self.session.post(f"{self.url}{path}", data=data, timeout=30)
        return self.session.post(f"{self.url}{path}", json=body, timeout=30)

    def wait_devices(self, count: int, timeout: float = 20) -> None:
        """Until the bridge shows ``count`` devices with their groups (retained states
        arrive a moment after it connects)."""
        def known() -> bool:
            devices = self.get("/api/v1/devices").json()["devices"]
            return sum(1 for d in devices if "groups" in (d.get("state") or {})) >= count
        wait_until(known, timeout=timeout, interval=0.2, message=f"{count} devices known")

    def wait_rollout(self, rollout_id: str, states: Sequence[str], timeout: float
                     ) -> dict[str, Any]:
        """The rollout's document once its state is one of ``states``."""
        def ended() -> dict[str, Any] | None:
            document: dict[str, Any] = self.get(f"/api/v1/rollouts/{rollout_id}").json()
            return document if document.get("state") in states else None
        return wait_until(ended, timeout=timeout, interval=0.5,
                          message=f"rollout {rollout_id} to be {' or '.join(states)}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
