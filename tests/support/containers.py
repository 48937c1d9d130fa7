"""The containers a test makes: the label that marks them and their removal.

Used by the ``container_name`` and ``unique_repo`` fixtures (tests/conftest.py), by tests
that start containers of their own and by the bench scripts.
"""

from __future__ import annotations

import contextlib

import docker
import docker.errors

#: label a test puts on containers it creates itself, with its test id as the value
TEST_LABEL = "io.edge-agent.test"


def remove_test_containers(
    client: docker.DockerClient,
    test_id: str,
    name: str,
    image_repo: str | None = None,
) -> None:
    """Force-remove every container of a test: by name prefix, by label, or by the
    repository its image reference names (the agent creates ``repo@digest``). Never by
    image id: identical test images share ids across repositories and tests."""
    doomed: dict[str, str] = {}
    try:
        for container in client.containers.list(all=True, filters={"name": name}):
            if (container.name or "").startswith(name) and container.id:
                doomed[container.id] = container.name or container.id
        labelled = client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={test_id}"})
        for container in labelled:
            if container.id:
                doomed[container.id] = container.name or container.id
        if image_repo:
            for container in client.containers.list(all=True):
                image = str(container.attrs.get("Config", {}).get("Image", ""))
                if image.startswith((f"{image_repo}:", f"{image_repo}@")) and container.id:
                    doomed[container.id] = container.name or container.id
    except docker.errors.APIError:
        pass
    for container_id in doomed:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(container_id, force=True, v=True)
