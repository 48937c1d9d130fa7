"""Chaos at CI size (issue 5): the soak of bench/bench_soak.py in small, power loss in
DATA_DIR, and a full disk while pulling.

Randomness is seeded; the seed is in every failure message (CHAOS_SEED=<n> repeats it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.store import AgentState, DataDir
from edge_agent.files import StorageError
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.chaos import KILL_STEPS, Soak
from tests.support.device import Device, publish
from tests.support.dockerd import PrivateDockerd, bridge_exists
from tests.support.images import build_and_push, push_padded, remove_repo_images
from tests.support.registry import PrivateRegistry

pytestmark = pytest.mark.broker

OPERATOR = "chaos-op"


def seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.randrange(1 << 30))


@pytest.fixture
def broker() -> Iterator[Broker]:
    """Function scoped: the tests restart it."""
    with Broker() as started:
        yield started


# -- soak, small -------------------------------------------------------------------------
def test_tag_changes_survive_broker_registry_and_agent_failures(
    broker: Broker, private_registry: Callable[..., PrivateRegistry],
    docker_client: docker.DockerClient, tmp_path: Path,
) -> None:
    """10 tag changes to 2 agents with a broker restart, a registry outage, a SIGKILL, a
    SIGKILL at an update step, a release whose image cannot start and a docker_config.json
    whose port is taken; the failed starts are answered and the apps keep serving; then
    every invariant of the soak holds."""
    chosen = seed()
    soak = Soak(broker=broker, registry=private_registry(), workdir=tmp_path, agents_n=2,
                versions=["v0", "v1", "v2", "v3"], seed=chosen, build_client=docker_client)
    try:
        soak.start()
        soak.converge(timeout=90)  # a failed start needs a good version to go back to
        faults = {1: "broker", 3: "registry", 5: "kill", 6: "bad_image", 7: "kill_at",
                  8: "taken_port"}
        soak.run(10, schedule=faults, pause_s=(0.2, 1.0))
        soak.finish_chaos()
        try:
            soak.converge(timeout=90)
        except TimeoutError as exc:
            pytest.fail(f"seed {chosen}: {exc}\n{soak.problems}\n{soak.logs()}")
        problems = soak.invariants()
        assert problems == [], f"seed {chosen}: {problems}\n{soak.logs()}"
        assert {soak.counts[a] for a in faults.values()} == {1}
        # the bad release (one or both agents) and the taken port were answered
        assert soak.counts["failed_start_answered"] >= 2
        assert soak.events()["rolled_back"] >= 2
        assert soak.counts["changes"] == 10
    finally:
        soak.close()


# -- power loss in DATA_DIR -----------------------------------------------------------------
def corrupt(path: Path, rng: random.Random) -> str:
    """Damage ``path`` the way a power cut can: torn, zeroed, garbled, empty or gone."""
    data = path.read_bytes() if path.exists() else b""
    how = rng.choice(["truncate", "zeros", "garble", "empty", "delete", "junk"])
    if how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data) + 1)])
    elif how == "zeros":
        path.write_bytes(b"\x00" * max(len(data), 1))
    elif how == "garble":
        damaged = bytearray(data or b"x")
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "delete":
        path.unlink(missing_ok=True)
    else:
        path.write_bytes(rng.randbytes(rng.randint(1, 64)))
    return how


def tag_file_invalid(data_dir: Path) -> bool:
    try:
        DataDir(data_dir).read_tag()
    except (TagError, StorageError):
        return True
    return False


def state_file_damaged(data_dir: Path) -> bool:
    path = data_dir / "state.json"
    if not path.exists():
        return False
    try:
        AgentState.from_json(json.loads(path.read_bytes()))
    except (ValueError, TypeError, KeyError):
        return True
    return False


def test_power_loss_in_the_data_dir_at_random_points(  # noqa: PLR0915
    broker: Broker, docker_client: docker.DockerClient, unique_repo: str,
    container_name: str, tmp_path: Path,
) -> None:
    """Each round: a new desired tag, the agent dies at a random point of the update
    (an update step, or a random moment), then the tag, state and status files are torn
    or garbled. The restarted agent reports what it found, and converges."""
    chosen = seed()
    rng = random.Random(chosen)
    for version in ("1.0", "2.0"):
        publish(unique_repo, version, version)
    name = container_name
    prefix = f"p{name}"
    topics = Topics(prefix)
    broker.add_operator(OPERATOR)
    broker.add_device(name)
    operator = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"]).start()
    device = Device(unique_repo, name, tmp_path / "data")
    env = device.agent_env(**{**broker.agent_env(name, prefix),
                              "CONTAINER_IMAGE": f"{unique_repo}:1.0", "FALLBACK_TAG": "",
                              "HEALTH_TIMEOUT": "1", "LOG_LEVEL": "INFO"})
    agent = AgentProcess(dict(env), tmp_path / "agent.log")
    files = [device.data_dir / f for f in ("tag", "state.json", "status.json")]
    desired = "1.0"

    def settled(mark: float) -> Any:
        def check() -> bool:
            last = operator.last(topics.state(name))
            if last is None or last.at < mark:
                return False
            state = last.json()
            return bool(state["running"]["tag"] == desired and state["update"]["status"] == "idle"
                        and state["running"]["status"] == "running")
        return check

    try:
        operator.publish(topics.device_tag(name), desired, retain=True)
        agent.start()
        wait_until(settled(0.0), timeout=30, message="the first settled state")
        for round_no in range(4):
            context = f"seed {chosen}, round {round_no}"
            agent.kill()
            desired = "2.0" if desired == "1.0" else "1.0"
            operator.publish(topics.device_tag(name), desired, retain=True)
            if rng.random() < 0.5:
                remove_repo_images(unique_repo)  # this update has to pull
            step = rng.choice([*KILL_STEPS, "random moment"])
            agent.env = {**env, "EDGE_AGENT_TEST_KILL_AT": step}
            agent.start()
            try:
                wait_until(lambda: not agent.alive, timeout=rng.uniform(0.5, 6.0))
            except TimeoutError:
                agent.kill()  # the step did not come (or none was chosen): cut it now
            damage = {f.name: corrupt(f, rng) for f in files if rng.random() < 0.8}
            invalid_tag = tag_file_invalid(device.data_dir)
            damaged_state = state_file_damaged(device.data_dir)
            context += f", killed at {step}, damage {damage}"

            mark = time.monotonic()
            log_mark = len(agent.log())
            agent.env = dict(env)
            agent.start()
            operator.wait_for(topics.availability(name), lambda m: m.text == "online",
                              since=mark, message=f"online ({context})")
            wait_until(settled(mark), timeout=45, message=f"{desired} settled ({context})")
            assert device.serving() == desired, context
            # the tag file names the desired tag (a truncation that only took the final
            # newline leaves a valid file, which the agent has no reason to rewrite)
            assert (device.data_dir / "tag").read_text().strip() == desired, context
            state = json.loads((device.data_dir / "state.json").read_text())
            assert state["pending"] is None and state["applied"]["tag"] == desired, context
            names = sorted(c.name or "" for c in
                           docker_client.containers.list(all=True, filters={"name": name}))
            assert names == [name], context
            events = [m.json() for m in operator.on(topics.events(name)) if m.at >= mark]
            rejected = [e for e in events if e["event"] == "tag_rejected"
                        and e.get("source") == "file"]
            assert bool(rejected) == invalid_tag, f"{context}: {events}"
            if damaged_state:
                assert "is damaged" in agent.log()[log_mark:], context
    finally:
        if agent.alive:
            agent.stop(signal.SIGKILL)
        operator.close()


# -- disk full ------------------------------------------------------------------------------
def test_disk_full_while_pulling_keeps_the_app_serving_and_is_reported(  # noqa: PLR0915
    docker_client: docker.DockerClient, unique_repo: str, container_name: str,
    tmp_path: Path,
) -> None:
    """A private dockerd whose data root is a 96 MiB tmpfs, filled up to 8 MiB before
    the pull of a version with a 24 MiB layer: the pull fails, the running container
    keeps serving, the failure is reported (state and update_failed event), and once
    there is room again the agent updates at its next retry."""
    build_and_push(unique_repo, "1.0", "1.0")
    build_and_push(unique_repo, "2.0", "2.0")
    push_padded(unique_repo, "2.0", 24, docker_client)
    name = container_name
    dockerd = PrivateDockerd(size_mb=96)
    agent: AgentProcess | None = None
    try:
        dockerd.start()
        device = Device(unique_repo, name, tmp_path / "data")
        device.write_config({})
        device.write_tag("1.0")
        # the free-space check before the pull is off, as if its estimate were wrong:
        # what is tested here is a pull that runs out of space
        agent = AgentProcess(device.agent_env(DOCKER_HOST=dockerd.base_url, FALLBACK_TAG="",
                                              HEALTH_TIMEOUT="1", LOG_LEVEL="INFO",
                                              DOCKER_DATA_ROOT="off"),
                             tmp_path / "agent.log").start()

        def update() -> dict[str, Any]:
            status = device.status()
            result: dict[str, Any] = status["update"]
            return result

        def status_ok(tag: str) -> bool:
            try:
                return bool(device.status()["running"]["tag"] == tag
                            and update()["status"] == "idle")
            except (OSError, ValueError, KeyError):
                return False

        wait_until(lambda: dockerd.serving(name) == "1.0" and status_ok("1.0"), timeout=60,
                   message="1.0 running on the private daemon")
        assert dockerd.client is not None
        container_id = dockerd.client.containers.get(name).id

        stat = os.statvfs(dockerd.data_root)
        free = stat.f_bavail * stat.f_frsize
        filler = dockerd.data_root / "filler"
        with filler.open("wb") as handle:
            handle.truncate(0)
            os.posix_fallocate(handle.fileno(), 0, free - (8 << 20))

        device.write_tag("2.0")

        def failed() -> str | None:
            try:
                error = update().get("last_error") or ""
            except (OSError, ValueError, KeyError):
                return None
            return error if "no space left on device" in error else None

        error = wait_until(failed, timeout=60, message="the disk-full error in the state")
        assert "2.0" in error or "pull" in error, error
        log = agent.log()
        assert "event update_failed" in log and "no space left on device" in log, log[-3000:]
        # it keeps retrying; meanwhile the app is untouched
        first_failure = update()["last_check_at"]
        for _ in range(20):
            assert dockerd.serving(name) == "1.0"
            time.sleep(0.25)
        wait_until(lambda: update()["last_check_at"] != first_failure and failed(),
                   timeout=30, message="a retry that fails again")
        assert dockerd.client.containers.get(name).id == container_id
        assert dockerd.serving(name) == "1.0"
        names = sorted(c.name or "" for c in dockerd.client.containers.list(all=True))
        assert names == [name]
        assert device.status()["running"]["status"] == "running"

        filler.unlink()
        wait_until(lambda: dockerd.serving(name) == "2.0" and status_ok("2.0"), timeout=60,
                   message="2.0 once there is room")
    finally:
        if agent is not None and agent.alive:
            agent.stop(signal.SIGKILL)
        dockerd.close()
        assert bridge_exists("docker0"), "the shared daemon's docker0 bridge is gone"
