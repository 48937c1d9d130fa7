"""DATA_DIR files: tag, docker_config.json, state (temp directories, no Docker)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.agent.errors import RunConfigError
from edge_agent.agent.store import (
    AgentState,
    DataDir,
    ImageRef,
    PendingUpdate,
    parse_run_config,
)
from edge_agent.protocol.errors import TagError


def test_tag_roundtrip_and_clear(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "new")
    assert data.read_tag() is None
    data.write_tag("2.0")
    assert (tmp_path / "new" / "tag").read_text() == "2.0\n"
    assert data.read_tag() == "2.0"
    data.write_tag(None)
    assert data.read_tag() is None
    assert list((tmp_path / "new").iterdir()) == []  # no temp files left behind


@pytest.mark.parametrize("content", [b"../etc\n", b"1.0\n2.0\n", b"\xff\xfe", b"a b"])
def test_invalid_tag_file_is_rejected(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tag").write_bytes(content)
    with pytest.raises(TagError):
        DataDir(tmp_path).read_tag()


def test_empty_tag_file_is_absent(tmp_path: Path) -> None:
    (tmp_path / "tag").write_bytes(b"  \n")
    assert DataDir(tmp_path).read_tag() is None


def test_run_config_agent_owned_keys_are_dropped_with_warning() -> None:
    config = parse_run_config({"detach": False, "name": "x", "image": "y", "ports": {"80/tcp": 8}})
    assert config.kwargs == {"ports": {"80/tcp": 8}}
    assert len(config.warnings) == 3


def test_run_config_digest_ignores_key_order() -> None:
    a = parse_run_config({"environment": {"A": "1"}, "ports": {"80/tcp": 8}})
    b = parse_run_config({"ports": {"80/tcp": 8}, "environment": {"A": "1"}})
    c = parse_run_config({"ports": {"80/tcp": 9}, "environment": {"A": "1"}})
    assert a.digest == b.digest != c.digest


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ([], "JSON object"),
        ({"portz": {}}, "unknown containers.run argument"),
        ({"remove": True}, "cannot be used for a detached container"),
        ({"labels": "x"}, "labels"),
    ],
)
def test_run_config_rejects(obj: object, reason: str) -> None:
    with pytest.raises(RunConfigError, match=reason):
        parse_run_config(obj)


def test_run_config_file(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    assert data.read_run_config().kwargs == {}
    (tmp_path / "docker_config.json").write_text('{"ports": ')
    with pytest.raises(RunConfigError, match="not valid JSON"):
        data.read_run_config()


def test_state_roundtrip(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    state = AgentState(
        applied=ImageRef("2.0", "sha256:b", "sha256:i2"),
        previous=ImageRef("1.0", None, "sha256:i1"),
        failed=[{"desired": "3.0", "digest": "sha256:c", "reason": "exited"}],
        pending=PendingUpdate("verifying", ImageRef("3.0", "sha256:c", "sha256:i3"), "old", "new"),
    )
    data.save_state(state)
    assert data.load_state() == state


@pytest.mark.parametrize("content", [b"", b"{", b'{"version": 9}', b'{"version": 1, "applied": 3}'])
def test_damaged_state_starts_fresh(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.json").write_bytes(content)
    assert DataDir(tmp_path).load_state() == AgentState()


def test_status_file(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    assert data.read_status() is None
    data.write_status({"a": 1})
    assert json.loads((tmp_path / "status.json").read_text()) == {"a": 1}
