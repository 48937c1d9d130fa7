"""docker-compose.yml is valid (Debian's docker-compose), wires what the README says, and
the example files in data/ are accepted by the agent and by the real Docker daemon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import docker
import pytest
import yaml

from edge_agent.agent.engine import Engine
from edge_agent.agent.store import DataDir, parse_run_config
from tests.support import REPO_ROOT
from tests.support.images import build_and_push

COMPOSE_ENV = {"DOCKER_GID": "4242", "CONTAINER_IMAGE": "registry.example.com/acme/app",
               "DEVICE_ID": "dev1"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is missing: run scripts/stack (it installs it)",
                    pytrace=False)
    environ = {k: v for k, v in os.environ.items()
               if k not in (*COMPOSE_ENV, "BASE_IMAGE", "BRIDGE_PUBLISH", "DEVICE_GROUPS")}
    return subprocess.run([compose, "-f", str(REPO_ROOT / "docker-compose.yml"), "config"],
                          env={**environ, **env}, capture_output=True, text=True, timeout=60,
                          check=False, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    result = compose_config(COMPOSE_ENV)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = yaml.safe_load(result.stdout)
    return loaded


def test_services_broker_agent_bridge(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {"mosquitto", "agent", "bridge"}


def test_agent_has_the_socket_its_group_and_data(config: dict[str, Any]) -> None:
    agent = config["services"]["agent"]
    assert agent["group_add"] == ["4242"]
    volumes = agent["volumes"]
    assert "/var/run/docker.sock:/var/run/docker.sock:rw" in volumes
    assert f"{REPO_ROOT / 'data'}:/app/data:rw" in volumes
    env = agent["environment"]
    assert env["CONTAINER_IMAGE"] == "registry.example.com/acme/app"
    assert env["MQTT_HOST"] == "mosquitto"
    assert env["MQTT_USERNAME"] == env["DEVICE_ID"] == "dev1"  # the ACL matches on it
    assert env["MQTT_PASSWORD_FILE"] == "/run/secrets/mqtt-password"
    assert agent["build"]["context"] == str(REPO_ROOT)
    assert agent["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert "healthcheck" not in agent  # the image's own HEALTHCHECK
    assert not agent.get("privileged")


def test_bridge_runs_from_the_same_image(config: dict[str, Any]) -> None:
    bridge = config["services"]["bridge"]
    assert bridge["image"] == config["services"]["agent"]["image"]
    assert bridge["command"] == ["edge-bridge"]
    assert bridge["environment"]["BRIDGE_HOST"] == "0.0.0.0"
    assert bridge["environment"]["BRIDGE_TOKEN_FILE"].startswith("/run/secrets/")
    assert bridge["ports"] == ["127.0.0.1:8080:8080/tcp"]
    # the image's HEALTHCHECK is the agent's: the bridge needs its own
    assert "healthz" in " ".join(bridge["healthcheck"]["test"])


def test_broker_uses_the_repository_config(config: dict[str, Any]) -> None:
    broker = config["services"]["mosquitto"]
    assert f"{REPO_ROOT / 'mosquitto'}:/mosquitto/config:ro" in broker["volumes"]
    conf = (REPO_ROOT / "mosquitto" / "mosquitto.conf").read_text()
    # the paths the compose file mounts are the ones the config reads
    for path in ("/mosquitto/config/passwd", "/mosquitto/config/acl", "/mosquitto/certs/",
                 "/mosquitto/data/"):
        assert path in conf, path
    assert "127.0.0.1:1883:1883/tcp" in broker["ports"]


def test_secrets_come_from_files(config: dict[str, Any]) -> None:
    assert {name: s["file"] for name, s in config["secrets"].items()} == {
        name: str(REPO_ROOT / "secrets" / name)
        for name in ("mqtt-password", "bridge-token", "bridge-mqtt-password")
    }


def test_settings_can_be_overridden(config: dict[str, Any]) -> None:
    result = compose_config({**COMPOSE_ENV, "BASE_IMAGE": "arm64v8/python:3.11-slim",
                             "BRIDGE_PUBLISH": "0.0.0.0:9000", "DEVICE_GROUPS": "lab,eu"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["agent"]["build"]["args"]["BASE_IMAGE"] == "arm64v8/python:3.11-slim"
    assert services["agent"]["environment"]["DEVICE_GROUPS"] == "lab,eu"
    assert services["bridge"]["ports"] == ["0.0.0.0:9000:8080/tcp"]


@pytest.mark.parametrize("missing", ["DOCKER_GID", "CONTAINER_IMAGE", "DEVICE_ID"])
def test_required_variables_are_named_when_missing(missing: str) -> None:
    env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
    result = compose_config(env)
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


# -- data/ -------------------------------------------------------------------------------
def test_example_tag_is_valid() -> None:
    assert DataDir(REPO_ROOT / "data").read_tag() == "1.0"


def test_example_run_config_is_accepted_by_the_daemon(
    docker_client: docker.DockerClient, unique_repo: str, container_name: str
) -> None:
    """The example creates a real container with every setting in place."""
    raw = json.loads((REPO_ROOT / "data" / "docker_config.json").read_text())
    run_config = parse_run_config(raw)
    assert run_config.warnings == ()
    build_and_push(unique_repo, "1.0", f"1.0 {unique_repo}")
    engine = Engine(docker_client)
    engine.validate_run_kwargs(run_config.kwargs)
    container_id = engine.create(f"{unique_repo}:1.0", container_name, run_config.kwargs,
                                 {"io.edge-agent.test": "1"})
    try:
        attrs = docker_client.api.inspect_container(container_id)
        host = attrs["HostConfig"]
        assert host["RestartPolicy"]["Name"] == "unless-stopped"
        assert host["LogConfig"] == {"Type": "json-file",
                                     "Config": {"max-size": "10m", "max-file": "3"}}
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "80"}]}
        assert "APP_MODE=production" in attrs["Config"]["Env"]
        assert attrs["Config"]["Labels"]["com.example.role"] == "app"
    finally:
        engine.remove(container_id)


def test_data_readme_explains_every_example_key() -> None:
    readme = (REPO_ROOT / "data" / "README.md").read_text()
    for key in json.loads((REPO_ROOT / "data" / "docker_config.json").read_text()):
        assert f"| `{key}` |" in readme, key


def test_gitignore_keeps_secrets_and_agent_state_out() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "secrets/bridge-token", "mosquitto/passwd",
         "mosquitto/certs/server.key", "data/state.json", "data/status.json"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    ).stdout.split()
    assert ignored == ["secrets/bridge-token", "mosquitto/passwd", "mosquitto/certs/server.key",
                       "data/state.json", "data/status.json"]
