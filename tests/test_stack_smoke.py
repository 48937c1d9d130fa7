"""Smoke tests of the test stack itself: images, the shared registry and its log,
private registries (restart, basic auth over plain http)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from tests.support import free_port, wait_until
from tests.support.containers import TEST_LABEL
from tests.support.images import (
    ImageBuildError,
    build_and_push,
    remove_registry_images,
    remove_repo_images,
)
from tests.support.registry import (
    PrivateRegistry,
    RegistryLog,
    manifest_digest,
    registry_answers,
    repo_path,
)


def http_get(url: str, timeout: float = 1.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body.decode()
    except (urllib.error.URLError, OSError):
        return None


def health_status(container: Container) -> str:
    container.reload()
    state = container.attrs["State"]
    if state["Status"] != "running":
        return str(state["Status"])
    return str(state.get("Health", {}).get("Status", "none"))


def test_ok_image_serves_its_version_and_stops_fast(
    docker_client: docker.DockerClient,
    unique_repo: str,
    container_name: str,
    test_id: str,
    registry_log: RegistryLog,
) -> None:
    mark = registry_log.mark()
    v1 = build_and_push(unique_repo, "v1", "v1")
    v2 = build_and_push(unique_repo, "v2", "v2")
    assert v1.startswith("sha256:")
    assert v2.startswith("sha256:")
    assert v1 != v2

    # the registry agrees, and so does the local image's RepoDigests
    assert manifest_digest(unique_repo, "v1") == v1
    assert manifest_digest(unique_repo, "v2") == v2
    assert manifest_digest(unique_repo, "nope") is None
    image = docker_client.images.get(f"{unique_repo}:v1")
    assert f"{unique_repo}@{v1}" in image.attrs["RepoDigests"]
    assert image.attrs["Config"].get("Healthcheck") is None  # kind "ok": no HEALTHCHECK

    # the push is in the registry log
    registry_log.sync()
    path = repo_path(unique_repo)
    assert registry_log.pushes(unique_repo, since=mark) == 2
    assert registry_log.count("PUT", f"/v2/{path}/manifests/v1", since=mark, status=201) == 1
    assert registry_log.count("POST", f"/v2/{path}/blobs/uploads/", since=mark) >= 1
    assert registry_log.count("HEAD", f"/v2/{path}/manifests/nope", since=mark, status=404) == 1
    assert registry_log.blob_gets(unique_repo, since=mark) == 0  # nothing pulled

    port = free_port()
    container = docker_client.containers.run(
        f"{unique_repo}:v1",
        name=container_name,
        detach=True,
        ports={"8080/tcp": ("127.0.0.1", port)},
        labels={TEST_LABEL: test_id},
    )
    body = wait_until(
        lambda: http_get(f"http://127.0.0.1:{port}/version"), timeout=10, message="httpd"
    )
    assert body == "v1"

    # the TERM trap works: docker stop does not wait for its timeout
    started = time.monotonic()
    container.stop(timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"docker stop took {elapsed:.1f} s"
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 143


def test_health_kinds(
    docker_client: docker.DockerClient,
    unique_repo: str,
    container_name: str,
) -> None:
    for kind in ("healthy", "unhealthy", "exits"):
        build_and_push(unique_repo, kind, f"v-{kind}", kind)
    containers = {
        kind: docker_client.containers.run(
            f"{unique_repo}:{kind}", name=f"{container_name}-{kind}", detach=True
        )
        for kind in ("healthy", "unhealthy", "exits")
    }
    wait_until(
        lambda: health_status(containers["healthy"]) == "healthy",
        timeout=10,
        message="the healthy image to turn healthy",
    )
    wait_until(
        lambda: health_status(containers["unhealthy"]) == "unhealthy",
        timeout=10,
        message="the unhealthy image to turn unhealthy",
    )
    wait_until(
        lambda: health_status(containers["exits"]) == "exited",
        timeout=10,
        message="the exits image to exit",
    )
    assert containers["exits"].attrs["State"]["ExitCode"] == 1


def test_registry_log_tells_a_pull_from_a_manifest_check(
    docker_client: docker.DockerClient,
    unique_repo: str,
    registry_log: RegistryLog,
) -> None:
    digest = build_and_push(unique_repo, "1.0", "1.0")
    remove_repo_images(unique_repo, client=docker_client)

    mark = registry_log.mark()
    assert manifest_digest(unique_repo, "1.0") == digest
    registry_log.sync()
    assert registry_log.manifest_requests(unique_repo, "HEAD", since=mark) == 1
    assert registry_log.blob_gets(unique_repo, since=mark) == 0

    mark = registry_log.mark()
    docker_client.images.pull(unique_repo, tag="1.0")
    registry_log.sync()
    assert registry_log.blob_gets(unique_repo, since=mark) >= 2  # config + layers


def test_private_registry_stop_and_start(
    docker_client: docker.DockerClient,
    private_registry: Callable[..., PrivateRegistry],
    test_id: str,
) -> None:
    reg = private_registry()
    repo = reg.repo(f"t{test_id}/app")
    digest = build_and_push(repo, "v1", "v1")
    assert reg.log.pushes(repo) == 1

    reg.stop()
    assert registry_answers(reg.address) is None
    assert not reg.running
    remove_registry_images(reg.address, client=docker_client)
    with pytest.raises(docker.errors.APIError):
        docker_client.images.pull(repo, tag="v1")

    reg.start()
    assert reg.address == f"127.0.0.1:{reg.port}"
    assert manifest_digest(repo, "v1") == digest  # same storage
    docker_client.images.pull(repo, tag="v1")


def test_private_registry_basic_auth_over_http(
    docker_client: docker.DockerClient,
    private_registry: Callable[..., PrivateRegistry],
    test_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg = private_registry(username="edge", password="s3cret pass")
    assert registry_answers(reg.address) == 401
    repo = reg.repo(f"t{test_id}/app")

    with pytest.raises(ImageBuildError, match="no basic auth credentials"):
        build_and_push(repo, "v1", "v1")  # push without credentials
    digest = build_and_push(repo, "v1", "v1", auth=reg.auth_config)

    with pytest.raises(urllib.error.HTTPError) as excinfo:
        manifest_digest(repo, "v1")
    assert excinfo.value.code == 401
    assert manifest_digest(repo, "v1", auth=reg.auth) == digest

    # a pull without credentials is refused ...
    remove_registry_images(reg.address, client=docker_client)
    mark = reg.log.mark()
    with pytest.raises(docker.errors.APIError):
        docker_client.images.pull(repo, tag="v1")
    reg.log.sync(auth=reg.auth)
    assert reg.log.count(None, "/v2/", since=mark, status=401) >= 1
    assert reg.log.blob_gets(repo, since=mark) == 0

    # ... and accepted with them from a DOCKER_CONFIG directory (config.json "auths")
    config_dir = reg.docker_config_dir(tmp_path / "docker-config")
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    authed = docker.from_env(version="auto")  # reads DOCKER_CONFIG at creation
    try:
        image = authed.images.pull(repo, tag="v1")
    finally:
        authed.close()
    assert f"{repo}@{digest}" in image.attrs["RepoDigests"]
