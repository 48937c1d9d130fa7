"""Test helpers shared by the test suite: images (tests.support.images), registries and
their logs (tests.support.registry), and small utilities.

Everything here talks to the stack that ``scripts/stack`` brings up: a Docker daemon and
a registry on 127.0.0.1:5000 whose log is ``$STACK_DIR/registry.log``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "DEFAULT_REGISTRY",
    "REPO_ROOT",
    "free_port",
    "stack_dir",
    "terminate",
    "wait_until",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]

#: the shared registry that scripts/stack starts (override with REGISTRY_ADDR)
DEFAULT_REGISTRY = os.environ.get("REGISTRY_ADDR", "127.0.0.1:5000")


def stack_dir() -> Path:
    """Where scripts/stack keeps logs and state ($STACK_DIR, default /tmp/edge-agent-stack)."""
    return Path(os.environ.get("STACK_DIR", "/tmp/edge-agent-stack"))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listening_port(rng: random.Random | None = None) -> int:
    """A port that is free now and below the ephemeral range (``free_port`` picks from
    that range, where any outgoing connection may take it in the meantime)."""
    rng = rng or random.Random()
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    Raises TimeoutError naming ``message`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM a process we started (it may save state on the way out), SIGKILL it if it
    has not exited within ``timeout``, and reap it. None or an exited process is fine."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
