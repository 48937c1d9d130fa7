"""Which answers end ``set-tag --wait``, and what it reports (pure: scripted messages,
no broker; the judges themselves: tests/protocol/test_answers.py; against real agents:
test_commands.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from edge_agent.ctl.render import Printer
from edge_agent.ctl.waiting import report_outcome, wait_for_tag
from edge_agent.protocol.mqtt import Incoming
from edge_agent.protocol.topics import Topics
from tests.support.documents import fallen_back, state


class ScriptedSession:
    """What wait_for_tag reads of a Session: its topics and these messages, in order."""

    def __init__(self, *messages: tuple[str, dict[str, Any]]) -> None:
        self.topics = Topics("edge")
        self.script = [Incoming(self.topics.state("dev1") if kind == "state"
                                else self.topics.events("dev1"), json.dumps(body).encode(),
                                False) for kind, body in messages]

    def messages(self, timeout_s: float | None) -> Iterator[Incoming]:
        yield from self.script


def set_tag_wait(*messages: tuple[str, dict[str, Any]]) -> tuple[int, dict[str, Any], str]:
    """(exit code, JSON result, human stderr) of waiting for tag 2.0, request r1."""
    results = []
    for as_json in (True, False):
        out, err = io.StringIO(), io.StringIO()
        printer = Printer(as_json, out, err)
        waited = wait_for_tag(ScriptedSession(*messages), "dev1", "2.0", "r1", 1.0, printer)
        results.append((report_outcome("dev1", "2.0", "r1", waited, 1.0, printer),
                        out.getvalue(), err.getvalue()))
    (code, json_out, _), (human_code, _, human_err) = results
    assert code == human_code
    return code, json.loads(json_out), human_err


def test_wait_ends_on_the_state_or_update_succeeded() -> None:
    code, result, _ = set_tag_wait(("state", state(update={"status": "verifying"})),
                                   ("state", state()))
    assert code == EXIT_OK and result["outcome"] == "unchanged" and result["reason"] is None
    code, result, _ = set_tag_wait(("events", {"event": "update_started", "request_id": "r1"}),
                                   ("events", {"event": "update_succeeded", "request_id": "r1",
                                               "tag": "2.0"}))
    assert code == EXIT_OK and result["outcome"] == "updated" and result["state"] is None


def test_notify_mode_available_ends_the_wait_with_the_install_hint() -> None:
    code, result, err = set_tag_wait(("state", state(update={"status": "available"})))
    assert code == EXIT_FAILED and result["outcome"] == "available"
    assert "edge-ctl install --device dev1" in err


def test_fallback_ends_the_wait_on_the_settled_state_not_on_the_event() -> None:
    code, result, err = set_tag_wait(
        ("events", {"event": "fallback", "request_id": "r1", "requested_tag": "2.0",
                    "tag": "latest", "reason": "tag 2.0 not found"}),
        ("state", fallen_back("pulling")),
        ("state", fallen_back("idle")))
    assert code == EXIT_FAILED and result["outcome"] == "fallback"
    assert result["state"]["update"]["status"] == "idle"
    assert result["state"]["fallback"]["active"] is True
    assert "2.0 not applied: the device now runs the fallback tag latest instead: tag 2.0 " \
        "not found" in err


def test_progress_names_the_tag_actually_pulled() -> None:
    """A mistyped tag: the device pulls the fallback, and the operator is told so."""
    _, _, err = set_tag_wait(
        ("events", {"event": "update_started", "request_id": "r1", "from_tag": "1.0",
                    "to_tag": "latest"}),
        ("events", {"event": "pull_progress", "request_id": "r1", "tag": "latest",
                    "progress": 50.0}),
        ("state", fallen_back("idle")))
    assert "updating 1.0 -> latest" in err and "pulling latest" in err, err
    assert "-> 2.0" not in err and "pulling 2.0" not in err, err


def test_a_stale_fallback_does_not_end_the_wait() -> None:
    # 2.0 fell back earlier and has been pushed since: while the new check runs the state
    # still shows the old fallback; the answer is what that check settles on.
    code, result, _ = set_tag_wait(("state", fallen_back("checking")), ("state", state()))
    assert code == 0 and result["outcome"] == "unchanged"


def test_stopped_container_is_not_applied() -> None:
    code, result, _ = set_tag_wait(("state", state(running={"status": "exited"})))
    assert code == EXIT_FAILED and result["outcome"] == "not_running"


def test_no_answer_is_a_timeout_with_the_last_state() -> None:
    code, result, err = set_tag_wait(("state", state(update={"status": "pulling",
                                                             "progress": 40})))
    assert code == EXIT_TIMEOUT and result["outcome"] == "timeout" and result["ok"] is False
    assert "no answer from dev1 within 1 s (last seen running 2.0, pulling 40%)" in err


# The agent's tag_superseded event (docs/PROTOCOL.md): r1 (2.0) replaced on its topic.
REPLACED = {"event": "tag_superseded", "ts": "2026-11-29T10:08:03.480Z", "device_id": "dev1",
            "request_id": "r1", "tag": "2.0", "superseded_by": "r2", "new_tag": "3.0",
            "reason": "the device desired tag 2.0 was replaced by 3.0 (request r2) before it "
                      "was applied"}


def test_a_superseded_request_ends_the_wait_with_what_replaced_it() -> None:
    code, result, err = set_tag_wait(
        ("events", {"event": "update_started", "request_id": "r1", "from_tag": "1.0"}),
        ("events", {"event": "pull_progress", "request_id": "r1", "progress": 30}),
        ("state", state(desired={"tag": "3.0", "request_id": "r2"},
                        update={"status": "pulling"})),
        ("events", REPLACED),
        ("state", state(desired={"tag": "3.0", "request_id": "r2"})))
    assert code == EXIT_FAILED
    assert result["outcome"] == "superseded" and result["ok"] is False
    assert (result["new_tag"], result["superseded_by"]) == ("3.0", "r2")
    assert result["reason"] == f"tag_superseded: {REPLACED['reason']}"
    assert "edge-ctl: dev1: 2.0 not applied: replaced by 3.0 (request r2) before it was " \
           "applied\n" in err


def test_a_request_whose_tag_was_cleared_is_superseded_too() -> None:
    cleared = {**REPLACED, "superseded_by": None, "new_tag": None,
               "reason": "the device desired tag 2.0 was cleared before it was applied"}
    code, result, err = set_tag_wait(("events", cleared))
    assert code == EXIT_FAILED and result["outcome"] == "superseded"
    assert (result["new_tag"], result["superseded_by"]) == (None, None)
    assert "dev1: 2.0 not applied: cleared before it was applied\n" in err


def test_another_requests_supersession_is_not_an_answer() -> None:
    code, result, _ = set_tag_wait(("events", {**REPLACED, "request_id": "r0"}),
                                   ("state", state()))
    assert code == EXIT_OK and result["outcome"] == "unchanged"


DEFERRED = {"status": "deferred", "progress": None, "last_check_at": None,
            "last_success_at": None, "last_error": None,
            "deferred": {"tag": "2.0", "reason": "window", "detail": "outside 02:00-04:00",
                         "until": "2024-05-02T02:00:00.000Z"}}


def test_a_deferred_update_keeps_the_wait_going_and_says_until_when() -> None:
    """Unlike notify mode's available, the device applies a deferred update by itself."""
    code, result, err = set_tag_wait(("state", state(update=DEFERRED)))
    assert code == EXIT_TIMEOUT and result["outcome"] == "timeout"
    assert "deferred (window until 2024-05-02 " in err
    code, result, _ = set_tag_wait(("state", state(update=DEFERRED)),
                                   ("events", {"event": "update_succeeded", "request_id": "r1",
                                               "tag": "2.0"}))
    assert code == EXIT_OK and result["outcome"] == "updated"
