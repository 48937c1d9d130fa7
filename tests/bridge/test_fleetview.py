"""The fleet's counts (``bridge/fleetview.py``): pure, no I/O."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.bridge.fleetview import MAX_VERSIONS_SHOWN, OTHER_VERSIONS, Tally, summarize


def view(availability: str, status: str, tag: str | None) -> dict[str, Any]:
    return {"availability": availability, "last_event": None,
            "state": {"running": {"tag": tag}, "update": {"status": status},
                      "fallback": {"active": False}}}


VIEWS = st.builds(view, st.sampled_from(["online", "offline", "unknown"]),
                  st.sampled_from(["idle", "pulling", "error", "deferred", "available"]),
                  st.one_of(st.none(), st.sampled_from([f"1.{n}" for n in range(30)])))
UPDATES = st.lists(st.tuples(st.sampled_from([f"dev-{n}" for n in range(12)]),
                             st.one_of(st.none(), VIEWS)), max_size=60)


@given(UPDATES)
def test_a_tally_kept_one_device_at_a_time_counts_what_a_full_count_does(
        updates: list[tuple[str, dict[str, Any] | None]]) -> None:
    tally = Tally()
    final: dict[str, dict[str, Any]] = {}
    for device_id, shown in updates:
        tally.update(device_id, shown)
        if shown is None:
            final.pop(device_id, None)
        else:
            final[device_id] = shown
    assert tally.summary() == summarize(list(final.values()))


def test_counts_per_status_and_the_largest_versions() -> None:
    tally = Tally()
    tally.update("a", view("online", "pulling", "2.0"))
    tally.update("b", view("offline", "error", "1.0"))
    tally.update("a", view("online", "idle", "2.0"))
    summary = tally.summary()
    assert summary["devices"] == 2
    assert summary["counts"]["online"] == 1 and summary["counts"]["offline"] == 1
    assert summary["counts"]["updating"] == 0 and summary["counts"]["failed"] == 1
    assert summary["versions"] == [{"tag": "1.0", "devices": 1}, {"tag": "2.0", "devices": 1}]
    for n in range(MAX_VERSIONS_SHOWN + 3):
        tally.update(f"v{n}", view("online", "idle", f"9.{n}"))
    assert summary != tally.summary()
    # 2 + 23 versions of one device each: the first 20 by tag, the other 5 as one
    assert len(tally.summary()["versions"]) == MAX_VERSIONS_SHOWN + 1
    assert tally.summary()["versions"][-1] == {"tag": OTHER_VERSIONS, "devices": 5}
    tally.update("b", None)
    assert tally.summary()["devices"] == MAX_VERSIONS_SHOWN + 4
