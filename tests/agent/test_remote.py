"""The desired-tag view across broker sessions (agent/remote.py): pure, no I/O, no clock."""

from __future__ import annotations

from edge_agent.agent.reconcile import RemoteTag
from edge_agent.agent.remote import REPLAY_GRACE_S, VIEW_HOLD_MAX_S, RemoteView
from edge_agent.protocol.state import Source

DEVICE, GROUP, FLEET = (Source.DEVICE, None), (Source.GROUP, "blue"), (Source.FLEET, None)


def test_an_incomplete_replay_never_replaces_the_view() -> None:
    view = RemoteView()
    view.lay(DEVICE, RemoteTag("1.0"))
    view.lay(GROUP, RemoteTag("2.0"))
    view.reset(now=100.0)
    view.lay(GROUP, RemoteTag("3.0"))  # replayed; the device tag not yet
    assert view.current == {DEVICE: RemoteTag("1.0"), GROUP: RemoteTag("3.0")}
    view.ready(now=101.0)  # granted: the device tag holds for the grace
    assert view.get(DEVICE) == RemoteTag("1.0")
    assert view.expire(now=101.0 + REPLAY_GRACE_S - 1) == 101.0 + REPLAY_GRACE_S
    assert view.expire(now=101.0 + REPLAY_GRACE_S) is None  # no replay came: cleared
    assert view.current == {GROUP: RemoteTag("3.0")}


def test_a_replay_within_the_grace_confirms_the_value() -> None:
    view = RemoteView()
    view.lay(DEVICE, RemoteTag("1.0"))
    view.reset(now=0.0)
    view.ready(now=0.0)
    view.lay(DEVICE, RemoteTag("1.0"))  # the late replay
    assert view.expire(now=REPLAY_GRACE_S * 2) is None
    assert view.get(DEVICE) == RemoteTag("1.0")


def test_a_retained_message_after_a_live_one_in_a_session_is_stale() -> None:
    view = RemoteView()
    view.reset(now=0.0)
    assert not view.stale(DEVICE, retained=True)  # the replay first: fine
    assert not view.stale(DEVICE, retained=False)  # live
    assert view.stale(DEVICE, retained=True)  # a replay after it: older
    assert not view.stale(GROUP, retained=True)  # another topic
    view.reset(now=1.0)
    assert not view.stale(DEVICE, retained=True)  # a new session replays what is current


def test_unconfirmed_topics_until_heard_or_the_hold_ends() -> None:
    view = RemoteView()
    assert view.unconfirmed([DEVICE, GROUP, FLEET], now=0.0) == []  # no session yet
    view.lay(GROUP, RemoteTag("2.0"))
    view.reset(now=10.0)
    view.lay(DEVICE, None)  # a message, even a clear, confirms
    assert view.unconfirmed([DEVICE, GROUP, FLEET], now=11.0) == [GROUP, FLEET]
    view.ready(now=12.0)  # complete: the group's value now waits for its replay only
    assert view.unconfirmed([DEVICE, GROUP, FLEET], now=13.0) == [GROUP]
    view.reset(now=20.0)  # a subscription refused for good: the hold ends all the same
    assert view.unconfirmed([GROUP], now=20.0 + VIEW_HOLD_MAX_S - 1) == [GROUP]
    assert view.unconfirmed([GROUP], now=20.0 + VIEW_HOLD_MAX_S) == []
