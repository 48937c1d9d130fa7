"""Unit tests of the device registry and of how ?wait uses the answers (no broker).
The judges themselves are tested in tests/test_answers.py."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edge_agent.bridge.fleet import Fleet, TooManyWaiters
from edge_agent.topics import Topics
from tests.test_answers import fallen_back, settled_on, state

T = Topics("edge")


def send(fleet: Fleet, device: str, kind: str, body: Any, retained: bool = False) -> None:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    fleet.handle(f"edge/devices/{device}/{kind}", payload, retained)


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
    assert waiter.answer is None
    send(fleet, "dev1", "state", state())
    answer = waiter.wait(0)
    assert answer is not None and answer.ok
    fleet.remove_waiter(waiter)
    assert fleet.waiting == 0


def test_waiter_settles_on_failure_event_and_first_answer_wins() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "events", {"event": "rolled_back", "request_id": "r1", "reason": "x"})
    send(fleet, "dev1", "state", state())
    answer = waiter.wait(0)
    assert answer is not None and not answer.ok and answer.event == "rolled_back"


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
    send(fleet, "dev1", "state", settled_on("1.0",
                                            update={"last_error": "update to 2.0 rolled back"}))
    send(fleet, "dev1", "events", {"event": "rolled_back", "request_id": "r1",
                                   "reason": "unhealthy"})
    answer = waiter.wait(1)
    assert answer is not None and answer.event == "rolled_back"
    assert answer.reason == "rolled_back: unhealthy"


def test_conflict_without_an_event_is_answered_after_the_grace() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", settled_on("1.0"))
    answer = waiter.wait(5, refine_s=0.01)
    assert answer is not None and not answer.ok and answer.event is None


# -- which answers end a ?wait (the judges: tests/test_answers.py) -------------------
@pytest.mark.parametrize(("kind", "body"), [
    ("state", state(update={"status": "available"})),  # notify mode: waits for install
    ("state", fallen_back("pulling")),  # not settled until the fallback runs
    ("events", {"event": "update_succeeded", "request_id": "r1", "tag": "2.0"}),
])
def test_answers_the_bridge_keeps_waiting_on(kind: str, body: dict[str, Any]) -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", kind, body)
    assert waiter.wait(0) is None


def test_settled_fallback_is_a_409() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", fallen_back())
    answer = waiter.wait(0)
    assert answer is not None and not answer.ok and answer.event == "fallback"


def test_installed_tag_with_a_stopped_container_is_a_200() -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev1", "r1", "2.0")
    send(fleet, "dev1", "state", state(running={"status": "exited"}))
    answer = waiter.wait(0)
    assert answer is not None and answer.ok and answer.outcome == "not_running"
