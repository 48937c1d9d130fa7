"""Slow and hanging peers (issue 9, finding 6): the registry, the Docker daemon and the
broker behind a local proxy that stalls or drips (tests/support/slowproxy.py).

- In-process: a check against a stalled or dripping peer ends within its deadline with a
  clear error, the app keeps serving, and the next check succeeds once the peer is back.
- A real agent process (``python -m edge_agent``) stops on SIGTERM within its promise,
  ``deadline.STOP_PROMISE_S``, in every state: idle, checking against a dripping
  registry, pulling from a stalled registry, verifying, Docker daemon stalled, broker
  stalled, and a FIFO planted as the tag file.

Only the proxies misbehave; the shared daemon and registry behind them never stall.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from edge_agent.agent import deadline
from edge_agent.agent.config import load_settings
from edge_agent.agent.engine import Engine
from edge_agent.agent.loop import Agent
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.device import Device, publish
from tests.support.images import remove_repo_images
from tests.support.shutdown import time_sigterm
from tests.support.slowproxy import SlowProxy

PROMISE_S = deadline.STOP_PROMISE_S


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture
def registry_proxy(registry: str) -> Iterator[SlowProxy]:
    host, port = registry.rsplit(":", 1)
    with SlowProxy(upstream=(host, int(port))) as proxy:
        yield proxy


def _docker_socket() -> str:
    host = os.environ.get("DOCKER_HOST", "")
    return host.removeprefix("unix://") if host.startswith("unix://") else "/var/run/docker.sock"


@pytest.fixture
def docker_proxy() -> Iterator[SlowProxy]:
    # a short directory: unix socket paths are limited to 107 bytes
    directory = Path(tempfile.mkdtemp(prefix="slowdocker-"))
    with SlowProxy(upstream_unix=_docker_socket(), unix_path=directory / "docker.sock") as proxy:
        yield proxy
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def device(
    unique_repo: str, container_name: str, tmp_path: Path, registry_proxy: SlowProxy,
    docker_client: docker.DockerClient,
) -> Iterator[Device]:
    """A device whose CONTAINER_IMAGE is the test repository seen through the registry
    proxy (images are published straight to the registry, the agent pulls via the proxy)."""
    _, path = unique_repo.split("/", 1)
    dev = Device(repo=f"{registry_proxy.address}/{path}", name=container_name,
                 data_dir=tmp_path / "data")
    yield dev
    for name in (container_name, f"{container_name}-previous", f"{container_name}-next"):
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.api.remove_container(name, force=True)
    remove_repo_images(dev.repo, client=docker_client)


# -- helpers ----------------------------------------------------------------------------
def in_process_agent(dev: Device, **engine: float) -> Agent:
    """The real agent in this process, its Engine built with ``engine`` limits."""
    return Agent(load_settings(dev.agent_env()),
                 connect_engine=lambda: Engine.connect(**engine))


def fresh_version(dev: Device) -> str:
    """A version string no other test builds: its image has layers of its own."""
    return f"2.0-{dev.name}"


def check_within(agent: Agent, seconds: float) -> None:
    """One check, which must return within ``seconds`` (else it hangs: fail)."""
    done = threading.Event()

    def run() -> None:
        try:
            agent.check()
        finally:
            done.set()

    threading.Thread(target=run, name="check", daemon=True).start()
    assert done.wait(seconds), f"the check was still blocked after {seconds:g} s"


def update_status(dev: Device) -> str | None:
    try:
        return str(dev.status()["update"]["status"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def status_field(dev: Device, name: str) -> object:
    """``update.<name>`` of the status file (or the top-level ``ts``), None if unreadable."""
    try:
        document = dev.status()
        return document["ts"] if name == "ts" else document["update"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def spawn(dev: Device, tmp_path: Path, **extra: str) -> AgentProcess:
    """An agent process for ``dev``, started by ``with`` (which kills it at the end)."""
    return AgentProcess(dev.agent_env(**extra), tmp_path / "agent.log")


def serving_idle(dev: Device, version: str, agent: AgentProcess) -> None:
    wait_until(lambda: dev.serving() == version, timeout=60, message=f"{version} serving")
    wait_until(lambda: update_status(dev) == "idle", timeout=30,
               message=f"agent idle; log:\n{agent.log()[-3000:]}")


def assert_stops_within_promise(
    state: str, agent: AgentProcess, dev: Device, docker_client: docker.DockerClient,
) -> None:
    """SIGTERM now: exit code 0 within the promise, the app still running."""
    stopped = time_sigterm(agent)
    # shown with -s; docs/OPERATIONS.md quotes these figures
    print(f"\nSIGTERM -> exit, {state}: {stopped.seconds:.2f} s (code {stopped.code})")
    log = agent.log()[-12000:]  # with the stacks, if it had to be aborted
    assert stopped.code == 0, f"{state}: killed or failed after {stopped.seconds:.1f} s:\n{log}"
    assert stopped.seconds < PROMISE_S, f"{state}: SIGTERM took {stopped.seconds:.1f} s:\n{log}"
    assert "keeps running" in agent.log()
    assert docker_client.containers.get(dev.name).status == "running"


# -- in-process: a check ends, the next one works ---------------------------------------
def test_a_dripping_registry_costs_a_check_its_deadline_then_recovers(
    device: Device, registry_proxy: SlowProxy, unique_repo: str,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device.write_tag("1.0")
    agent = in_process_agent(device)
    agent.registry.deadline_s = 2
    check_within(agent, 60)
    assert device.serving() == "1.0"

    registry_proxy.drip(1.0)  # one byte a second: no read ever times out
    device.write_tag("2.0")
    check_within(agent, 15)
    update = device.status()["update"]
    assert update["status"] == "error"
    assert "registry did not answer within 2 s" in update["last_error"]
    assert device.serving() == "1.0"

    registry_proxy.passthrough()
    check_within(agent, 60)
    assert device.serving() == "2.0"


def test_a_dripping_docker_daemon_costs_a_check_its_deadline_then_recovers(
    device: Device, docker_proxy: SlowProxy, unique_repo: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    # after publishing: the test support caches its Docker client, and it must not be ours
    monkeypatch.setenv("DOCKER_HOST", docker_proxy.docker_host)
    device.write_tag("1.0")
    agent = in_process_agent(device, timeout_s=3)
    check_within(agent, 60)
    assert device.serving() == "1.0"

    docker_proxy.drip(1.0)
    check_within(agent, 20)
    update = device.status()["update"]
    assert update["status"] == "error"
    assert "no answer within 3 s" in update["last_error"]
    assert device.serving() == "1.0"

    docker_proxy.passthrough()
    check_within(agent, 30)
    assert update_status(device) == "idle"
    assert device.serving() == "1.0"


def test_a_pull_stalled_by_the_registry_is_given_up_then_retried(
    device: Device, registry_proxy: SlowProxy, unique_repo: str,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    # content of its own: an identical image of another test would need no download
    version = fresh_version(device)
    publish(unique_repo, "2.0", version)
    device.write_tag("1.0")
    agent = in_process_agent(device, pull_idle_s=3)
    check_within(agent, 60)
    assert device.serving() == "1.0"

    registry_proxy.stall_on(b"/blobs/")  # manifests answered, downloads hang
    device.write_tag("2.0")
    check_within(agent, 30)
    update = device.status()["update"]
    assert update["status"] == "error"
    assert "no progress for 3 s" in update["last_error"]
    assert device.serving() == "1.0"

    registry_proxy.passthrough()
    check_within(agent, 60)
    assert device.serving() == version


# -- a real process: SIGTERM within the promise, in every state --------------------------
def test_sigterm_when_idle(
    device: Device, unique_repo: str, tmp_path: Path, docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    device.write_tag("1.0")
    with spawn(device, tmp_path) as agent:
        serving_idle(device, "1.0", agent)
        assert_stops_within_promise("idle", agent, device, docker_client)


def test_sigterm_while_checking_against_a_dripping_registry(
    device: Device, registry_proxy: SlowProxy, unique_repo: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device.write_tag("1.0")
    with spawn(device, tmp_path) as agent:
        serving_idle(device, "1.0", agent)
        registry_proxy.drip(2.0)
        device.write_tag("2.0")
        wait_until(lambda: update_status(device) == "checking", timeout=30,
                   message="a check against the dripping registry")
        time.sleep(1.0)  # inside the HEAD request by now
        assert update_status(device) == "checking"
        assert_stops_within_promise("checking, registry dripping", agent, device, docker_client)
        assert device.serving() == "1.0"


def test_sigterm_while_pulling_from_a_stalled_registry(
    device: Device, registry_proxy: SlowProxy, unique_repo: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", fresh_version(device))  # so that it must be downloaded
    device.write_tag("1.0")
    with spawn(device, tmp_path) as agent:
        serving_idle(device, "1.0", agent)
        registry_proxy.stall_on(b"/blobs/")
        device.write_tag("2.0")
        wait_until(lambda: update_status(device) == "pulling", timeout=30,
                   message="a pull from the stalled registry")
        wait_until(lambda: registry_proxy.stalled > 0, timeout=10, message="a stalled download")
        time.sleep(1.0)
        assert update_status(device) == "pulling"
        assert_stops_within_promise("pulling, registry stalled", agent, device, docker_client)
        assert device.serving() == "1.0"


def test_sigterm_while_verifying(
    device: Device, unique_repo: str, tmp_path: Path, docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device.write_tag("1.0")
    # without a HEALTHCHECK the new container must keep running 10 s: a long verification
    with spawn(device, tmp_path, HEALTH_TIMEOUT="60") as agent:
        serving_idle(device, "1.0", agent)
        device.write_tag("2.0")
        wait_until(lambda: update_status(device) == "verifying", timeout=60,
                   message="verification of 2.0")
        time.sleep(0.5)
        assert_stops_within_promise("verifying", agent, device, docker_client)
        assert device.serving() == "2.0"


def test_sigterm_while_the_docker_daemon_is_stalled(
    device: Device, docker_proxy: SlowProxy, unique_repo: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    device.write_tag("1.0")
    with spawn(device, tmp_path, DOCKER_HOST=docker_proxy.docker_host) as agent:
        serving_idle(device, "1.0", agent)
        docker_proxy.stall()  # accepts, never answers: the daemon hangs
        wait_until(lambda: docker_proxy.waiting_calls(ignore=b"/events") > 0, timeout=60,
                   message=f"the loop waiting for the stalled daemon; log:\n"
                           f"{agent.log()[-3000:]}")
        time.sleep(0.5)
        assert_stops_within_promise("Docker daemon stalled", agent, device, docker_client)
        assert device.serving() == "1.0"


def test_sigterm_mid_swap_while_the_docker_daemon_is_stalled(
    device: Device, docker_proxy: SlowProxy, unique_repo: str, tmp_path: Path,
    docker_client: docker.DockerClient,
) -> None:
    """A call that changes something gets the stop grace, then the agent leaves; the next
    start finishes the swap."""
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device.write_tag("1.0")
    env = {"DOCKER_HOST": docker_proxy.docker_host}
    with spawn(device, tmp_path, **env) as agent:
        serving_idle(device, "1.0", agent)
        docker_proxy.stall_on(b"/rename")  # the daemon hangs in the middle of the swap
        device.write_tag("2.0")
        wait_until(lambda: docker_proxy.waiting_calls(ignore=b"/events") > 0, timeout=30,
                   message="the swap waiting for the stalled daemon")
        time.sleep(0.3)
        assert update_status(device) == "installing"
        assert_stops_within_promise("installing, Docker daemon stalled", agent, device,
                                    docker_client)
        assert device.serving() == "1.0"
    docker_proxy.passthrough()
    with spawn(device, tmp_path, **env) as agent:
        wait_until(lambda: device.serving() == "2.0", timeout=60,
                   message=f"the next start finishes the update; log:\n{agent.log()[-3000:]}")


def test_a_stalled_broker_neither_blocks_the_agent_nor_its_sigterm(
    device: Device, unique_repo: str, tmp_path: Path, docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    publish(unique_repo, "2.0", "2.0")
    device.write_tag("1.0")
    with Broker() as broker, SlowProxy(upstream=("127.0.0.1", broker.port)) as broker_proxy:
        broker.add_device(device.name)
        env = broker.agent_env(device.name, f"slow{device.name[-8:]}",
                               MQTT_PORT=str(broker_proxy.port))
        with spawn(device, tmp_path, **env) as agent:
            serving_idle(device, "1.0", agent)
            wait_until(lambda: "MQTT: connected to" in agent.log(), timeout=15,
                       message="the agent connected through the proxy")
            broker_proxy.stall()
            device.write_tag("2.0")  # the loop does not wait for the broker
            wait_until(lambda: device.serving() == "2.0", timeout=60,
                       message="2.0 applied while the broker is stalled")
            wait_until(lambda: update_status(device) == "idle", timeout=30, message="idle")
            assert_stops_within_promise("broker stalled", agent, device, docker_client)


def test_sigterm_with_a_fifo_as_the_tag_file(
    device: Device, unique_repo: str, tmp_path: Path, docker_client: docker.DockerClient,
) -> None:
    publish(unique_repo, "1.0", "1.0")
    device.write_tag("1.0")
    with spawn(device, tmp_path) as agent:
        serving_idle(device, "1.0", agent)
        tag = device.data_dir / "tag"
        tag.unlink()
        os.mkfifo(tag)  # nobody ever writes: a plain open() blocks for good
        wait_until(lambda: "refused: it is a FIFO" in agent.log(), timeout=30,
                   message=f"the FIFO refused; log:\n{agent.log()[-2000:]}")
        # the loop is not blocked: it reports the unusable file (holding the container
        # where it is rather than falling back) and goes on publishing its state
        wait_until(lambda: "the tag file is unusable" in str(status_field(device, "last_error")),
                   timeout=30, message="the unusable tag file reported")
        before = status_field(device, "ts")
        wait_until(lambda: status_field(device, "ts") != before, timeout=30,
                   message="the loop goes on")
        assert agent.log().count("tag file ignored:") == 1  # logged once
        assert device.serving() == "1.0"
        assert_stops_within_promise("FIFO as the tag file", agent, device, docker_client)
