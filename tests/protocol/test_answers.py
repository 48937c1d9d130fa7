"""Unit tests of the judges shared by the bridge's ?wait and edge-ctl set-tag --wait."""

from __future__ import annotations

import pytest

from edge_agent.protocol.answers import Outcome, judge_event, judge_state, lookup
from tests.support.documents import fallen_back, settled_on, state


# -- state documents -------------------------------------------------------------------
def test_idle_state_running_our_tag_is_applied() -> None:
    answer = judge_state(state(), "r1", "2.0")
    assert answer is not None and answer.ok and answer.settled
    assert (answer.outcome, answer.reason, answer.event) == ("applied", "device runs 2.0", None)


@pytest.mark.parametrize("status", ["checking", "pulling", "installing", "verifying",
                                    "rolling_back", "error", None])
def test_busy_or_erroring_state_says_nothing_yet(status: str | None) -> None:
    assert judge_state(state(update={"status": status}), "r1", "2.0") is None


def test_state_for_another_request_is_ignored() -> None:
    assert judge_state(state(), "other", "2.0") is None
    assert judge_state(fallen_back(), "other", "2.0") is None
    assert judge_state({"desired": None}, "r1", "2.0") is None
    assert judge_state({"desired": "r1", "update": ["idle"]}, "r1", "2.0") is None
    assert judge_state({}, "r1", "2.0") is None


def test_idle_on_another_tag_is_not_applied_with_the_last_error() -> None:
    answer = judge_state(settled_on("1.0", update={"last_error": "rolled back: unhealthy"}),
                         "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert answer.outcome == "not_applied" and answer.event is None
    assert answer.reason == "device settled on '1.0' instead of '2.0': rolled back: unhealthy"
    plain = judge_state(settled_on("1.0"), "r1", "2.0")
    assert plain is not None and plain.reason == "device settled on '1.0' instead of '2.0'"


def test_idle_on_our_tag_with_a_stopped_container_is_not_running() -> None:
    answer = judge_state(state(running={"status": "exited"}), "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert answer.outcome == "not_running"
    assert answer.reason == "device has 2.0 but its container is exited"


def test_fallback_state_is_a_fallback_settled_once_idle() -> None:
    answer = judge_state(fallen_back(), "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert (answer.outcome, answer.event) == ("fallback", "fallback")
    assert answer.reason == "the device now runs the fallback tag latest instead: tag 2.0 not found"
    pulling = judge_state(fallen_back("pulling"), "r1", "2.0")
    assert pulling is not None and pulling.outcome == "fallback" and not pulling.settled


def test_fallback_left_from_another_tag_is_not_our_answer() -> None:
    assert judge_state(fallen_back("checking", requested="1.5"), "r1", "2.0") is None
    # idle: the device is judged on what it runs
    answer = judge_state(fallen_back(requested="1.5"), "r1", "2.0")
    assert answer is not None and answer.outcome == "not_applied"


def test_notify_mode_available_is_never_settled() -> None:
    answer = judge_state(settled_on("1.0", update={"status": "available"}), "r1", "2.0")
    assert answer is not None and not answer.ok and not answer.settled
    assert answer.outcome == "available"
    assert "edge-ctl install --device dev1" in answer.reason


# -- events -------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "outcome"), [
    ("rolled_back", "rolled_back"), ("update_failed", "failed"), ("fallback", "fallback"),
    ("tag_rejected", "rejected"), ("config_error", "config_error"),
    ("tag_superseded", "superseded")])
def test_failure_events_for_our_request_are_answers(name: str, outcome: str) -> None:
    answer = judge_event({"event": name, "request_id": "r1", "reason": "why"}, "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert (answer.outcome, answer.event) == (outcome, name)
    assert answer.reason.startswith(f"{name}: why")


def test_failure_event_reasons() -> None:
    failed = judge_event({"event": "update_failed", "request_id": "r1", "error": "boom"},
                         "r1", "2.0")
    assert failed is not None
    assert failed.reason == "update_failed: boom (the agent retries at its next check)"
    bare = judge_event({"event": "rolled_back", "request_id": "r1"}, "r1", "2.0")
    assert bare is not None and bare.reason == "rolled_back"


def test_a_pull_refused_for_lack_of_space_is_its_own_outcome() -> None:
    error = ("not enough disk space to pull 2.0: needs about 176 MB, 120 MB free on "
             "/var/lib/docker; the current container keeps running, retried at the next check")
    event = {"event": "update_failed", "request_id": "r1", "error": error,
             "code": "insufficient_space", "needed_bytes": 176 << 20, "free_bytes": 120 << 20}
    answer = judge_event(event, "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert (answer.outcome, answer.event) == ("insufficient_space", "update_failed")
    assert answer.reason == f"insufficient_space: {error}"
    unknown = judge_event({**event, "code": "made_up"}, "r1", "2.0")
    assert unknown is not None and unknown.outcome == "failed"


def test_a_superseded_request_is_answered_with_what_replaced_it() -> None:
    """A burst of desired tags is acted on at its newest only: the others' waiters get
    this answer instead of waiting for a state that will never name them."""
    event = {"event": "tag_superseded", "request_id": "r1", "tag": "2.0", "new_tag": "3.0",
             "superseded_by": "r2",
             "reason": "the device desired tag 2.0 was replaced by 3.0 (request r2) before "
                       "it was applied"}
    answer = judge_event(event, "r1", "2.0")
    assert answer is not None and not answer.ok and answer.settled
    assert (answer.outcome, answer.event) == ("superseded", "tag_superseded")
    assert answer.reason == ("tag_superseded: the device desired tag 2.0 was replaced by 3.0 "
                             "(request r2) before it was applied")
    # the newer request is answered by its own state and events, not by this one
    assert judge_event(event, "r2", "3.0") is None


def test_update_succeeded_for_our_tag_is_updated() -> None:
    answer = judge_event({"event": "update_succeeded", "request_id": "r1", "tag": "2.0"},
                         "r1", "2.0")
    assert answer is not None and answer.ok
    assert (answer.outcome, answer.event) == ("updated", "update_succeeded")
    # the update to the fallback tag carries our request id too
    assert judge_event({"event": "update_succeeded", "request_id": "r1", "tag": "latest"},
                       "r1", "2.0") is None


def test_other_events_say_nothing() -> None:
    assert judge_event({"event": "update_started", "request_id": "r1"}, "r1", "2.0") is None
    assert judge_event({"event": "container_exited", "request_id": "r1"}, "r1", "2.0") is None
    assert judge_event({"event": "rolled_back", "request_id": "r2"}, "r1", "2.0") is None
    assert judge_event({"event": "rolled_back"}, "r1", "2.0") is None
    assert judge_event({"event": ["rolled_back"], "request_id": "r1"}, "r1", "2.0") is None


def test_lookup() -> None:
    assert lookup({"a": {"b": 1}}, "a", "b") == 1
    assert lookup({"a": [1]}, "a", "b") is None
    assert lookup(None, "a") is None


def test_a_deferred_update_is_judged_deferred_and_not_settled() -> None:
    document = state(update={"status": "deferred", "deferred": {
        "tag": "2.0", "reason": "lock", "detail": "the app holds its update lock",
        "until": None}})
    answer = judge_state(document, "r1", "2.0")
    assert answer is not None
    assert (answer.outcome, answer.ok, answer.settled) == (Outcome.DEFERRED, False, False)
    assert answer.reason == ("update to 2.0 deferred until the app releases its lock (lock: "
                             "the app holds its update lock); the device applies it then")
