"""The handover's pure decisions (agent/handover.py): who does what at each phase, after a
crash of either agent, and the candidate's configuration carried over from an inspect."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.handover import (
    MARKER_ENV,
    MARKER_LABEL,
    Handover,
    Next,
    Phase,
    Role,
    candidate_config,
    decide,
    own_container_id,
    role_of,
    satisfied,
)

NOW = 1000.0


def record(phase: Phase, deadline: float = NOW + 60) -> Handover:
    return Handover(id="h1", version="0.2", image="reg/agent:0.2", old_id="old",
                    old_name="edge-agent", candidate_name="edge-agent-next", phase=phase,
                    deadline=deadline, candidate_id="new")


def test_roles() -> None:
    rec = record(Phase.STARTED)
    assert role_of(rec, "old", None) is Role.OLD
    assert role_of(rec, "new", "h1") is Role.CANDIDATE
    # a finished handover's marker is stale: no record, or another record
    assert role_of(None, "new", "h1") is Role.OTHER
    assert role_of(rec, "new", "h0") is Role.OTHER


def test_no_record_manages_once_it_holds_the_lock() -> None:
    for role in Role:
        assert decide(None, role, holding_lock=True, candidate_running=None,
                      candidate_ready=False, now=NOW).next is Next.MANAGE
        assert decide(None, role, holding_lock=False, candidate_running=None,
                      candidate_ready=False, now=NOW).next is Next.WAIT


@pytest.mark.parametrize("phase", [Phase.PULLING, Phase.CREATING])
def test_old_restarted_before_the_candidate_ran_retries_without_a_verdict(phase: Phase) -> None:
    assert decide(record(phase), Role.OLD, holding_lock=True, candidate_running=None,
                  candidate_ready=False, now=NOW).next is Next.RETRY


@pytest.mark.parametrize(("running", "ready", "lock", "deadline", "expected"), [
    (True, False, True, NOW + 1, Next.WAIT),  # proving itself
    (True, True, True, NOW + 1, Next.RELEASE),  # ready: hand the lock over
    (False, True, True, NOW + 1, Next.WAIT),  # restarting: the deadline decides
    (None, False, True, NOW + 1, Next.FAIL),  # container gone
    (True, False, True, NOW - 1, Next.FAIL),  # too late
    (False, False, False, NOW - 1, Next.FAIL),  # too late, even while waiting for the lock
])
def test_old_agent_during_started(running: bool | None, ready: bool, lock: bool,
                                  deadline: float, expected: Next) -> None:
    assert decide(record(Phase.STARTED, deadline), Role.OLD, holding_lock=lock,
                  candidate_running=running, candidate_ready=ready, now=NOW).next is expected


def test_old_agent_after_release() -> None:
    rec = record(Phase.RELEASED)
    # the candidate holds the lock, or is about to take it
    assert decide(rec, Role.OLD, holding_lock=False, candidate_running=True,
                  candidate_ready=True, now=NOW).next is Next.WAIT
    # restarted old agent got the lock first: give it back while there is time
    assert decide(rec, Role.OLD, holding_lock=True, candidate_running=True,
                  candidate_ready=True, now=NOW).next is Next.RELEASE
    failed = decide(record(Phase.RELEASED, NOW - 1), Role.OLD, holding_lock=False,
                    candidate_running=True, candidate_ready=True, now=NOW)
    assert failed.next is Next.FAIL
    assert "did not prove itself" in failed.reason


def test_old_agent_stands_down_once_the_candidate_proved_itself() -> None:
    for lock in (True, False):
        assert decide(record(Phase.PROVEN, NOW - 100), Role.OLD, holding_lock=lock,
                      candidate_running=False, candidate_ready=True,
                      now=NOW).next is Next.STAND_DOWN


@pytest.mark.parametrize("phase", [Phase.STARTED, Phase.RELEASED])
def test_candidate_with_the_lock_takes_over(phase: Phase) -> None:
    assert decide(record(phase), Role.CANDIDATE, holding_lock=True, candidate_running=True,
                  candidate_ready=True, now=NOW).next is Next.TAKE_OVER
    assert decide(record(phase), Role.CANDIDATE, holding_lock=False, candidate_running=True,
                  candidate_ready=True, now=NOW).next is Next.WAIT


def test_proven_candidate_restarted_finishes() -> None:
    assert decide(record(Phase.PROVEN), Role.CANDIDATE, holding_lock=True,
                  candidate_running=True, candidate_ready=True, now=NOW).next is Next.FINISH


@given(phase=st.sampled_from(Phase), role=st.sampled_from(Role), lock=st.booleans(),
       running=st.sampled_from([True, False, None]), ready=st.booleans(),
       late=st.booleans())
def test_only_a_lock_holder_manages_and_a_candidate_never_fails_itself(  # noqa: PLR0913, PLR0917
        phase: Phase, role: Role, lock: bool, running: bool | None, ready: bool,
        late: bool) -> None:
    decision = decide(record(phase, NOW - 1 if late else NOW + 1), role, holding_lock=lock,
                      candidate_running=running, candidate_ready=ready, now=NOW)
    if decision.next in (Next.MANAGE, Next.RETRY, Next.RELEASE, Next.TAKE_OVER, Next.FINISH):
        assert lock
    if role is Role.CANDIDATE:
        assert decision.next in (Next.WAIT, Next.TAKE_OVER, Next.FINISH)


@given(st.dictionaries(st.text(max_size=20),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                                 st.lists(st.integers(), max_size=3)), max_size=12))
def test_a_damaged_record_is_refused_with_value_error(obj: dict[str, Any]) -> None:
    with contextlib.suppress(ValueError):
        Handover.from_json(obj)


def test_record_round_trip() -> None:
    rec = record(Phase.RELEASED)
    assert Handover.from_json(rec.to_json()) == rec


def test_own_container_id_from_mountinfo() -> None:
    cid = "a" * 64
    text = (f"1 0 0:1 / / rw - overlay overlay rw\n"
            f"2 1 8:1 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw - ext4 x rw\n"
            f"3 1 8:1 /var/lib/docker/containers/{cid}/hosts /etc/hosts rw - ext4 x rw\n")
    assert own_container_id(text) == cid
    assert own_container_id("1 0 0:1 / / rw - ext4 /dev/sda1 rw\n") is None


def test_satisfied_by_version_or_image_tag() -> None:
    assert satisfied("0.2", "0.2", "latest")
    assert satisfied("stable", "0.1.0", "stable")
    assert not satisfied("0.2", "0.1", "0.1")


def test_candidate_config_carries_what_was_set_for_the_container() -> None:
    container: dict[str, Any] = {
        "Id": "c" * 64,
        "Name": "/edge-agent",
        "Config": {
            "Hostname": "device-7",
            "User": "10001:10001",
            "Env": ["PATH=/usr/bin", "EDGE_AGENT_VERSION=0.1", "CONTAINER_IMAGE=r/app",
                    f"{MARKER_ENV}=old-handover", "DEVICE_ID=d7"],
            "Labels": {"org.opencontainers.image.version": "0.1", "site": "north",
                       MARKER_LABEL: "old-handover"},
            "Healthcheck": {"Test": ["CMD", "edge-agent", "healthcheck"]},
            "Image": "r/agent:0.1",
            "Cmd": ["edge-agent"],
        },
        "HostConfig": {"Binds": ["/var/run/docker.sock:/var/run/docker.sock",
                                 "/srv/edge:/app/data"],
                       "GroupAdd": ["998"], "NetworkMode": "host",
                       "RestartPolicy": {"Name": "unless-stopped"}, "Links": None},
    }
    image = {"Config": {"Env": ["PATH=/usr/bin", "EDGE_AGENT_VERSION=0.1"],
                        "Labels": {"org.opencontainers.image.version": "0.1"},
                        "User": "10001:10001",
                        "Healthcheck": {"Test": ["CMD", "edge-agent", "healthcheck"]}}}
    config = candidate_config(container, image, "r/agent:0.2", "h2")
    assert config["Image"] == "r/agent:0.2"
    assert config["Env"] == ["CONTAINER_IMAGE=r/app", "DEVICE_ID=d7", f"{MARKER_ENV}=h2"]
    assert config["Labels"] == {"site": "north", MARKER_LABEL: "h2"}
    assert config["HostConfig"]["Binds"] == container["HostConfig"]["Binds"]
    assert config["HostConfig"]["GroupAdd"] == ["998"]
    assert config["HostConfig"]["RestartPolicy"] == {"Name": "unless-stopped"}
    assert "Links" not in config["HostConfig"]
    assert config["Hostname"] == "device-7"
    # the image's own user, healthcheck and command come from the new image
    assert "User" not in config and "Healthcheck" not in config and "Cmd" not in config


def test_candidate_config_drops_a_generated_host_name() -> None:
    container = {"Id": "abcdef123456" + "0" * 52, "Config": {"Hostname": "abcdef123456"},
                 "HostConfig": {}}
    assert "Hostname" not in candidate_config(container, {}, "r/agent:0.2", "h")
