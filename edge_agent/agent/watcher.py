"""Follows Docker events of the managed container so crashes and health changes reach
the state within a second, not at the next poll.

The watcher has its own thread and its own Engine (docker-py clients are not shared
across threads) and only enqueues ``ContainerEvent``s; the agent loop does the rest.
When the daemon goes away the stream ends or fails, and the watcher reconnects with
a capped backoff, forever, until stopped.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from edge_agent.agent.engine import Engine
from edge_agent.agent.loop import ContainerEvent, Message
from edge_agent.agent.reconcile import backoff_s

log = logging.getLogger(__name__)

RETRY_BASE_S = 1.0
RETRY_CAP_S = 30.0
# What changes the state document. exec_* events (every HEALTHCHECK run) and the
# like are left out: they would make the agent inspect the container every second.
ACTIONS = frozenset({
    "create", "start", "restart", "die", "oom", "kill", "stop", "pause", "unpause",
    "destroy", "rename", "health_status",
})
# Sent after (re)connecting to the daemon: events may have been missed meanwhile.
RESYNC = "resync"


def container_event(event: Mapping[str, Any], container_name: str) -> ContainerEvent | None:
    """The inbox message for one Docker event dict, or None when it does not matter.

    Docker's ``container`` filter also matches names that merely start with ours
    (``<name>-previous``), so the name is checked again here.
    """
    if event.get("Type") != "container":
        return None
    actor = event.get("Actor")
    if not isinstance(actor, Mapping):
        return None
    raw = actor.get("Attributes")
    attributes = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, Mapping) else {}
    if attributes.get("name") != container_name:
        return None
    action, _, detail = str(event.get("Action") or event.get("status") or "").partition(":")
    action = action.strip()
    if action not in ACTIONS:
        return None
    if action == "health_status":
        attributes["health_status"] = detail.strip()
    if actor.get("ID"):
        attributes["id"] = str(actor["ID"])
    return ContainerEvent(action, attributes)


class ContainerWatcher:
    """A daemon thread turning Docker events of ``container_name`` into inbox messages."""

    def __init__(
        self,
        container_name: str,
        inbox: queue.Queue[Message],
        *,
        connect_engine: Callable[[], Engine] = Engine.connect,
    ) -> None:
        self.container_name = container_name
        self._inbox = inbox
        self._connect_engine = connect_engine
        self._stop = threading.Event()
        # A daemon thread: a stream blocked on a quiet daemon cannot be interrupted,
        # and must not keep the agent's process alive after the loop has stopped.
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        failures = 0
        first = True
        while not self._stop.is_set():
            reason, reached = self._follow(resync=not first)
            first = False
            if self._stop.is_set():
                break
            # A daemon that answered and then went away gets the short delay again.
            failures = 1 if reached else failures + 1
            delay = backoff_s(failures, RETRY_BASE_S, RETRY_CAP_S)
            level = logging.WARNING if reached or failures == 1 else logging.DEBUG
            log.log(level, "Docker events of %s stopped (%s); reconnecting in %.0f s",
                    self.container_name, reason, delay)
            self._stop.wait(delay)

    def _follow(self, *, resync: bool) -> tuple[str, bool]:
        """Stream events until the stream ends or fails; return why, and whether the
        daemon answered at all."""
        engine: Engine | None = None
        reached = False
        try:
            engine = self._connect_engine()
            reached = True
            stream = engine.events(self.container_name)
            if resync:
                log.info("following Docker events of %s again", self.container_name)
                self._inbox.put(ContainerEvent(RESYNC))
            for event in stream:
                if self._stop.is_set():
                    return "stopped", reached
                message = container_event(event, self.container_name)
                if message is not None:
                    log.debug("docker event %s %s", message.action, message.attributes.get("id"))
                    self._inbox.put(message)
            return "the daemon closed the stream", reached
        except Exception as exc:  # noqa: BLE001 - whatever broke, the answer is to reconnect
            return str(exc) or type(exc).__name__, reached
        finally:
            if engine is not None:
                try:
                    engine.close()
                except Exception:  # closing a dead client may fail too
                    log.debug("closing the events client failed", exc_info=True)
