"""Shared fixtures for tests against the real stack (scripts/stack).

- ``docker_client``: docker-py client; the session FAILS (not skips) without a daemon.
- ``registry``: address of the shared registry (127.0.0.1:5000), checked to answer.
- ``registry_log``: a ``RegistryLog`` for the shared registry.
- ``test_id``: 8 hex digits unique to the test; ``container_name`` and ``unique_repo``
  are derived from it.
- ``container_name``: ``edge-test-<id>``; afterwards ``<name>``, ``<name>-previous``,
  ``<name>-next``, any container whose name starts with ``<name>`` and any labelled
  ``io.edge-agent.test=<id>`` are removed.
- ``unique_repo``: ``127.0.0.1:5000/t<id>/app``; afterwards the same containers, any
  container of that repository, and the repository's local images are removed.
- ``private_registry``: factory for ``PrivateRegistry`` instances, all closed afterwards.

Tests that use any of these get the ``stack`` marker automatically.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import docker
import docker.errors
import pytest
import requests
from hypothesis import HealthCheck, settings

from tests.support import DEFAULT_REGISTRY
from tests.support.containers import remove_test_containers
from tests.support.images import TEST_IMAGE_LABEL, remove_registry_images, remove_repo_images
from tests.support.registry import PrivateRegistry, RegistryLog, registry_answers

# Property tests judge behaviour, never speed: on a loaded CI machine a per-example
# deadline or the "too slow" health check would fail a correct run.
settings.register_profile("edge-agent", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edge-agent")

CONTAINER_PREFIX = "edge-test-"

STACK_FIXTURES = frozenset(
    {
        "docker_client",
        "registry",
        "registry_log",
        "unique_repo",
        "container_name",
        "private_registry",
    }
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Test images left untagged by an earlier, interrupted run keep their layers on the
    daemon, and a pull that finds its layers downloads nothing: start without them. Once,
    before any test: not in each pytest-xdist worker, where it would delete the parent
    layers of another worker's build in progress."""
    if hasattr(session.config, "workerinput"):
        return
    with contextlib.suppress(docker.errors.DockerException,
                             requests.exceptions.RequestException, OSError):
        client = docker.from_env(version="auto")
        try:
            client.images.prune(filters={"dangling": True, "label": TEST_IMAGE_LABEL})
        finally:
            client.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STACK_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    error: Exception | None = None
    try:
        client = docker.from_env(version="auto")
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        error = exc
    if error is not None:  # failed outside the except block: no exception chain shown
        pytest.fail(
            f"the Docker daemon is unreachable ({error}); run scripts/stack first",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def registry() -> str:
    status = registry_answers(DEFAULT_REGISTRY)
    if status != 200:
        pytest.fail(
            f"the test registry {DEFAULT_REGISTRY} does not answer GET /v2/ "
            f"(status {status}); run scripts/stack first",
            pytrace=False,
        )
    return DEFAULT_REGISTRY


@pytest.fixture(scope="session")
def registry_log(registry: str) -> RegistryLog:
    log = RegistryLog(address=registry)
    if not log.path.exists():
        pytest.fail(
            f"no registry log at {log.path}: was the registry started by scripts/stack "
            "with the same STACK_DIR?",
            pytrace=False,
        )
    return log


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def container_name(docker_client: docker.DockerClient, test_id: str) -> Iterator[str]:
    name = f"{CONTAINER_PREFIX}{test_id}"
    yield name
    # <name>, <name>-previous and <name>-next all start with <name>
    remove_test_containers(docker_client, test_id, name)


@pytest.fixture
def unique_repo(docker_client: docker.DockerClient, registry: str, test_id: str) -> Iterator[str]:
    repo = f"{registry}/t{test_id}/app"
    yield repo
    remove_test_containers(docker_client, test_id, f"{CONTAINER_PREFIX}{test_id}", repo)
    remove_repo_images(repo, client=docker_client)


@pytest.fixture
def private_registry(
    docker_client: docker.DockerClient,
) -> Iterator[Callable[..., PrivateRegistry]]:
    """``private_registry(username=None, password=None)`` starts a ``PrivateRegistry``.
    Afterwards all of them are closed (stopped, storage removed) and local images of
    their repositories removed."""
    made: list[PrivateRegistry] = []

    def make(*, username: str | None = None, password: str | None = None) -> PrivateRegistry:
        reg = PrivateRegistry(username=username, password=password)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        remove_registry_images(reg.address, client=docker_client)
        reg.close()
