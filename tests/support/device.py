"""A device under test: a data dir, a published port and an in-process agent.

The agent is the real one (real Docker, real registry); tests drive it one check at a
time through ``Agent.check()``, the loop body, so each step can be asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from edge_agent.agent.config import load_settings
from edge_agent.agent.loop import Agent
from tests.support import REPO_ROOT, listening_port
from tests.support.images import Kind, build_and_push, remove_repo_images


@dataclass
class Device:
    """One simulated device: its repository, container name, DATA_DIR and app port."""

    repo: str
    name: str
    data_dir: Path
    # below the ephemeral range: an outgoing connection cannot take it meanwhile (a taken
    # port is now remembered as a failed update)
    port: int = field(default_factory=listening_port)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_config({"ports": {"8080/tcp": self.port}})

    def agent_env(self, **extra: str) -> dict[str, str]:
        return {
            "CONTAINER_IMAGE": self.repo,
            "CONTAINER_NAME": self.name,
            "DATA_DIR": str(self.data_dir),
            "DEVICE_ID": self.name,
            "POLL_INTERVAL": "0.05",
            "HEALTH_TIMEOUT": "2",
            **self.env,
            **extra,
        }

    def agent(self, **extra: str) -> Agent:
        """A fresh agent for this device; events are collected in ``agent.events``."""
        agent = Agent(load_settings(self.agent_env(**extra)))
        events: list[dict[str, Any]] = []
        agent.status.event_sinks.append(events.append)
        agent.events = events  # type: ignore[attr-defined]
        return agent

    def spawn(self, **extra: str) -> subprocess.Popen[bytes]:
        """The agent as its own process (``python -m edge_agent``), for kill tests."""
        env = {**os.environ, **self.agent_env(**extra), "PYTHONPATH": str(REPO_ROOT)}
        return subprocess.Popen(
            [sys.executable, "-m", "edge_agent"],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def write_tag(self, tag: str) -> None:
        (self.data_dir / "tag").write_text(tag + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        (self.data_dir / "docker_config.json").write_text(json.dumps(config))

    def serving(self) -> str | None:
        """The version the app answers on its port, or None when nothing answers."""
        try:
            response = requests.get(f"http://127.0.0.1:{self.port}/version", timeout=1)
        except requests.RequestException:
            return None
        return response.text.strip() if response.ok else None

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads((self.data_dir / "status.json").read_text())
        return document


def publish(repo: str, tag: str, version: str, kind: Kind = "ok") -> str:
    """Push a test image to the registry and forget it locally, so the agent must pull it."""
    digest = build_and_push(repo, tag, version, kind)
    remove_repo_images(repo)
    return digest


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=15)
