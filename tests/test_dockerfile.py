"""The Dockerfile builds, and the image it makes runs the agent for real.

The default BASE_IMAGE (python:3.11-slim) cannot be pulled here, so the build uses a
local Debian bookworm base with python3 (tests/support/base_image.py; made once and
cached) and the dependency wheels from the host's pip, so the build needs no network.
The image built last stays tagged ``edge-agent-test-image:cache`` so that the daemon's
build cache makes the next run take seconds; older builds are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from edge_agent.agent.config import SETTINGS
from tests.support import REPO_ROOT, wait_until
from tests.support.base_image import (
    base_image,
    build_context,
    context_names,
    daemon_arch,
    dependency_wheelhouse,
)
from tests.support.images import build_and_push

IMAGE_REPOSITORY = "edge-agent-test-image"
CACHE_TAG = f"{IMAGE_REPOSITORY}:cache"
MAX_ADDED_BYTES = 30 * 1000 * 1000
DOCKER_SOCKET = "/var/run/docker.sock"
AGENT_UID = 10001

pytestmark = pytest.mark.stack


def _build(client: docker.DockerClient, tag: str, buildargs: dict[str, str]) -> str:
    wheelhouse = dependency_wheelhouse(daemon_arch(client))
    stream = client.api.build(
        fileobj=build_context(wheelhouse), custom_context=True, tag=tag, rm=True,
        forcerm=True, decode=True, buildargs=buildargs,
    )
    output: list[str] = []
    image_id = None
    for chunk in stream:
        if "stream" in chunk:
            output.append(str(chunk["stream"]))
        if "error" in chunk:
            tail = "".join(output)[-4000:]
            pytest.fail(f"docker build failed: {chunk['error']}\n{tail}", pytrace=False)
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    assert image_id is not None, "".join(output)[-4000:]
    return image_id


@pytest.fixture(scope="module")
def base(docker_client: docker.DockerClient) -> str:
    return base_image(docker_client)


@pytest.fixture(scope="module")
def image(docker_client: docker.DockerClient, base: str) -> Iterator[str]:
    """The Dockerfile built on ``base``; yields the image id."""
    tag = f"{IMAGE_REPOSITORY}:{uuid.uuid4().hex[:8]}"
    image_id = _build(docker_client, tag, {
        "BASE_IMAGE": base,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "/src/wheelhouse",
        "REVISION": "test",
    })
    try:
        yield image_id
    finally:
        _keep_as_cache(docker_client, tag, image_id)


def _keep_as_cache(client: docker.DockerClient, tag: str, image_id: str) -> None:
    """Move the cache tag to this build, drop our own tag, and delete the build that had
    the cache tag before, unless something else (another test run) still uses it."""
    try:
        previous: str | None = client.images.get(CACHE_TAG).id
    except docker.errors.ImageNotFound:
        previous = None
    client.images.get(image_id).tag(CACHE_TAG)
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(tag)
    if previous and previous != image_id:
        with contextlib.suppress(docker.errors.APIError):
            if not client.images.get(previous).attrs.get("RepoTags"):
                client.images.remove(previous)  # without force: refused when in use


def _run(client: docker.DockerClient, image: str, command: list[str]) -> tuple[int, str]:
    container = client.containers.create(image, command)
    try:
        container.start()
        status = container.wait(timeout=60)
        logs = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        container.remove(force=True)
    return int(status["StatusCode"]), logs


def test_dockerfile_defaults_to_official_slim_python_and_names_no_architecture() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert [line for line in instructions if line.startswith("FROM")] == [
        "FROM ${BASE_IMAGE} AS builder", "FROM ${BASE_IMAGE}"]
    body = "\n".join(instructions).lower()
    for arch in ("amd64", "x86_64", "arm64", "aarch64", "armv7", "armhf", "arm/v7", "--platform"):
        assert arch not in body, arch


def test_build_context_is_the_package_only() -> None:
    names = context_names(build_context())
    assert "pyproject.toml" in names
    assert "edge_agent/agent/loop.py" in names
    assert "edge_agent/protocol/mqtt.py" in names
    assert not [n for n in names if n.startswith(("tests/", ".git/", "data/", "docs/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_help_lists_every_setting(docker_client: docker.DockerClient, image: str) -> None:
    code, out = _run(docker_client, image, ["edge-agent", "--help"])
    assert code == 0, out
    for setting in SETTINGS:
        assert setting.name in out, setting.name


def test_bridge_and_ctl_run_from_the_same_image(
    docker_client: docker.DockerClient, image: str
) -> None:
    for program in ("edge-bridge", "edge-ctl"):
        code, out = _run(docker_client, image, [program, "--help"])
        assert code == 0, f"{program}: {out}"
        assert f"usage: {program}" in out


def test_image_can_verify_signatures(docker_client: docker.DockerClient, image: str) -> None:
    """TRUSTED_KEYS works in the device image: cryptography is installed."""
    code, out = _run(docker_client, image, ["/opt/edge-agent/bin/python", "-c",
                                            "import edge_agent.agent.trust"])
    assert code == 0, out


def test_image_metadata(docker_client: docker.DockerClient, image: str) -> None:
    config = docker_client.images.get(image).attrs["Config"]
    assert config["User"] == f"{AGENT_UID}:{AGENT_UID}"
    assert config["Healthcheck"]["Test"] == ["CMD", "edge-agent", "healthcheck"]
    assert config["Cmd"] == ["edge-agent"]
    assert not config.get("Entrypoint")
    labels = config["Labels"]
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.revision"] == "test"


def test_final_stage_has_no_build_tools_or_sources(
    docker_client: docker.DockerClient, image: str
) -> None:
    script = (
        "for tool in gcc cc make /opt/edge-agent/bin/pip; do "
        "command -v $tool >/dev/null 2>&1 && echo found $tool; done; "
        "ls -d /src /wheels 2>/dev/null; "
        "touch /app/data/probe && echo data-writable"
    )
    code, out = _run(docker_client, image, ["sh", "-c", script])
    assert code == 0, out
    assert "found" not in out and "/src" not in out and "/wheels" not in out, out
    assert "data-writable" in out


def test_added_layers_stay_small(
    docker_client: docker.DockerClient, image: str, base: str
) -> None:
    """The layers the Dockerfile adds on top of BASE_IMAGE (``docker history``)."""
    # docker's stubs leave APIClient.history untyped
    history: list[dict[str, Any]] = docker_client.api.history(image)  # type: ignore[no-untyped-call]
    base_history: list[dict[str, Any]] = docker_client.api.history(base)  # type: ignore[no-untyped-call]
    added = history[: len(history) - len(base_history)]
    # the rest of the history is the base itself
    assert history[len(added)]["Id"] == base_history[0]["Id"]
    total = sum(int(entry["Size"]) for entry in added)
    print(f"\nlayers added on top of BASE_IMAGE: {total / 1e6:.2f} MB")
    assert 0 < total < MAX_ADDED_BYTES


def test_healthcheck_turns_healthy_with_the_real_daemon(
    docker_client: docker.DockerClient,
    image: str,
    unique_repo: str,
    container_name: str,
    tmp_path: Path,
) -> None:
    """The agent in the image (non-root, the socket's group added) starts the app from
    the local registry, and the image's own HEALTHCHECK reports it healthy."""
    # A version of its own: the image id is then unique too, and no other test's cleanup
    # (which removes containers by image id) can take the app away mid-test.
    build_and_push(unique_repo, "1.0", f"1.0 {unique_repo}")
    data = tmp_path / "data"
    data.mkdir()
    (data / "docker_config.json").write_text(json.dumps({"labels": {"role": "app"}}))
    os.chown(data, AGENT_UID, AGENT_UID)
    socket_gid = os.stat(DOCKER_SOCKET).st_gid
    assert stat.S_ISSOCK(os.stat(DOCKER_SOCKET).st_mode)
    agent = docker_client.containers.run(
        image,
        name=f"{container_name}-agent",
        detach=True,
        environment={
            "CONTAINER_IMAGE": f"{unique_repo}:1.0",
            "CONTAINER_NAME": container_name,
            "DEVICE_ID": container_name,
            "TELEMETRY_INTERVAL": "2",
            "LOG_FORMAT": "json",
        },
        volumes={DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
                 str(data): {"bind": "/app/data", "mode": "rw"}},
        group_add=[str(socket_gid)],
        network_mode="host",  # the registry listens on the host's 127.0.0.1:5000
        # the image's HEALTHCHECK command, checked more often than in production
        healthcheck={"interval": 1_000_000_000, "timeout": 10_000_000_000, "retries": 3},
    )
    try:
        assert agent.attrs["Config"]["Healthcheck"]["Test"] == [
            "CMD", "edge-agent", "healthcheck"]

        def health() -> str | None:
            agent.reload()
            if agent.status != "running":
                raise AssertionError(f"agent exited: {agent.logs().decode(errors='replace')}")
            state = agent.attrs["State"].get("Health", {}).get("Status")
            return state if state == "healthy" else None

        try:
            app = wait_until(lambda: _running(docker_client, container_name), timeout=60,
                             message="the app container")
            assert app.labels.get("role") == "app"
            wait_until(lambda: _status(data).get("running", {}).get("tag") == "1.0",
                       timeout=60, message="status.json to show 1.0 running")
            wait_until(health, timeout=90, interval=0.5,
                       message="the agent container to be healthy")
        except TimeoutError as exc:
            logs = agent.logs().decode(errors="replace")[-3000:]
            raise AssertionError(f"{exc}\nstatus: {_status(data)}\nagent log:\n{logs}") from None
        for line in agent.logs().decode().splitlines():
            json.loads(line)  # LOG_FORMAT=json: one object per line
    finally:
        agent.remove(force=True)


def _status(data: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads((data / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    return document


def _running(client: docker.DockerClient, name: str) -> Any:
    try:
        container = client.containers.get(name)
    except docker.errors.NotFound:
        return None
    return container if container.status == "running" else None
