"""``edge-ctl rollout`` end to end: edge-ctl as its own process against a real bridge
process (BRIDGE_DATA_DIR: it drives rollouts) on a real Mosquitto; devices that are known
but never answer (a rollout stays running), and real agents for ``--watch`` to the end.
(The text and the spec on their own: test_rollout_view.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE
from edge_agent.protocol.topics import Topics
from tests.bridge.support import (
    add_simulator_user,
    spawn_agent,
    state_document,
    unique_prefix,
)
from tests.support import REPO_ROOT, wait_until
from tests.support.bridge_process import BRIDGE_USER, BridgeProcess
from tests.support.broker import Broker, MqttWatcher
from tests.support.containers import remove_test_containers
from tests.support.images import build_and_push, remove_repo_images

pytestmark = pytest.mark.broker

TOKEN = "ctl-rollout-token-" + "t" * 16
EDGE_CTL = (sys.executable, "-m", "edge_agent.ctl")
SILENT = ("quiet-1", "quiet-2", "quiet-3")


@dataclass
class Setup:
    bridge: BridgeProcess
    topics: Topics
    token_file: Path


def rollout_ctl(setup: Setup, *args: str, timeout: float = 120,
                token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``edge-ctl rollout ARGS`` as a process, BRIDGE_URL set, the token in a file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MQTT_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), BRIDGE_URL=setup.bridge.url,
               BRIDGE_TOKEN_FILE=str(token_file or setup.token_file))
    return subprocess.run([*EDGE_CTL, "rollout", *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def setup(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A bridge process with a data dir, and SILENT devices it knows (online, on 1.0)
    that never apply anything."""
    work = tmp_path_factory.mktemp("ctl-rollouts")
    broker.add_operator(BRIDGE_USER)
    simulator = add_simulator_user(broker, "rollout-sim")
    topics = Topics(unique_prefix())
    devices = MqttWatcher(broker.settings(simulator, prefix=topics.prefix), []).start()
    for device_id in SILENT:
        devices.publish(topics.availability(device_id), b"online", retain=True)
        devices.publish(topics.state(device_id),
                        json.dumps(state_document(device_id, "1.0")).encode(), retain=True)
    token_file = work / "token"
    token_file.write_text(TOKEN + "\n")
    (work / "data").mkdir()
    bridge = BridgeProcess(broker, topics.prefix, TOKEN, work / "bridge.log",
                           data_dir=work / "data").start()
    try:
        yield Setup(bridge, topics, token_file)
    finally:
        bridge.stop()
        print(bridge.log()[-4000:])
        devices.close()


def rollout_id(output: str) -> str:
    """The id in ``rollout ro-...: running`` (show's first line)."""
    first = output.splitlines()[0]
    assert first.startswith("rollout ro-"), output
    return first.split()[1].rstrip(":")


def test_a_bad_spec_is_refused_in_the_bridges_words_and_changes_nothing(setup: Setup) -> None:
    unknown = rollout_ctl(setup, "start", "--tag", "2.0", "--device", "quiet-1",
                          "--device", "nobody-knows-me")
    assert unknown.returncode == EXIT_USAGE, unknown
    assert unknown.stderr.startswith("edge-ctl: refused by the bridge: "), unknown.stderr
    assert "nobody-knows-me" in unknown.stderr
    zero = rollout_ctl(setup, "start", "--tag", "2.0", "--fleet", "--waves", "0,100%")
    assert zero.returncode == EXIT_USAGE and "waves" in zero.stderr, zero
    tag = rollout_ctl(setup, "start", "--tag", "-bad", "--fleet")
    assert tag.returncode == EXIT_USAGE and "tag" in tag.stderr, tag
    listed = rollout_ctl(setup, "list", "--json")
    assert listed.returncode == EXIT_OK, listed
    assert json.loads(listed.stdout) == {"rollouts": []}


