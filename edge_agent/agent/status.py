"""The agent's observable state: the state document and the event stream.

``Status`` is the only place the update status changes; every change is pushed to
the sinks (the status file, MQTT) so dashboards see the same thing everywhere.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.agent.deferral import Deferral
from edge_agent.agent.discovery import update_payload
from edge_agent.agent.reconcile import Desired
from edge_agent.agent.selfupdate import AgentView, running_agent_version
from edge_agent.protocol.events import EventName, FailureCode, bounded_text, event_body
from edge_agent.protocol.state import BUSY, UpdateStatus
from edge_agent.protocol.timestamps import utc_now

log = logging.getLogger(__name__)

class _Current(enum.Enum):
    REQUEST = "the current desired tag's request"


# ``Status.event``'s default: the event belongs to the current desired tag's request.
CURRENT_REQUEST = _Current.REQUEST

StateSink = Callable[[dict[str, Any]], None]
EventSink = Callable[[dict[str, Any]], None]


@dataclass
class RunningView:
    """The managed container as shown to dashboards."""

    tag: str | None = None
    digest: str | None = None
    container_id: str | None = None
    status: str = "missing"
    health: str | None = None
    started_at: str | None = None
    restart_count: int = 0


@dataclass
class FallbackView:
    active: bool = False
    requested_tag: str | None = None
    reason: str | None = None


@dataclass
class Status:
    """Everything the state document shows, plus the sinks it is published to."""

    device_id: str
    image: str
    desired: Desired | None = None
    groups: tuple[str, ...] = ()  # DEVICE_GROUPS, in precedence order
    running: RunningView = field(default_factory=RunningView)
    fallback: FallbackView = field(default_factory=FallbackView)
    update_status: UpdateStatus = UpdateStatus.IDLE
    progress: float | None = None
    latest_version: str | None = None
    last_check_at: str | None = None
    last_success_at: str | None = None
    last_error: str | None = None
    # The code of a failure that has one, and its error: shown while that error is the last
    failure_code: tuple[FailureCode, str] | None = None
    # The pending update held back (update.status deferred), and the (tag, reason) whose
    # update_deferred event went out: said once per pending tag and reason.
    deferred: Deferral | None = None
    deferral_announced: tuple[str, str] | None = None
    # When the registry last answered a digest question (found or not): the healthcheck's
    # proof that the agent can do its job. Kept out of the MQTT state, in status.json only.
    registry_answered_at: str | None = None
    # the agent's own update (docs/SELF-UPDATE.md)
    agent: AgentView = field(default_factory=AgentView)
    state_sinks: list[StateSink] = field(default_factory=list)
    event_sinks: list[EventSink] = field(default_factory=list)
    last_published: float = 0.0

    def set_update(
        self, status: UpdateStatus, *, progress: float | None = None, error: str | None = None
    ) -> None:
        """Move the update status; the one place it changes. Publishes the new state."""
        if status is not self.update_status:
            log.debug("update status %s -> %s", self.update_status, status)
        if status is not UpdateStatus.DEFERRED:
            self.deferred = None
        if status is UpdateStatus.IDLE or status in BUSY:
            self.deferral_announced = None  # applied, or nothing pending: the next is news
        self.update_status = status
        self.progress = progress
        if error is not None:
            self.last_error = error
        self.publish()

    def defer(self, deferral: Deferral) -> None:
        """Show the pending update to ``deferral.tag`` as held back; its event goes out
        once per tag and reason, not at every check."""
        self.deferred = deferral
        self.latest_version = deferral.tag
        key = (deferral.tag, str(deferral.reason))
        if key != self.deferral_announced:
            self.deferral_announced = key
            when = deferral.to_json()["until"] or "the lock is released"
            log.info("update to %s deferred until %s: %s", deferral.tag, when, deferral.detail)
            self.event(EventName.UPDATE_DEFERRED, **deferral.to_json())
        self.set_update(UpdateStatus.DEFERRED)

    def event(self, name: EventName, request_id: str | _Current | None = CURRENT_REQUEST,
              **fields: Any) -> None:
        """Emit one event to every sink, stamped with time and the request it answers: by
        default the current desired tag's; ``None`` for none."""
        if request_id is CURRENT_REQUEST:
            request_id = self.desired.request_id if self.desired is not None else None
        body = event_body(name, self.device_id, request_id, **fields)
        for sink in self.event_sinks:
            _call_sink(sink, body)

    def publish(self) -> None:
        """Push the state document to every sink."""
        self.last_published = time.monotonic()
        document = self.document()
        for sink in self.state_sinks:
            _call_sink(sink, document)

    def document(self) -> dict[str, Any]:
        """The state document (docs/PROTOCOL.md, section 6)."""
        desired = self.desired
        in_progress = self.update_status in BUSY
        pending = in_progress or self.update_status in (UpdateStatus.AVAILABLE,
                                                        UpdateStatus.DEFERRED)
        deferred = self.deferred.to_json() if self.deferred is not None else None
        installed = self.running.tag
        target = self.latest_version or (desired.tag if desired else None)
        latest = target
        if self.fallback.active:
            latest = installed
        return {
            "device_id": self.device_id,
            "agent_version": running_agent_version(),
            "agent": {**self.agent.to_json(), "last_error": _bounded(self.agent.last_error)},
            "ts": utc_now(),
            "image": self.image,
            "groups": list(self.groups),
            "desired": {
                "tag": desired.tag if desired else None,
                "source": str(desired.source) if desired else None,
                "group": desired.detail if desired else None,
                "request_id": desired.request_id if desired else None,
            },
            "running": vars(self.running).copy(),
            "fallback": {**vars(self.fallback), "reason": _bounded(self.fallback.reason)},
            "update": {
                "status": str(self.update_status),
                "progress": self.progress,
                "last_check_at": self.last_check_at,
                "last_success_at": self.last_success_at,
                "last_error": _bounded(self.last_error),
                "error_code": self._error_code(),
                "deferred": deferred,
            },
            "installed_version": installed,
            "latest_version": latest,
            "in_progress": in_progress,
            "update_percentage": self.progress if in_progress else None,
            # what the Home Assistant update entity is given (edge_agent/discovery.py); an
            # update that waits or runs shows its real target, fallback or not
            "home_assistant": update_payload(installed, target if pending else latest,
                                             pending=pending,
                                             in_progress=in_progress,
                                             percentage=self.progress,
                                             deferred=deferred),
        }

    def _error_code(self) -> str | None:
        coded = self.failure_code
        if coded is None or self.last_error is None or coded[1] != self.last_error:
            return None
        return str(coded[0])


def _bounded(text: str | None) -> str | None:
    return None if text is None else bounded_text(text)


def _call_sink(sink: Callable[[dict[str, Any]], None], body: dict[str, Any]) -> None:
    """A failing sink (broker gone, disk full) must never break an update."""
    try:
        sink(body)
    except Exception as exc:  # noqa: BLE001 - sinks are plug-ins; one failing must not stop the rest
        log.warning("could not publish %s: %s", body.get("event", "state"), exc)
