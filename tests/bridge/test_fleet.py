"""Unit tests of the device registry and the ?wait verdicts (no broker)."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edge_agent.bridge.fleet import Fleet, TooManyWaiters, judge_event, judge_state
from edge_agent.topics import Topics

T = Topics("edge")


def state(**overrides: Any) -> dict[str, Any]:
    """An agent state document (SPEC section 6) with a few fields overridden."""
    doc: dict[str, Any] = {
        "device_id": "dev1",
        "agent_version": "0.1.0",
        "ts": "2024-05-01T12:00:00.000Z",
        "image": "registry/app",
        "desired": {"tag": "2.0", "source": "device", "group": None, "request_id": "r1"},
        "running": {"tag": "2.0", "digest": "sha256:" + "a" * 64, "container_id": "c",
                    "status": "running", "health": None, "started_at": None,
                    "restart_count": 0},
        "fallback": {"active": False, "requested_tag": None, "reason": None},
        "update": {"status": "idle", "progress": None, "last_check_at": None,
                   "last_success_at": None, "last_error": None},
        "installed_version": "2.0",
        "latest_version": "2.0",
        "in_progress": False,
        "update_percentage": None,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def send(fleet: Fleet, device: str, kind: str, body: Any, retained: bool = False) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    fleet.handle(f"edge/devices/{device}/{kind}", payload, retained)


# -- verdicts -----------------------------------------------------------------------
def test_idle_state_with_our_request_and_tag_is_success() -> None:
    verdict = judge_state(state(), "r1", "2.0")
    assert verdict is not None and verdict.ok


@pytest.mark.parametrize("status", ["checking", "pulling", "installing", "verifying",
                                    "rolling_back", "error", "available"])
def test_busy_or_erroring_state_keeps_waiting(status: str) -> None:
    assert judge_state(state(update={"status": status}), "r1", "2.0") is None


def test_state_for_another_request_is_ignored() -> None:
    assert judge_state(state(), "other", "2.0") is None
    assert judge_state({"desired": None}, "r1", "2.0") is None
    assert judge_state({}, "r1", "2.0") is None


def test_idle_on_another_tag_is_a_conflict_with_the_last_error() -> None:
    doc = state(installed_version="1.0", update={"last_error": "rolled back: unhealthy"})
    verdict = judge_state(doc, "r1", "2.0")
    assert verdict is not None and not verdict.ok
    assert "rolled back: unhealthy" in verdict.reason


def test_fallback_state_is_a_conflict() -> None:
    doc = state(installed_version="latest",
                fallback={"active": True, "requested_tag": "2.0", "reason": "tag 2.0 not found"})
    verdict = judge_state(doc, "r1", "2.0")
    assert verdict is not None and not verdict.ok and verdict.event == "fallback"
    assert "tag 2.0 not found" in verdict.reason


@pytest.mark.parametrize("name", ["rolled_back", "update_failed", "fallback", "tag_rejected",
                                  "config_error"])
def test_failure_events_for_our_request_are_conflicts(name: str) -> None:
    verdict = judge_event({"event": name, "request_id": "r1", "reason": "why"}, "r1")
    assert verdict is not None and not verdict.ok and verdict.event == name
    assert verdict.reason == f"{name}: why"


def test_other_events_do_not_settle() -> None:
    assert judge_event({"event": "update_started", "request_id": "r1"}, "r1") is None
    assert judge_event({"event": "rolled_back", "request_id": "r2"}, "r1") is None
    assert judge_event({"event": "rolled_back"}, "r1") is None


# -- registry -----------------------------------------------------------------------
def test_devices_come_from_state_and_availability() -> None:
    fleet = Fleet(T, clock=lambda: 1_800_000_000.0)
    send(fleet, "b", "state", state(device_id="b"), retained=True)
    send(fleet, "a", "availability", b"online", retained=True)
    send(fleet, "b", "availability", b"offline")
    devices = json.loads(fleet.list_json())
    assert [d["id"] for d in devices] == ["a", "b"]
    a, b = devices
    assert a["online"] is True and a["availability"] == "online" and a["state"] is None
    assert b["online"] is False and b["availability"] == "offline"
    assert b["state"]["device_id"] == "b"
    # a live message counts as seen now; a retained state with its own ts
    assert b["last_seen"] == "2027-01-15T08:00:00.000Z"
    assert a["last_seen"] is None


def test_retained_state_last_seen_is_its_ts() -> None:
    fleet = Fleet(T, clock=lambda: 1_900_000_000.0)
    send(fleet, "a", "state", state(ts="2024-05-01T12:00:00.000Z"), retained=True)
    assert fleet.device("a")["last_seen"] == "2024-05-01T12:00:00.000Z"  # type: ignore[index]


def test_unknown_availability_and_malformed_state_are_ignored() -> None:
    fleet = Fleet(T)
    send(fleet, "a", "availability", b"maybe")
    send(fleet, "a", "state", b"{not json")
    send(fleet, "a", "state", b"[1, 2]")
    send(fleet, "a", "state", b"[" * 5000)
    send(fleet, "a", "state", b"\xff\xfe")
    fleet.handle("edge/devices/a/state/extra", b"{}")
    fleet.handle("other/devices/a/state", b"{}")
    fleet.handle("edge/groups/a/tag", b"1.0")
    assert len(fleet) == 0
    assert fleet.list_json() == b"[]"


def test_cleared_retained_topics_forget_the_device() -> None:
    fleet = Fleet(T)
    send(fleet, "a", "state", state(), retained=True)
    send(fleet, "a", "availability", b"online", retained=True)
    send(fleet, "a", "state", b"")
    assert fleet.device("a") is not None
    send(fleet, "a", "availability", b"")
    assert fleet.device("a") is None


def test_last_event_is_kept_without_pull_progress() -> None:
    fleet = Fleet(T)
    send(fleet, "a", "availability", b"online")
    send(fleet, "a", "events", {"event": "rolled_back", "ts": "t", "reason": "unhealthy",
                                "digest": "sha256:x"})
    send(fleet, "a", "events", {"event": "pull_progress", "progress": 50})
    assert fleet.device("a")["last_event"] == {  # type: ignore[index]
        "event": "rolled_back", "ts": "t", "reason": "unhealthy"}


def test_registry_is_bounded() -> None:
    fleet = Fleet(T, max_devices=2)
    for name in "abc":
        send(fleet, name, "availability", b"online")
    assert len(fleet) == 2


def test_list_is_cached_until_something_changes() -> None:
    fleet = Fleet(T)
    send(fleet, "a", "availability", b"online")
    first = fleet.list_json()
    assert fleet.list_json() is first
    send(fleet, "a", "availability", b"offline")
    assert fleet.list_json() is not first


# -- waiters ------------------------------------------------------------------------
def test_waiter_settles_on_state() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", state(update={"status": "pulling"}))
    assert waiter.verdict is None
    send(fleet, "dev1", "state", state())
    verdict = waiter.wait(0)
    assert verdict is not None and verdict.ok
    fleet.remove_waiter(waiter)
    assert fleet.waiting == 0


def test_waiter_settles_on_failure_event_and_first_verdict_wins() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "events", {"event": "rolled_back", "request_id": "r1", "reason": "x"})
    send(fleet, "dev1", "state", state())
    verdict = waiter.wait(0)
    assert verdict is not None and not verdict.ok and verdict.event == "rolled_back"


def test_waiter_for_a_settled_request_id_answers_at_once() -> None:
    fleet = Fleet(T)
    send(fleet, "dev1", "state", state(), retained=True)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    assert waiter.done.is_set()


def test_waiter_times_out_with_none() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    assert waiter.wait(0.01) is None


def test_waiter_wakes_another_thread() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(waiter.wait(10)))
    thread.start()
    send(fleet, "dev1", "state", state())
    thread.join(10)
    assert result and result[0] is not None


def test_waiters_are_bounded_and_removed() -> None:
    fleet = Fleet(T, max_waiters=2)
    first = fleet.add_waiter("a", "r1", "1")
    fleet.add_waiter("a", "r2", "1")
    with pytest.raises(TooManyWaiters):
        fleet.add_waiter("b", "r3", "1")
    fleet.remove_waiter(first)
    fleet.remove_waiter(first)  # twice is harmless
    fleet.add_waiter("b", "r3", "1")
    assert fleet.waiting == 2


def test_conflict_seen_in_the_state_is_refined_by_the_following_event() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", state(installed_version="1.0",
                                       update={"last_error": "update to 2.0 rolled back"}))
    send(fleet, "dev1", "events", {"event": "rolled_back", "request_id": "r1",
                                   "reason": "unhealthy"})
    verdict = waiter.wait(1)
    assert verdict is not None and verdict.event == "rolled_back"
    assert verdict.reason == "rolled_back: unhealthy"


def test_conflict_without_an_event_is_answered_after_the_grace() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", state(installed_version="1.0"))
    verdict = waiter.wait(5, refine_s=0.01)
    assert verdict is not None and not verdict.ok and verdict.event is None
