"""Registry token requests ask for what the agent needs (issue 9, finding 13).

The registry's challenge may name more than the request needs (``pull,push``, as some
registries send for a plain manifest request); the agent asks its token service for
``repository:<name>:pull`` only, as Docker does, and never holds a token that could push.
A real token service (tests/support/tokenauth.py) in front of the real registry records
what was asked; the daemon pulls through it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from edge_agent.agent.errors import RegistryError
from edge_agent.agent.registry import RegistryClient
from tests.support.device import Device, publish
from tests.support.images import remove_repo_images
from tests.support.tokenauth import SERVICE, TokenAuthRegistry


@pytest.fixture
def front(registry: str) -> Iterator[TokenAuthRegistry]:
    with TokenAuthRegistry(username="robot", password="r0bot-pw", upstream=registry) as started:
        yield started


def test_the_agent_asks_for_pull_only_whatever_the_challenge_names(  # noqa: PLR0913, PLR0917
    front: TokenAuthRegistry, unique_repo: str, container_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    monkeypatch.setenv("DOCKER_CONFIG", str(front.docker_config_dir()))
    device = Device(repo=front.repo(unique_repo), name=container_name,
                    data_dir=tmp_path / "data")
    device.write_tag("1.0")
    try:
        agent = device.agent()
        result = agent.check()
        assert result is not None and result.outcome == "updated"
        assert device.serving() == "1.0"

        _, name = unique_repo.split("/", 1)
        asked = front.requests_from("edge-agent")
        assert asked, "the agent never asked the token service"
        assert {(r.scope, r.service, r.user) for r in asked} == {
            (f"repository:{name}:pull", SERVICE, "robot")}
    finally:
        remove_repo_images(device.repo, client=docker_client)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b'{"token": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "unreadable answer"),
        (b'{"token": "' + b"x" * (2 << 20) + b'"}', "unreadable answer"),
        (b'{"token": "t", "expires_in": NaN}', "unreadable answer"),
        (b"[]", "unreadable answer"),
        (b'{"token": 5}', "sent no token"),
        (b"\xff\xfe", "unreadable answer"),
    ],
    ids=["deep", "huge", "nan", "array", "number", "binary"],
)
def test_a_hostile_token_answer_is_a_clear_error(
    front: TokenAuthRegistry, unique_repo: str, answer: bytes, error: str,
) -> None:
    front.token_answer = answer
    client = RegistryClient(front.repo(unique_repo), {"auths": {front.address: {
        "username": front.username, "password": front.password}}})
    with pytest.raises(RegistryError, match=error):
        client.digest("1.0")
    client.close()
