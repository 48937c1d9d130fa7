"""What a new operator reads (issue 17, item 6): messages that say what to do, and
repeated conditions said once. On the real daemon and registry; the permission cases
run the agent's code in a subprocess without root's file-permission override."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest
from docker import auth as docker_auth
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.config import REPOSITORY_RE, load_settings
from edge_agent.agent.registry import in_container
from edge_agent.protocol.errors import ConfigError
from tests.support import REPO_ROOT, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.device import Device, publish

# Root ignores file modes; without these capabilities it meets them like any other user.
NO_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
          "--bounding-set=-dac_override,-dac_read_search"]


def run_without_dac(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NO_DAC, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env}, check=False)


def messages(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.WARNING) -> int:
    return len([r for r in caplog.records if text in r.getMessage() and r.levelno >= level])


# -- configuration -------------------------------------------------------------------
@pytest.mark.parametrize("image", ["https://reg.example.com/app", "http://127.0.0.1:5000/app:1.0"])
def test_a_scheme_in_container_image_is_a_configuration_error(image: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has a scheme; drop it"):
        load_settings({"CONTAINER_IMAGE": image, "DATA_DIR": str(tmp_path)})
    done = subprocess.run([sys.executable, "-m", "edge_agent.agent.cli"], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                               "CONTAINER_IMAGE": image, "DATA_DIR": str(tmp_path)})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("edge-agent: configuration error: CONTAINER_IMAGE:")


@given(st.from_regex(REPOSITORY_RE, fullmatch=True))
def test_every_repository_config_accepts_docker_accepts(repository: str) -> None:
    """Config is the one gate: what passes it must not make docker-py raise later."""
    docker_auth.resolve_repository_name(repository)


def test_unreadable_password_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(ConfigError, match=f"MQTT_PASSWORD_FILE: cannot read {missing}"):
        load_settings({"CONTAINER_IMAGE": "r/app", "DATA_DIR": str(tmp_path),
                       "MQTT_HOST": "localhost", "MQTT_PASSWORD_FILE": str(missing)})


# -- permissions ---------------------------------------------------------------------
def test_unwritable_data_dir_says_chown(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    data.chmod(0o755)
    done = run_without_dac(
        "import sys\n"
        "from pathlib import Path\n"
        "from edge_agent.agent.store import DataDir\n"
        "from edge_agent.files import StorageError\n"
        "try:\n"
        f"    DataDir(Path({str(data)!r})).write_tag('1.0')\n"
        "except StorageError as exc:\n"
        "    sys.exit(str(exc))\n")
    assert "Permission denied" in done.stderr, done.stderr
    assert f"chown -R 0 {data}" in done.stderr, done.stderr


def test_docker_socket_permission_denied_says_group_add(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    try:
        os.chown(path, 10001, 10001)
        path.chmod(0o660)  # as /var/run/docker.sock: only its owner and group
        done = run_without_dac(
            "import sys\n"
            "from edge_agent.agent.engine import Engine\n"
            "from edge_agent.agent.errors import DockerUnavailable\n"
            "try:\n"
            "    Engine.connect(timeout_s=10)\n"
            "except DockerUnavailable as exc:\n"
            "    sys.exit(str(exc))\n",
            DOCKER_HOST=f"unix://{path}")
    finally:
        listener.close()
    assert "permission denied on the Docker socket" in done.stderr, done.stderr
    assert "--group-add" in done.stderr


# -- said once, and what happened --------------------------------------------------------
def test_repeated_conditions_are_logged_once(
    private_registry: Any, container_name: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    reg = private_registry()
    dev = Device(repo=reg.repo("app"), name=container_name, data_dir=tmp_path / "data")
    publish(dev.repo, "1.0", "1.0")
    dev.write_tag("1.0")
    dev.write_config({"ports": {"8080/tcp": dev.port}, "name": "mine"})
    agent = dev.agent()
    for _ in range(3):
        agent.check()
    assert messages(caplog, "'name' is set by the agent; ignored") == 1

    reg.stop()
    for _ in range(3):
        agent.check()
    assert messages(caplog, "deciding with the local image of 1.0") == 1
    assert dev.serving() == "1.0"
    reg.start()
    agent.check()
    reg.stop()
    agent.check()  # unreachable again after an answer: news again
    assert messages(caplog, "deciding with the local image of 1.0") == 2


def test_install_adoption_and_recreate_say_what_happens(
    unique_repo: str, container_name: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, docker_client: docker.DockerClient,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    dev = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    publish(dev.repo, "1.0", "1.0")
    dev.write_tag("1.0")
    dev.agent().check()
    said = [r.getMessage() for r in caplog.records]
    assert any(f"installing {dev.name}: 1.0" in m for m in said), said
    assert not any("None ->" in m for m in said), said

    (dev.data_dir / "state.json").unlink()  # an agent that never saw this container
    caplog.clear()
    dev.agent().check()
    assert messages(caplog, f"adopted the running container {dev.name}", logging.INFO) == 1

    dev.write_config({"ports": {"8080/tcp": dev.port}, "environment": {"NEW": "1"}})
    caplog.clear()
    dev.agent().check()
    assert messages(caplog, f"recreating {dev.name} at 1.0: docker_config.json changed",
                    logging.INFO) == 1
    assert "NEW=1" in docker_client.containers.get(dev.name).attrs["Config"]["Env"]


def test_the_host_name_as_device_id_in_a_container_is_warned_about(
    unique_repo: str, container_name: str, tmp_path: Path,
) -> None:
    """Docker's default host name is the container id: a new device at every recreate."""
    if not in_container():
        pytest.skip("only a container has a random host name (the test stack runs in one)")
    dev = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    said = {}
    for named in (False, True):
        env = {k: v for k, v in dev.agent_env(FALLBACK_TAG="").items()
               if named or k != "DEVICE_ID"}
        agent = AgentProcess(env, tmp_path / f"agent-{named}.log").start()
        try:
            wait_until(lambda a=agent: "no desired tag" in a.log(), timeout=30,  # type: ignore[misc]
                       message="the agent's first check")
        finally:
            agent.stop()
        said[named] = "DEVICE_ID is not set: using the container's host name" in agent.log()
    assert said == {False: True, True: False}
