"""When a pending update waits: outside the maintenance window (``UPDATE_WINDOW``), while
the app holds its update lock (``UPDATE_LOCK_FILE``), or during a fleet-wide change's
random spread delay. ``decide_deferral`` is the pure rule; ``UpdateGate`` feeds it the
clock and the lock file and remembers how long the lock has held this update back.

The lock follows balena's convention: it is held while the file exists. The app creates
it before critical work and removes it after; the agent only looks (``lstat``) and never
creates or deletes it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_agent.agent.window import UpdateWindow
from edge_agent.protocol.state import DeferReason
from edge_agent.protocol.timestamps import format_utc

log = logging.getLogger(__name__)

# While an update waits on the lock, the file is looked at this often (a stat, no
# registry traffic): the update follows a release within this much.
LOCK_POLL_S = 2.0


@dataclass(frozen=True)
class Deferral:
    """An update to ``tag`` held back, why, and when it may go ahead (epoch s; None:
    when the lock is released, with no maximum hold)."""

    tag: str
    reason: DeferReason
    detail: str
    until: float | None

    def to_json(self) -> dict[str, Any]:
        """``update.deferred`` of the state document (and the event's fields)."""
        return {"tag": self.tag, "reason": str(self.reason), "detail": self.detail,
                "until": None if self.until is None else format_utc(self.until)}


@dataclass(frozen=True)
class Decision:
    """``deferral`` None: go ahead; ``lock_overridden``: although the lock is held, as it
    has held this update back for the maximum hold."""

    deferral: Deferral | None
    lock_overridden: bool = False


def decide_deferral(  # noqa: PLR0913 - the facts of one decision, keyword-only
    *, tag: str, now: float, window: UpdateWindow | None, lock_held: bool,
    lock_deferred_since: float | None, max_hold_s: float,
) -> Decision:
    """Whether an update to ``tag`` may run at ``now`` (epoch s). The window comes
    first (a lock released outside it changes nothing); ``lock_deferred_since`` is when
    the lock first held this tag back (None: not yet); ``max_hold_s`` 0 is no maximum."""
    if window is not None:
        moment = datetime.fromtimestamp(now, UTC)
        if not window.is_open(moment):
            opens = window.next_open(moment).timestamp()
            return Decision(Deferral(tag, DeferReason.WINDOW,
                                     f"outside the maintenance window {window}", opens))
    if not lock_held:
        return Decision(None)
    since = now if lock_deferred_since is None else lock_deferred_since
    if max_hold_s > 0 and now - since >= max_hold_s:
        return Decision(None, lock_overridden=True)
    until = since + max_hold_s if max_hold_s > 0 else None
    return Decision(Deferral(tag, DeferReason.LOCK, "the app holds its update lock", until))


class UpdateGate:
    """The agent's window and lock, with the memory ``decide_deferral`` needs."""

    def __init__(self, window: UpdateWindow | None, lock_file: Path | None,
                 max_hold_s: float) -> None:
        self.window = window
        self.lock_file = lock_file
        self.max_hold_s = max_hold_s
        # (tag, when the lock first held it back)
        self._lock_since: tuple[str, float] | None = None
        self._overridden: str | None = None  # the tag whose override was logged
        self._unreadable: str | None = None  # the lock error logged

    @property
    def active(self) -> bool:
        return self.window is not None or self.lock_file is not None

    def lock_held(self) -> bool:
        """Whether the lock file exists. One that cannot be looked at counts as held
        (the app may be in its critical work); the maximum hold still applies."""
        if self.lock_file is None:
            return False
        try:
            os.lstat(self.lock_file)
        except (FileNotFoundError, NotADirectoryError):
            self._unreadable = None
            return False
        except OSError as exc:
            said = f"{exc.strerror}"
            if said != self._unreadable:
                log.warning("cannot look at the update lock %s (%s); it counts as held",
                            self.lock_file, said)
                self._unreadable = said
            return True
        self._unreadable = None
        return True

    def consider(self, tag: str, *, force: bool = False) -> Deferral | None:
        """The deferral of an update to ``tag`` now, or None to go ahead."""
        now = time.time()
        held = self.lock_held()
        since = self._lock_since[1] if self._lock_since and self._lock_since[0] == tag else None
        decision = decide_deferral(tag=tag, now=now, window=self.window, lock_held=held,
                                   lock_deferred_since=since, max_hold_s=self.max_hold_s)
        deferral = decision.deferral
        if not held:
            self._lock_since = None
        elif deferral is not None and deferral.reason is DeferReason.LOCK and since is None:
            self._lock_since = (tag, now)
        if decision.lock_overridden and self._overridden != tag:
            log.warning("the update lock %s has held the update to %s back for %.0f s "
                        "(UPDATE_LOCK_MAX_HOLD); updating anyway", self.lock_file, tag,
                        now - (since or now))
            self._overridden = tag
        if deferral is not None and force:
            log.info("forced: updating to %s now despite the %s (%s)", tag, deferral.reason,
                     deferral.detail)
            return None
        return deferral
