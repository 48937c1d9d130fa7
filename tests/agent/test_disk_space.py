"""Disk space before a pull (issue 17, item 2), on a private dockerd whose data root is a
128 MiB tmpfs: an update that does not fit is refused before pulling, with the numbers,
and the old container keeps serving; one that fits only once the agent has pruned older
images of its repository goes through.

Padded layers are random bytes, so their download is as large as their files: the
estimate (download x 3 + 32 MiB) is what the test sizes against.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any

import docker

from edge_agent.agent.space import room_needed
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.device import Device
from tests.support.dockerd import PrivateDockerd, bridge_exists
from tests.support.images import build_and_push, push_padded

MIB = 1 << 20
NUMBERS_RE = re.compile(r"needs about (\d+) MB, (\d+) MB free on (\S+?);")


def tags_in(client: docker.DockerClient, repo: str) -> set[str]:
    return {t.rsplit(":", 1)[1] for image in client.images.list(name=repo) for t in image.tags}


def test_an_update_too_big_is_refused_before_pulling_and_one_that_fits_after_pruning_goes_through(  # noqa: PLR0915
    docker_client: docker.DockerClient, unique_repo: str, container_name: str,
    tmp_path: Path,
) -> None:
    repo, name = unique_repo, container_name
    build_and_push(repo, "1.0", "1.0")
    for tag, pad_mb in (("big", 48), ("old1", 16), ("old2", 16), ("2.0", 24)):
        build_and_push(repo, tag, tag)
        push_padded(repo, tag, pad_mb, docker_client)
    dockerd = PrivateDockerd(size_mb=128)
    agent: AgentProcess | None = None
    try:
        dockerd.start()
        client = dockerd.client
        assert client is not None
        device = Device(repo, name, tmp_path / "data")
        device.write_config({})
        device.write_tag("1.0")
        agent = AgentProcess(device.agent_env(DOCKER_HOST=dockerd.base_url, FALLBACK_TAG="",
                                              HEALTH_TIMEOUT="1", LOG_LEVEL="INFO"),
                             tmp_path / "agent.log").start()

        def update() -> dict[str, Any]:
            try:
                found: dict[str, Any] = device.status()["update"]
            except (OSError, ValueError, KeyError):
                return {}
            return found

        def settled_on(tag: str) -> bool:
            try:
                status = device.status()
            except (OSError, ValueError):
                return False
            return bool(status["running"]["tag"] == tag and status["update"]["status"] == "idle"
                        and dockerd.serving(name) == tag)

        wait_until(lambda: settled_on("1.0"), timeout=60, message="1.0 on the private daemon")
        container_id = client.containers.get(name).id

        # -- too big: refused before pulling, with the numbers -----------------------------
        device.write_tag("big")

        def refused() -> str | None:
            error = update().get("last_error") or ""
            return error if "not enough disk space to pull big" in error else None

        error = wait_until(refused, timeout=60, message="the refusal in the state")
        assert update()["error_code"] == "insufficient_space"
        found = NUMBERS_RE.search(error)
        assert found is not None, error
        needed, free, path = int(found[1]), int(found[2]), found[3]
        assert path == str(dockerd.data_root)
        assert needed * MIB >= room_needed(48 * MIB) and free < needed, error
        log = agent.log()
        assert "event update_failed" in log and "code=insufficient_space" in log, log[-3000:]
        # it retries (space may be freed) but says it once; nothing was pulled meanwhile
        first = update()["last_check_at"]
        wait_until(lambda: update().get("last_check_at") != first and refused(), timeout=30,
                   message="a retry that is refused again")
        log = agent.log()
        said = [line for line in log.splitlines()
                if "not enough disk space" in line and "retrying in" in line]
        assert len(said) == 1, log[-3000:]
        assert log.count("event update_failed") == 1, log[-3000:]
        assert log.count("event update_started") == 1, log[-3000:]  # the install of 1.0 only
        assert "big" not in tags_in(client, repo)
        assert client.containers.get(name).id == container_id
        assert dockerd.serving(name) == "1.0"
        assert sorted(c.name or "" for c in client.containers.list(all=True)) == [name]

        # -- fits once the agent prunes older images of its repository ----------------------
        device.write_tag("1.0")
        wait_until(lambda: settled_on("1.0") and not update().get("last_error"), timeout=30,
                   message="back on 1.0")
        for tag in ("old1", "old2"):  # lying around: neither running nor the rollback image
            client.images.pull(repo, tag=tag)
        stat = os.statvfs(dockerd.data_root)
        assert stat.f_bavail * stat.f_frsize < room_needed(24 * MIB), "fits without pruning"
        device.write_tag("2.0")
        wait_until(lambda: settled_on("2.0"), timeout=90, message="2.0 after pruning")
        log = agent.log()
        assert f"pruned older images of {repo} to make room for 2.0" in log, log[-3000:]
        assert tags_in(client, repo) & {"old1", "old2", "big"} == set()
        assert update()["error_code"] is None
    finally:
        if agent is not None and agent.alive:
            agent.stop(signal.SIGKILL)
        dockerd.close()  # its images go with its data root
        assert bridge_exists("docker0"), "the shared daemon's docker0 bridge is gone"
