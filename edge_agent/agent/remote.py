"""A device's desired tags (or agent versions) from MQTT, one broker session after another.

Docker-free and clock-free (the caller passes ``now``, monotonic seconds): the agent's
loop keeps two of these (app tags, agent versions) and the fleet simulator one per
device, so both follow the same rules:

- At a (re)connect (``reset``) the broker replays its retained tags, one topic at a
  time, and a subscription may be granted late (a cluster node that just took over).
  Until every tag subscription is granted (``ready``) the last complete view holds,
  with what the new session brings laid over it. Then the session's tags replace it;
  a tag it has not replayed yet keeps its value ``REPLAY_GRACE_S`` more (``expire``).
- ``unconfirmed``: the topics whose value this session has not confirmed yet. The
  agent changes version on none of them (at most ``VIEW_HOLD_MAX_S`` after the reconnect).
- ``stale``: a retained replay after a live message on its topic in the same session
  is older than that live one.
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_agent.agent.reconcile import RemoteTag
from edge_agent.protocol.state import Source

# A broker node that just took over may send its retained messages well after granting
# the subscriptions: a value not replayed by ``ready`` holds this long, then goes.
REPLAY_GRACE_S = 10.0
# A subscription refused for good (an ACL mistake) holds changes of version back at
# most this long after the reconnect; then the agent acts on what it knows.
VIEW_HOLD_MAX_S = 120.0

RemoteKey = tuple[Source, str | None]  # (scope, group)


class RemoteView:
    """The desired value of each topic (device, each group, fleet) as far as known."""

    def __init__(self) -> None:
        self.current: dict[RemoteKey, RemoteTag] = {}
        # the session's own view while its replay is incomplete (None: complete)
        self._next: dict[RemoteKey, RemoteTag] | None = None
        self._unreplayed: dict[RemoteKey, float] = {}  # key -> until when it still counts
        self._heard: set[RemoteKey] = set()  # a message came this session
        self._live: set[RemoteKey] = set()  # a live (not retained) one came this session
        self.session_at: float | None = None  # when the session began (None: none yet)

    def get(self, key: RemoteKey) -> RemoteTag | None:
        return self.current.get(key)

    def reset(self, now: float) -> None:
        """A new session: its replay replaces the view at ``ready``."""
        self._next = {}
        self._heard.clear()
        self._live.clear()
        self.session_at = now

    def ready(self, now: float) -> None:
        """Every tag subscription is granted: the session's view replaces the last one;
        what it has not replayed yet keeps its value until ``now + REPLAY_GRACE_S``."""
        if self._next is None:
            return
        fresh, self._next = self._next, None
        for key, value in self.current.items():
            if key not in fresh:
                fresh[key] = value
                self._unreplayed[key] = now + REPLAY_GRACE_S
        self.current = fresh

    def stale(self, key: RemoteKey, *, retained: bool) -> bool:
        """Whether a message for ``key`` is a replay older than a live one this session
        already brought (a retained message after a live one on the same topic)."""
        if not retained:
            self._live.add(key)
            return False
        return key in self._live

    def lay(self, key: RemoteKey, value: RemoteTag | None) -> None:
        """A message for ``key`` (None: cleared), in the view and the session's own."""
        self._unreplayed.pop(key, None)
        self._heard.add(key)
        for view in (self.current, self._next):
            if view is None:
                continue
            if value is None:
                view.pop(key, None)
            else:
                view[key] = value

    def expire(self, now: float) -> float | None:
        """Drop the values no replay confirmed within the grace (cleared meanwhile);
        when the last one still waiting goes (None: none waits)."""
        for key, until in list(self._unreplayed.items()):
            if until <= now:
                del self._unreplayed[key]
                self.current.pop(key, None)
        return max(self._unreplayed.values(), default=None)

    def unconfirmed(self, keys: Iterable[RemoteKey], now: float) -> list[RemoteKey]:
        """Those of ``keys`` whose value this session has not confirmed yet (no message
        for it, while the replay is incomplete or its grace runs); none once
        VIEW_HOLD_MAX_S have passed since the reconnect."""
        if self.session_at is None or now >= self.session_at + VIEW_HOLD_MAX_S:
            return []
        replaying = self._next is not None
        return [key for key in keys
                if key in self._unreplayed or (replaying and key not in self._heard)]