def test_a_wrong_token_and_no_bridge_are_told_apart(setup: Setup, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    refused = rollout_ctl(setup, "list", token_file=wrong)
    assert refused.returncode == EXIT_USAGE and "refused the token" in refused.stderr, refused
    gone = subprocess.run([*EDGE_CTL, "rollout", "list", "--bridge-url", "http://127.0.0.1:9",
                           "--bridge-token-file", str(setup.token_file)],
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=60, check=False)
    assert gone.returncode == EXIT_TIMEOUT and "unreachable" in gone.stderr, gone


def test_list_show_pause_resume_abort(setup: Setup) -> None:
    started = rollout_ctl(setup, "start", "--tag", "2.0", "--device", "quiet-1",
                          "--device", "quiet-2", "--waves", "1", "--max-updating", "1")
    assert started.returncode == EXIT_OK, started
    ident = rollout_id(started.stdout)
    assert "wave 1/2" in started.stdout and "quiet-2" in started.stdout

    listed = rollout_ctl(setup, "list")
    assert listed.returncode == EXIT_OK, listed
    row = next(line for line in listed.stdout.splitlines() if line.startswith(ident))
    assert row.split()[1:5] == ["running", "2.0", "2", "devices"], row

    # the device that never answers stays sent: the rollout keeps running
    shown = rollout_ctl(setup, "show", ident)
    assert shown.returncode == EXIT_OK, shown
    assert f"rollout {ident}: running" in shown.stdout
    wait_until(lambda: "sent" in rollout_ctl(setup, "show", ident).stdout, timeout=30,
               message="the first device sent its tag")

    for action, state in (("pause", "paused"), ("resume", "running")):
        done = rollout_ctl(setup, action, ident)
        assert done.returncode == EXIT_OK, done
        assert done.stdout.strip() == f"rollout {ident}: {state}"
    aborted = rollout_ctl(setup, "abort", ident)
    assert aborted.returncode == EXIT_OK and aborted.stdout.strip().endswith("aborted"), aborted
    again = rollout_ctl(setup, "resume", ident)
    assert again.returncode == EXIT_FAILED, again
    assert again.stderr.startswith("edge-ctl: refused by the bridge (409): "), again.stderr
    watched = rollout_ctl(setup, "show", ident, "--watch", timeout=60)
    assert watched.returncode == EXIT_FAILED, watched
    assert watched.stdout.splitlines()[-1].startswith(f"rollout {ident} aborted"), watched

    missing = rollout_ctl(setup, "show", "ro-20000101000000-0000")
    assert missing.returncode == EXIT_FAILED and "(404)" in missing.stderr, missing


@pytest.mark.stack
def test_watch_follows_a_rollout_of_real_agents_to_its_end(
        broker: Broker, setup: Setup, test_id: str, tmp_path: Path) -> None:
    client = docker.from_env(version="auto")
    repo = f"127.0.0.1:5000/t{test_id}/app"
    for version in ("1.0", "2.0"):
        build_and_push(repo, version, version, "healthy")
    remove_repo_images(repo, client=client)
    name = f"edge-test-{test_id}"
    agents = [spawn_agent(broker, setup.topics.prefix, f"{name}-{i}", repo, "1.0", tmp_path)
              for i in range(2)]
    try:
        wait_until(lambda: all(agent.serving() == "1.0" for agent in agents), timeout=90,
                   message="the agents on 1.0")
        watched = rollout_ctl(setup, "start", "--tag", "2.0",
                              *(f"--device={agent.device_id}" for agent in agents),
                              "--waves", "1,100%", "--max-updating", "1", "--watch",
                              timeout=300)
        print(watched.stdout, watched.stderr)
        assert watched.returncode == EXIT_OK, (watched, [a.log()[-3000:] for a in agents])
        lines = watched.stdout.splitlines()
        assert lines[-1].startswith("rollout ro-") and " succeeded: 2 of 2 devices on 2.0" in (
            lines[-1]), watched.stdout
        for agent in agents:
            assert any(agent.device_id in line and "-> succeeded" in line for line in lines), (
                watched.stdout)
            assert agent.serving() == "2.0"
        assert any(line.startswith("wave 2/2  passed") for line in lines), watched.stdout
    finally:
        for agent in agents:
            agent.stop()
        remove_test_containers(client, test_id, name)
        remove_repo_images(repo, client=client)
        client.close()
