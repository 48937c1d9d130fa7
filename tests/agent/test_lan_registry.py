"""A plain-HTTP registry on the LAN (issue 17, item 1 and 5): the agent speaks to it the
way the Docker daemon does. A private dockerd lists the registry in its
``insecure-registries``; the registry listens on the private daemon's bridge address (a
local address that is not loopback, so nothing treats it as insecure by default)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from edge_agent.agent.engine import Engine, insecure_in
from edge_agent.agent.errors import RegistryError
from edge_agent.agent.registry import RegistryClient
from tests.support import free_port
from tests.support.device import Device
from tests.support.dockerd import PrivateDockerd
from tests.support.images import Kind, build_image, push_image
from tests.support.registry import PrivateRegistry


@pytest.fixture(scope="module")
def lan() -> Iterator[tuple[PrivateDockerd, PrivateRegistry]]:
    dockerd = PrivateDockerd()
    port = free_port()
    dockerd.configure({"insecure-registries": [f"{dockerd.bridge_address}:{port}"]})
    registry: PrivateRegistry | None = None
    try:
        dockerd.start()
        registry = PrivateRegistry(host=dockerd.bridge_address, port=port)
        yield dockerd, registry
    finally:
        if registry is not None:
            registry.close()
        dockerd.close()


def publish_on(dockerd: PrivateDockerd, repo: str, tag: str, version: str,
               kind: Kind = "ok") -> str:
    build_image(repo, tag, version, kind, client=dockerd.client)
    return push_image(repo, tag, client=dockerd.client)


def test_insecure_in_follows_names_and_cidrs() -> None:
    config = {"IndexConfigs": {"reg.lan:5000": {"Secure": False}, "docker.io": {"Secure": True}},
              "InsecureRegistryCIDRs": ["127.0.0.0/8", "192.168.7.0/24", "junk"]}
    assert insecure_in(config, "reg.lan:5000")
    assert insecure_in(config, "192.168.7.20:5000")
    assert insecure_in(config, "127.0.0.1:5000")
    assert not insecure_in(config, "docker.io")
    assert not insecure_in(config, "reg.lan:5001")
    assert not insecure_in(config, "10.0.0.1:5000")
    assert not insecure_in({}, "10.0.0.1:5000")


def test_check_pull_update_and_rollback_on_an_insecure_lan_registry(
    lan: tuple[PrivateDockerd, PrivateRegistry], container_name: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dockerd, registry = lan
    repo = registry.repo(f"app{container_name[-8:]}")
    kinds: tuple[tuple[str, Kind], ...] = (("1.0", "ok"), ("2.0", "ok"), ("3.0", "exits"))
    for tag, kind in kinds:
        publish_on(dockerd, repo, tag, tag, kind)
    monkeypatch.setenv("DOCKER_HOST", dockerd.base_url)  # the agent's daemon
    dev = Device(repo=repo, name=container_name, data_dir=tmp_path / "data")
    dev.write_config({})
    dev.write_tag("1.0")
    agent = dev.agent(FALLBACK_TAG="")
    try:
        assert (result := agent.check()) is not None and result.outcome == "updated"
        assert result.target.digest is not None  # asked the registry, over plain HTTP
        assert dockerd.serving(dev.name) == "1.0"
        dev.write_tag("2.0")
        assert (result := agent.check()) is not None and result.outcome == "updated"
        assert dockerd.serving(dev.name) == "2.0"
        dev.write_tag("3.0")
        assert (result := agent.check()) is not None and result.outcome == "rolled_back"
        assert dockerd.serving(dev.name) == "2.0"
    finally:
        agent.close()


def test_without_the_daemon_setting_the_error_says_what_to_configure(
    lan: tuple[PrivateDockerd, PrivateRegistry], docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The shared daemon does not list the registry: the check speaks HTTPS, as its pull
    would, and the error names the URL and the setting (not cut before the clue)."""
    _, registry = lan
    engine = Engine.connect()
    client = RegistryClient(registry.repo("app"))
    try:
        client.follow_daemon(engine.registry_is_insecure(registry.address))
        with pytest.raises(RegistryError) as failed:
            client.digest("1.0")
    finally:
        engine.close()
        client.close()
    message = str(failed.value)
    assert f"https://{registry.address}/v2/" in message, message
    assert "WRONG_VERSION_NUMBER" in message, message
    assert "insecure-registries" in message, message
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def test_an_unreachable_registry_is_named_by_url() -> None:
    port = free_port()
    client = RegistryClient(f"127.0.0.1:{port}/app")
    with pytest.raises(RegistryError, match=rf"at http://127\.0\.0\.1:{port}/v2/: .*refused"):
        client.digest("1.0")
    client.close()
    with pytest.raises(RegistryError) as failed:
        RegistryClient(f"127.0.0.1:{port}/app").digest("1.0")
    assert not str(failed.value).split(";")[0].endswith('"'), str(failed.value)
