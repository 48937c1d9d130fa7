"""Unit tests of the device registry and of how ?wait uses the answers (no broker).
The judges themselves are tested in tests/test_answers.py."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edge_agent.bridge.fleet import Fleet, TooManyWaiters
from edge_agent.protocol.topics import Topics
from tests.support.documents import fallen_back, settled_on, state

T = Topics("edge")


def listed(fleet: Fleet, device_id: str) -> dict[str, Any]:
    """The device as the fleet shows it; it must be listed."""
    device = fleet.device(device_id)
    assert device is not None, f"{device_id} is not listed"
    return device


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
    assert listed(fleet, "a")["last_seen"] == "2024-05-01T12:00:00.000Z"


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
    send(fleet, "a", "events", {"event": "rolled_back", "ts": "2024-05-01T12:00:00.000Z",
                                "reason": "unhealthy", "digest": "sha256:x"})
    send(fleet, "a", "events", {"event": "pull_progress", "progress": 50})
    assert listed(fleet, "a")["last_event"] == {
        "event": "rolled_back", "ts": "2024-05-01T12:00:00.000Z", "reason": "unhealthy"}


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


# -- device data is untrusted ----------------------------------------------------------
class Clock:
    """Wall clock and monotonic clock for a Fleet, moved by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def wall(self) -> float:
        return self.now

    def mono(self) -> float:
        return self.now


@pytest.mark.parametrize("ts", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00",
                                "9999-12-31T23:59:59.999999", "2100-01-01T00:00:00Z"])
def test_an_impossible_ts_never_breaks_the_list_and_a_good_state_replaces_it(ts: str) -> None:
    clock = Clock()
    fleet = Fleet(T, clock=clock.wall, monotonic=clock.mono)
    send(fleet, "good", "state", state(device_id="good"), retained=True)
    send(fleet, "bad", "state", state(device_id="bad", ts=ts), retained=True)
    devices = json.loads(fleet.list_json())
    assert [d["id"] for d in devices] == ["bad", "good"]
    assert devices[0]["last_seen"] is None  # an impossible ts says nothing
    assert devices[1]["last_seen"] == "2024-05-01T12:00:00.000Z"
    # a date beyond what the bridge can show is left out; 2100 is a date, just not now
    assert ("ts" in devices[0]["state"]) == ts.startswith("2100")
    good = state(device_id="bad", ts="2027-01-15T08:00:00.000Z")
    send(fleet, "bad", "state", good)
    assert fleet.device("bad") == {**devices[0], "state": good,
                                   "last_seen": "2027-01-15T08:00:00.000Z"}


def test_an_invalid_state_replaces_the_shown_one_with_none() -> None:
    fleet = Fleet(T)
    send(fleet, "a", "availability", b"online")
    send(fleet, "a", "state", state())
    send(fleet, "a", "state", b"[" * 100)
    assert listed(fleet, "a")["state"] is None


def test_bad_data_is_logged_once_per_device_until_it_is_good_again(
    caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(T)
    for _ in range(5):
        send(fleet, "a", "state", b"\xff")
        send(fleet, "a", "availability", b"maybe")
    assert len(caplog.records) == 2
    send(fleet, "a", "state", state())
    send(fleet, "a", "state", b"\xff")
    assert len(caplog.records) == 3


def test_device_ids_outside_the_id_grammar_are_ignored() -> None:
    fleet = Fleet(T)
    for device in ("-x", "a b", "x" * 65, "ü", "<b>"):
        fleet.handle(f"edge/devices/{device}/availability", b"online")
    assert len(fleet) == 0


def test_a_flooding_device_is_throttled_its_latest_state_shown_others_untouched(
    caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    fleet = Fleet(T, clock=clock.wall, monotonic=clock.mono)
    big = state(update={"last_error": "e" * 1500})
    for i in range(2000):
        send(fleet, "noisy", "state", {**big, "latest_version": str(i)})
        send(fleet, "noisy", "events", {"event": "rolled_back", "reason": str(i)})
    send(fleet, "calm", "state", state(device_id="calm"))
    assert listed(fleet, "calm")["state"] == state(device_id="calm")
    shown = fleet.device("noisy")
    assert shown is not None and shown["state"]["latest_version"] != "1999"
    # once the budget allows again, the latest state is shown, not a backlog
    clock.now += 1
    fleet.flush_pending()
    shown = fleet.device("noisy")
    assert shown is not None and shown["state"]["latest_version"] == "1999"
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "noisy" in warnings[0].getMessage()
    # then a resync of retained states, once the flood has been over for a while
    assert not fleet.resync_due()
    clock.now += 3
    assert fleet.resync_due() and not fleet.resync_due()
    # and a device that slowed down is back to normal
    clock.now += 10
    send(fleet, "noisy", "events", {"event": "rolled_back", "reason": "last"})
    assert listed(fleet, "noisy")["last_event"]["reason"] == "last"


def test_an_ordinary_update_is_within_the_budget() -> None:
    """An agent pulling an image: ~100 progress events and states in a second."""
    fleet = Fleet(T, monotonic=lambda: 0.0)
    send(fleet, "a", "availability", b"online")
    for percent in range(100):
        send(fleet, "a", "events", {"event": "pull_progress", "progress": percent})
        send(fleet, "a", "state", state(update={"status": "pulling", "progress": percent}))
    send(fleet, "a", "events", {"event": "update_succeeded", "tag": "2.0"})
    send(fleet, "a", "state", state())
    shown = fleet.device("a")
    assert shown is not None and shown["state"] == state()
    assert shown["last_event"] == {"event": "update_succeeded", "tag": "2.0"}
    assert not fleet.resync_due()
