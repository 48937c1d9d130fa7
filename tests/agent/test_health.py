"""``edge-agent healthcheck`` (the image's HEALTHCHECK) means the agent does its job: its
loop is alive, the registry has answered it since it started, and the app runs. And
``status`` / ``healthcheck`` need only DATA_DIR (issue 17, items 4 and 7)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT, free_port
from tests.support.device import Device, publish


def edge_agent(command: str, data_dir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "CONTAINER_IMAGE"}
    return subprocess.run([sys.executable, "-m", "edge_agent.agent.cli", command],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**environ, "PYTHONPATH": str(REPO_ROOT),
                               "DATA_DIR": str(data_dir), **env})


def test_status_and_healthcheck_need_no_container_image(tmp_path: Path) -> None:
    for command in ("status", "healthcheck"):
        done = edge_agent(command, tmp_path)
        assert done.returncode == 1, done.stderr  # not 2: a configuration error
        assert "configuration error" not in done.stderr
        assert "status.json" in done.stderr


def test_healthy_only_once_the_registry_answered_and_the_app_runs(
    unique_repo: str, container_name: str, tmp_path: Path,
) -> None:
    publish(unique_repo, "1.0", "1.0")

    away = Device(repo=f"127.0.0.1:{free_port()}/app", name=container_name,
                  data_dir=tmp_path / "away")
    away.write_tag("1.0")
    agent = away.agent()
    agent.check()
    agent.close()
    done = edge_agent("healthcheck", away.data_dir, CONTAINER_IMAGE=away.repo)
    assert done.returncode == 1
    assert "unhealthy: the registry has not answered since the agent started" in done.stderr
    assert "registry unreachable at http://127.0.0.1:" in done.stderr

    waiting = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "notify")
    waiting.write_tag("1.0")
    agent = waiting.agent(UPDATE_MODE="notify")
    agent.check()  # an update is available; nothing runs yet
    agent.close()
    done = edge_agent("healthcheck", waiting.data_dir)
    assert done.returncode == 1
    assert "unhealthy: the app container is missing, not running" in done.stderr

    serving = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "serving")
    serving.write_tag("1.0")
    agent = serving.agent()
    agent.check()
    agent.close()
    assert serving.serving() == "1.0"
    done = edge_agent("healthcheck", serving.data_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("healthy:")
