"""The bridge as its own process (``python -m edge_agent.bridge.cli``), as an operator runs
it: for edge-ctl's end-to-end tests and the benches. It listens on a free port (the
line it prints says which) and logs to a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support import REPO_ROOT
from tests.support.broker import Broker

BRIDGE_USER = "bridge"
LISTENING = "edge-bridge listening on "


class BridgeProcess:
    """An ``edge-bridge`` logged in to ``broker`` as BRIDGE_USER (an operator the caller
    made), under ``prefix``; ``data_dir`` set gives it BRIDGE_DATA_DIR (its rollouts)."""

    def __init__(self, broker: Broker, prefix: str, token: str, log_path: Path, *,  # noqa: PLR0913
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
