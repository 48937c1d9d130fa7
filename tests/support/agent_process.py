"""The agent as its own process (``python -m edge_agent``), its output in a log file.

A pipe that nobody reads would fill up and stall the agent's logging, so the output
goes to a file that tests can read at any time (``log()``), and show on failure.
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


class AgentProcess:
    """One agent process; ``start()`` again after ``stop()`` runs a new one, same log."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        # PYTHONFAULTHANDLER: a SIGABRT makes the process print every thread's stack to
        # its log (time_sigterm sends one to an agent that does not stop)
        env = {**os.environ, **self.env, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
               "PYTHONFAULTHANDLER": "1"}
        env.setdefault("LOG_LEVEL", "DEBUG")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent"], env=env,
                                         cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send ``sig`` and wait for the exit code (None if it was never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
            raise

    def kill(self) -> None:
        """SIGKILL: no goodbye, the broker's will speaks for the agent."""
        self.stop(signal.SIGKILL)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.alive:
            self.stop(signal.SIGKILL)
