"""The README's run command, ``scripts/demo``, for real: the full update cycle with no
manual step (``--once``), and a Ctrl-C in the middle (as the MQTT update starts) stops
everything the demo started. Each run has its own image repository, container name and
ports.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import docker
import docker.errors

from tests.support import REPO_ROOT

DEMO = REPO_ROOT / "scripts" / "demo"


def _env(name: str) -> dict[str, str]:
    return {**os.environ, "DEMO_NAME": name, "DEMO_FIXED_PORTS": "0"}


def _leftovers(client: docker.DockerClient, name: str, output: str) -> list[str]:
    """What a finished demo left behind: containers, local images, files, listeners."""
    found = [f"container {c.name}" for c in client.containers.list(all=True)
             if (c.name or "").startswith(f"{name}-app")]
    found += [f"image {t}" for i in client.images.list() for t in i.tags
              if t.startswith(f"127.0.0.1:5000/{name}/")]
    work = re.search(r"demo files and logs: (\S+)", output)
    if work and Path(work.group(1)).exists():
        found.append(f"directory {work.group(1)}")
    if work:  # processes started for this run name its directory (config, DATA_DIR)
        marker = work.group(1).encode()
        for proc in Path("/proc").iterdir():
            try:
                if marker in (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes():
                    found.append(f"process {proc.name}")
            except OSError:
                continue
    ports = re.findall(r"listening on 127\.0\.0\.1:(\d+)", output)
    ports += re.findall(r"bridge: http://127\.0\.0\.1:(\d+)", output)
    for port in ports:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                found.append(f"a listener on port {port}")
    return found


def test_demo_once_shows_the_full_cycle(docker_client: docker.DockerClient,
                                        container_name: str) -> None:
    name = f"{container_name}-demo"
    result = subprocess.run([str(DEMO), "--once"], env=_env(name), capture_output=True,
                            text=True, timeout=600, check=False, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    steps = ["the agent started", "->  1.0",
             "edge-ctl set-tag 2.0", "demo1: updated to 2.0", "->  2.0",
             "PUT http", "HTTP 200", "device runs 1.0", "->  1.0",
             "edge-ctl set-tag 3.0", "rolled back", "->  1.0",
             # demo3 (the one app with a lock) deferred, from pending or from sent:
             # whether the watch saw "sent" in between depends on the machine's load
             "8/8 a staged rollout", "wave 1/2  passed", "-> deferred: deferred (lock)",
             "demo3  updating -> succeeded", "succeeded: 3 of 3 devices on 2.0",
             "2.0 (group:demo)", "where to look", "fleet page", "done (--once)", "stopping what the demo started"]
    position = 0
    for marker in steps:
        found = output.find(marker, position)
        assert found >= 0, f"{marker!r} missing (in order) from:\n{output}"
        position = found
    assert _leftovers(docker_client, name, output) == []
    print(output)


def test_ctrl_c_in_the_middle_stops_everything(docker_client: docker.DockerClient,
                                                  container_name: str) -> None:
    name = f"{container_name}-demo"
    # `env --default-signal=INT`: a test run started in the background has SIGINT ignored,
    # and so would the demo; a terminal's Ctrl-C reaches a shell that has it at default.
    demo = subprocess.Popen(["env", "--default-signal=INT", str(DEMO)], env=_env(name),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    assert demo.stdout is not None
    lines: list[str] = []
    try:
        for line in demo.stdout:
            lines.append(line)
            if "edge-ctl set-tag 2.0" in line:
                break  # the MQTT update is under way: the terminal's Ctrl-C now
        else:
            raise AssertionError("the demo ended early:\n" + "".join(lines))
        os.killpg(demo.pid, signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    output = "".join(lines) + rest
    assert demo.returncode != 0, output  # interrupted, not finished
    assert "stopping what the demo started" in output, f"exit {demo.returncode}:\n{output}"
    for what in ("stopped agent", "stopped bridge", "stopped mosquitto", "removed container"):
        assert what in output, output
    assert _leftovers(docker_client, name, output) == []
    print(output)
