"""edge-ctl's rollout text (``rollout_view``) and spec building (``rollouts``): pure, no I/O.
End to end against a real bridge: test_rollouts.py."""

from __future__ import annotations

import argparse
import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.ctl.cli import build_parser
from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CtlError
from edge_agent.ctl.rollout_view import changes, final, rollout_text, rollouts_table, when
from edge_agent.ctl.rollouts import build_spec, parse_waves
from tests.support.hostile import FORBIDDEN

TS = "2026-01-02T03:04:05.000Z"


def device(device_id: str, outcome: str = "pending", reason: str | None = None
           ) -> dict[str, Any]:
    return {"device_id": device_id, "outcome": outcome, "reason": reason,
            "request_id": None, "previous_tag": "1.0"}


def rollout(state: str = "running", reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "ro-20260102030405-ab12",
        "spec": {"tag": "2.0", "target": {"group": "lab"}, "waves": [1, "100%"],
                 "max_updating": 2, "on_halt": "stop", "unreachable": "wait"},
        "state": state, "reason": reason, "created_at": TS, "updated_at": TS,
        "ended_at": None, "current_wave": 0,
        "waves": [
            {"index": 0, "state": "running", "started_at": TS, "ended_at": None,
             "devices": [device("dev-1", "sent")]},
            {"index": 1, "state": "pending", "started_at": None, "ended_at": None,
             "devices": [device("dev-2"), device("dev-3")]},
        ],
        "counts": {"pending": 2, "sent": 1, "succeeded": 0},
    }


def start_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["rollout", "start", *argv])


# -- the spec -------------------------------------------------------------------------------
def test_the_options_make_the_spec_of_the_contract() -> None:
    args = start_args("--tag", "2.0", "--group", "lab", "--canary", "dev-1,dev-2",
                      "--waves", "25%,100%", "--max-updating", "3",
                      "--success-threshold", "0.9", "--failure-threshold", "0.1",
                      "--wave-timeout", "600", "--on-halt", "revert", "--unreachable", "skip")
    assert build_spec(args) == {
        "tag": "2.0", "target": {"group": "lab"}, "waves": [["dev-1", "dev-2"], "25%", "100%"],
        "max_updating": 3, "success_threshold": 0.9, "failure_threshold": 0.1,
        "wave_timeout_s": 600.0, "on_halt": "revert", "unreachable": "skip"}


def test_options_not_given_are_left_to_the_bridge() -> None:
    assert build_spec(start_args("--tag", "2.0", "--fleet")) == {
        "tag": "2.0", "target": {"fleet": True}}
    assert build_spec(start_args("--tag", "2.0", "-d", "a", "-d", "b"))["target"] == {
        "devices": ["a", "b"]}


def test_waves_keep_what_the_bridge_judges() -> None:
    # zero is sent: the bridge refuses it in its own words
    assert parse_waves("1, 0,25%,100.5%") == [1, 0, "25%", "100.5%"]
    with pytest.raises(CtlError) as raised:
        parse_waves("1,half")
    assert raised.value.code == EXIT_USAGE and "half" in str(raised.value)


def test_a_target_is_required_and_only_one() -> None:
    with pytest.raises(SystemExit):
        start_args("--tag", "2.0")
    with pytest.raises(SystemExit):
        start_args("--tag", "2.0", "--fleet", "--group", "lab")


# -- text -----------------------------------------------------------------------------------
def test_show_names_the_waves_and_every_device() -> None:
    text = rollout_text(rollout("halted", "wave 1 halted: dev-1 rolled_back"))
    assert "rollout ro-20260102030405-ab12: halted" in text
    assert "tag 2.0 to group lab" in text
    assert "reason: wave 1 halted: dev-1 rolled_back" in text
    assert "wave 1/2  running  1 device" in text and "wave 2/2  pending  2 devices" in text
    for device_id in ("dev-1", "dev-2", "dev-3"):
        assert device_id in text


def test_list_has_a_row_per_rollout() -> None:
    lines = rollouts_table([rollout(), rollout("succeeded")]).splitlines()
    assert lines[0].split() == ["ROLLOUT", "STATE", "TAG", "TARGET", "WAVE", "DONE", "CREATED",
                                "REASON"]
    assert lines[1].split()[:7] == ["ro-20260102030405-ab12", "running", "2.0", "group", "lab",
                                    "1/2", "0/3"]
    assert lines[2].split()[1] == "succeeded"


def test_watch_prints_what_changed_and_only_that() -> None:
    before = rollout()
    assert [c.obj["type"] for c in changes(None, before)] == ["rollout", "wave", "device"]
    assert changes(before, copy.deepcopy(before)) == []
    after = copy.deepcopy(before)
    after["waves"][0]["devices"][0].update(outcome="failed", reason="rolled_back: unhealthy")
    after["waves"][0]["state"] = "halted"
    after.update(state="halted", reason="wave 1 halted: 1 of 1 devices failed")
    # in the order it happened; the rollout's end is final()'s line
    texts = [c.text for c in changes(before, after)]
    assert texts == ["  wave 1  dev-1  sent -> failed: rolled_back: unhealthy",
                     f"wave 1/2  halted  1 device  started {when(TS)}"]
    paused = copy.deepcopy(before)
    paused["state"] = "paused"
    assert [c.text for c in changes(before, paused)] == ["rollout ro-20260102030405-ab12 paused"]


def test_watch_ends_with_the_rollouts_end() -> None:
    assert final(rollout()) is None
    assert final(rollout("paused")) is None
    done = rollout("succeeded")
    for wave in done["waves"]:
        for entry in wave["devices"]:
            entry["outcome"] = "succeeded"
    assert final(done) == (EXIT_OK, "rollout ro-20260102030405-ab12 succeeded: 3 of 3 devices "
                                    "on 2.0 (2 pending, 1 sent)")
    code, text = final(rollout("aborted", "aborted by the operator")) or (None, "")
    assert code == EXIT_FAILED and "aborted: aborted by the operator" in text


def test_device_strings_cannot_write_to_the_terminal() -> None:
    evil = "\x1b[2J\r\nforged line\u202e"
    document = rollout("halted", evil)
    document["waves"][0]["devices"][0].update(device_id=evil, reason=evil, outcome=evil)
    outputs = [rollout_text(document), rollouts_table([document]),
               *(c.text for c in changes(rollout(), document)), (final(document) or (0, ""))[1]]
    for output in outputs:
        assert not any(char in output for char in FORBIDDEN), repr(output)
        assert "forged line" in output or output == ""


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["id", "state", "waves", "devices", "device_id",
                                       "outcome", "reason", "spec", "tag", "target", "counts",
                                       "index", "created_at", "started_at", "x"]),
                      children, max_size=6),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(old=JSON_VALUES, new=JSON_VALUES)
def test_any_document_is_shown_without_raising(old: Any, new: Any) -> None:
    """What the bridge sends is read field by field: wrong types show as ?, never crash."""
    rollout_text(new)
    rollouts_table([new, old])
    changes(old, new)
    changes(None, new)
    final(new)
