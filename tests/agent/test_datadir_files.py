"""Files in DATA_DIR are untrusted (issue 9, finding 11 and its class).

Every file the agent reads there (tag, docker_config.json, state.json, and status.json
for ``edge-agent status``) is read only if it is a regular file of bounded size: a
symbolic or hard link to a secret, a FIFO, a directory, a device, a socket or a huge
file is refused with one line naming the path and the reason, without reading it, so
the secret reaches no state, log or registry request; the agent keeps running and the
container is untouched. Writes replace a planted link instead of writing through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent.errors import RunConfigError
from edge_agent.agent.registry import RegistryClient
from edge_agent.agent.store import (
    MAX_FILE_BYTES,
    RUN_CONFIG_FILE,
    STATE_FILE,
    STATUS_FILE,
    TAG_FILE,
    AgentState,
    DataDir,
)
from edge_agent.files import FileRefused, StorageError, read_regular_file
from edge_agent.protocol.errors import TagError
from tests.support import REPO_ROOT
from tests.support.device import Device, publish
from tests.support.registry import RegistryLog

SECRET = "hunter2-S3CRET-9f3a"  # also a valid tag: read as one, it would travel far
FILES = (TAG_FILE, RUN_CONFIG_FILE, STATE_FILE, STATUS_FILE)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, failing (not hanging) when it blocks longer than ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds:g} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- what can be planted under a name ---------------------------------------------------
def _secret(where: Path) -> Path:
    secret = where / "secret.txt"
    secret.write_text(SECRET + "\n")
    return secret


def plant_symlink(path: Path) -> str:
    path.symlink_to(_secret(path.parent.parent))
    return "it is a symbolic link"


def plant_dangling_symlink(path: Path) -> str:
    path.symlink_to(path.parent / "nowhere")
    return "it is a symbolic link"


def plant_hardlink(path: Path) -> str:
    os.link(_secret(path.parent.parent), path)
    return "hard links (an alias of another file)"


def plant_fifo(path: Path) -> str:
    os.mkfifo(path)
    return "it is a FIFO"


def plant_directory(path: Path) -> str:
    path.mkdir()
    (path / "x").write_text(SECRET)
    return "it is a directory"


def plant_device(path: Path) -> str:
    try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: never ends
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    return "it is a device"


def plant_socket(path: Path) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return "it is a socket"


def plant_huge(path: Path) -> str:
    with path.open("wb") as handle:
        handle.truncate(10 << 30)  # sparse: 10 GiB that nobody should read
    return f"it is {10 << 30} bytes, more than the limit of"


PLANTS = {
    "symlink": plant_symlink, "dangling symlink": plant_dangling_symlink,
    "hard link": plant_hardlink, "fifo": plant_fifo, "directory": plant_directory,
    "device": plant_device, "socket": plant_socket, "huge": plant_huge,
}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


# -- the reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
@pytest.mark.parametrize("name", FILES)
def test_read_regular_file_refuses_what_is_planted(
    data_dir: Path, name: str, plant: Callable[[Path], str],
) -> None:
    path = data_dir / name
    reason = plant(path)
    with pytest.raises(FileRefused) as caught:
        within(5, lambda: read_regular_file(path, max_bytes=MAX_FILE_BYTES))
    message = str(caught.value)
    assert message.startswith(f"{path}: refused: ")
    assert reason in message
    assert "\n" not in message
    assert SECRET not in message


def test_read_regular_file_reads_a_regular_file_and_knows_an_absent_one(data_dir: Path) -> None:
    assert read_regular_file(data_dir / "tag", max_bytes=10) is None
    (data_dir / "tag").write_bytes(b"1.0\n")
    assert read_regular_file(data_dir / "tag", max_bytes=10) == b"1.0\n"
    (data_dir / "tag").write_bytes(b"x" * 11)
    with pytest.raises(FileRefused, match="it is 11 bytes, more than the limit of 10"):
        read_regular_file(data_dir / "tag", max_bytes=10)


# -- each file of DataDir -------------------------------------------------------------------
@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
def test_every_datadir_reader_refuses_without_blocking_or_leaking(
    data_dir: Path, plant: Callable[[Path], str], caplog: pytest.LogCaptureFixture,
) -> None:
    data = DataDir(data_dir)
    for name in FILES:
        reason = plant(data_dir / name)
        caplog.clear()
        if name == TAG_FILE:
            with pytest.raises((TagError, StorageError)) as tag_error:
                within(5, data.read_tag)
            assert reason in str(tag_error.value)
        elif name == RUN_CONFIG_FILE:
            with pytest.raises(RunConfigError) as config_error:
                within(5, data.read_run_config)
            assert reason in str(config_error.value)
        elif name == STATE_FILE:
            with caplog.at_level(logging.ERROR):
                assert within(5, data.load_state) == AgentState()
            assert [r.getMessage() for r in caplog.records if reason in r.getMessage()]
        else:
            with pytest.raises(StorageError) as status_error:
                within(5, data.read_status)
            assert reason in str(status_error.value)
        assert SECRET not in caplog.text


def test_deep_json_in_state_and_config_is_refused_not_a_crash(data_dir: Path) -> None:
    deep = b'{"version": 1, "applied": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    for name in (STATE_FILE, RUN_CONFIG_FILE, STATUS_FILE):
        (data_dir / name).write_bytes(deep)
    data = DataDir(data_dir)
    assert data.load_state() == AgentState()
    with pytest.raises(RunConfigError, match="nested 50001 levels deep"):
        data.read_run_config()
    assert data.read_status() is None


def test_writes_replace_a_planted_link_instead_of_following_it(data_dir: Path) -> None:
    victim = data_dir.parent / "victim.txt"
    victim.write_text("untouched")
    data = DataDir(data_dir)
    for name in FILES:
        (data_dir / name).symlink_to(victim)
    data.write_tag("2.0")
    data.save_state(AgentState())
    data.write_status({"a": 1})
    assert victim.read_text() == "untouched"
    for name in (TAG_FILE, STATE_FILE, STATUS_FILE):
        assert (data_dir / name).lstat().st_mode & stat.S_IFMT(0o170000) == stat.S_IFREG
    data.write_tag(None)  # removes the name, not what a link would point at
    assert victim.exists()


# -- fuzzing: any bytes in any file ---------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=400),
                         st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                      lambda inner: st.lists(inner, max_size=3)
                                      | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                                      max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_any_bytes_in_any_file_give_a_clean_answer(tmp_path: Path, content: bytes) -> None:
    data_dir = tmp_path / "fuzz"
    data_dir.mkdir(exist_ok=True)
    for name in FILES:
        (data_dir / name).write_bytes(content)
    data = DataDir(data_dir)
    with contextlib.suppress(TagError, StorageError):
        data.read_tag()
    with contextlib.suppress(RunConfigError):
        data.read_run_config()
    assert isinstance(data.load_state(), AgentState)
    status = data.read_status()
    assert status is None or isinstance(status, dict)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.fixed_dictionaries(
    {"version": st.just(1)},
    optional={key: st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                lambda inner: st.lists(inner, max_size=2)
                                | st.dictionaries(st.sampled_from(
                                    ["tag", "digest", "image_id", "step", "target", "x"]),
                                    inner, max_size=4), max_leaves=8)
              for key in ("applied", "previous", "failed", "pending")}))
def test_any_state_shape_starts_fresh_or_loads(tmp_path: Path, state: dict[str, Any]) -> None:
    data_dir = tmp_path / "fuzz-state"
    data_dir.mkdir(exist_ok=True)
    (data_dir / STATE_FILE).write_text(json.dumps(state))
    assert isinstance(DataDir(data_dir).load_state(), AgentState)


# -- edge-agent status ---------------------------------------------------------------------
def run_status(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATA_DIR": str(data_dir),
           "CONTAINER_IMAGE": "registry.example.com/app"}
    return subprocess.run([sys.executable, "-m", "edge_agent", "status"], env=env, text=True,
                          capture_output=True, timeout=20, check=False)


@pytest.mark.parametrize("plant", [plant_symlink, plant_fifo, plant_device],
                         ids=["symlink", "fifo", "device"])
def test_status_command_refuses_a_planted_status_file(
    data_dir: Path, plant: Callable[[Path], str],
) -> None:
    reason = plant(data_dir / STATUS_FILE)
    result = run_status(data_dir)
    assert result.returncode == 1
    assert SECRET not in result.stdout + result.stderr
    assert reason in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_command_reencodes_instead_of_echoing(data_dir: Path) -> None:
    (data_dir / STATUS_FILE).write_text('{"update": {"status": "idle\\u001b[2J"}}')
    result = run_status(data_dir)
    assert result.returncode == 0
    assert "\x1b" not in result.stdout
    assert json.loads(result.stdout) == {"update": {"status": "idle\x1b[2J"}}


# -- the agent: a symlinked tag file or docker_config.json leaks nothing ---------------------
@pytest.fixture
def device(unique_repo: str, container_name: str, tmp_path: Path) -> Iterator[Device]:
    yield Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")


def test_a_tag_file_linked_to_a_secret_is_refused_and_leaks_nowhere(
    device: Device, registry_log: RegistryLog, docker_client: docker.DockerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    assert device.serving() == "1.0"
    container_id = docker_client.containers.get(device.name).id

    mark = registry_log.mark()
    tag = device.data_dir / TAG_FILE
    tag.unlink()
    tag.symlink_to(_secret(device.data_dir.parent))
    with caplog.at_level(logging.DEBUG):
        agent.check()
        agent.check()
    registry_log.sync()

    events = [e for e in agent.events if e["event"] == "tag_rejected"]  # type: ignore[attr-defined]
    assert len(events) == 1 and "refused: it is a symbolic link" in events[0]["reason"]
    assert len([r for r in caplog.records if "tag file ignored" in r.getMessage()]) == 1
    assert SECRET not in caplog.text
    assert SECRET not in (device.data_dir / STATUS_FILE).read_text()
    assert SECRET not in (device.data_dir / STATE_FILE).read_text()
    assert SECRET not in json.dumps(agent.events)  # type: ignore[attr-defined]
    assert not [r for r in registry_log.requests(mark) if SECRET in r.uri]
    assert docker_client.containers.get(device.name).id == container_id
    assert device.serving() == "1.0"


def test_a_run_config_linked_to_a_secret_is_refused_and_the_container_kept(
    device: Device, docker_client: docker.DockerClient, caplog: pytest.LogCaptureFixture,
) -> None:
    publish(device.repo, "1.0", "1.0")
    device.write_tag("1.0")
    agent = device.agent()
    agent.check()
    container_id = docker_client.containers.get(device.name).id

    secret = device.data_dir.parent / "registry-auth.json"
    secret.write_text(json.dumps({"environment": {"TOKEN": SECRET}}))
    config = device.data_dir / RUN_CONFIG_FILE
    config.unlink()
    config.symlink_to(secret)
    with caplog.at_level(logging.DEBUG):
        agent.check()
    update = device.status()["update"]
    assert update["status"] == "error"
    assert "docker_config.json: refused: it is a symbolic link" in update["last_error"]
    assert SECRET not in caplog.text
    assert SECRET not in (device.data_dir / STATUS_FILE).read_text()
    assert docker_client.containers.get(device.name).id == container_id
    assert SECRET not in json.dumps(docker_client.containers.get(device.name).attrs["Config"])
    assert device.serving() == "1.0"


def test_a_damaged_state_file_does_not_stop_the_agent_starting(device: Device) -> None:
    (device.data_dir / STATE_FILE).write_bytes(b'{"version": 1, "failed": [' * 3000)
    agent = device.agent()  # used to raise RecursionError: the agent died at every start
    assert agent.state == AgentState()


@pytest.mark.parametrize("plant", [plant_symlink, plant_fifo, plant_huge],
                         ids=["symlink", "fifo", "huge"])
def test_registry_credentials_in_a_planted_docker_config_are_refused(
    data_dir: Path, plant: Callable[[Path], str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """DOCKER_CONFIG may live in DATA_DIR (docs/OPERATIONS.md): the same rule applies."""
    docker_dir = data_dir / "docker"
    docker_dir.mkdir()
    reason = plant(docker_dir / "config.json")
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_dir))
    with caplog.at_level(logging.WARNING):
        client = within(5, lambda: RegistryClient("registry.example.com/app"))
    assert client._credentials is None
    assert reason in caplog.text
    assert SECRET not in caplog.text
    client.close()
