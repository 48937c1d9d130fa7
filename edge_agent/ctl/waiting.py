"""``set-tag --wait``: waiting for a device to answer a desired-tag request, and the
report of what it answered.

The device answers in its state document (``desired.request_id``) and in events that
carry the request id; ``protocol.answers`` judges each. edge-ctl ends its wait on other
answers than the bridge's ``?wait``: on notify mode's "available" (not settled: the
operator has to run install; a deferred update, by contrast, the device applies by
itself, so the wait goes on), on ``update_succeeded``, on ``tag_superseded`` (another
desired tag replaced the request before it was applied), and on a fallback only once
the check that shows it has settled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from edge_agent.ctl.render import (
    CELL_CHARS,
    Printer,
    percent,
    printable,
    status_text,
    superseded_text,
    text_at,
)
from edge_agent.ctl.session import document_or_none
from edge_agent.protocol.answers import Answer, Outcome, judge_event, judge_state, lookup
from edge_agent.protocol.events import CheckOutcome, EventName
from edge_agent.protocol.mqtt import Incoming
from edge_agent.protocol.state import Availability, UpdateStatus
from edge_agent.protocol.topics import Topics

# The events of the request set-tag --wait keeps for its report.
MAX_WAIT_EVENTS = 1000


class MessageSource(Protocol):
    """What waiting reads of a Session (tests give it a script of messages)."""

    @property
    def topics(self) -> Topics: ...

    def messages(self, timeout_s: float | None) -> Iterator[Incoming]: ...


@dataclass
class Waited:
    """What ``set-tag --wait`` saw: the answer (None: none in time), the device's last
    state, the events of the request, and the event that answered (if one did)."""

    answer: Answer | None
    state: dict[str, Any] | None
    events: list[dict[str, Any]]
    event: dict[str, Any] | None = None


def wait_for_tag(  # noqa: PLR0912, PLR0913, PLR0917 - one request's whole wait
    session: MessageSource, device_id: str, tag: str, request_id: str, timeout_s: float,
    printer: Printer,
) -> Waited:
    """Until the device answers ``request_id`` (for ``tag``) or ``timeout_s`` passes;
    shows its progress meanwhile."""
    topics = session.topics
    last_state: dict[str, Any] | None = None
    shown_status: str | None = None
    events: list[dict[str, Any]] = []
    for message in session.messages(timeout_s):
        if message.topic == topics.availability(device_id):
            if message.payload.strip() == Availability.OFFLINE.encode():
                printer.note(f"{device_id} is offline; the desired tag is retained and applies "
                             "when it reconnects")
            continue
        body = document_or_none(message)
        if body is None:
            continue
        if message.topic == topics.events(device_id):
            if body.get("request_id") != request_id:
                continue
            if len(events) < MAX_WAIT_EVENTS:
                events.append(body)
            name = body.get("event")
            # The events name the tag the device actually pulls: the fallback, for a tag
            # the registry does not have.
            if name == EventName.PULL_PROGRESS:
                printer.progress(device_id, text_at(body, "tag") or tag,
                                 percent(body.get("progress")) or 0.0)
                continue
            if name == EventName.UPDATE_STARTED:
                printer.new_pull(device_id)
                from_tag = printable(text_at(body, "from_tag") or "-", CELL_CHARS)
                to_tag = printable(text_at(body, "to_tag") or tag, CELL_CHARS)
                printer.note(f"{device_id}: updating {from_tag} -> {to_tag}")
            answer = judge_event(body, request_id, tag)
            if answer is not None and answer.outcome is Outcome.FALLBACK:
                answer = None  # the state that follows says it, and the report shows that state
            if answer is not None:
                return Waited(answer, last_state, events, body)
            continue
        last_state = body
        ours = lookup(body, "desired", "request_id") == request_id
        status = status_text(body) if ours else None
        if status and status != shown_status and not status.startswith(
                (UpdateStatus.PULLING, UpdateStatus.IDLE)):
            printer.note(f"{device_id}: {status}")
            shown_status = status
        progress = percent(lookup(body, "update", "progress"))
        if status and status.startswith(UpdateStatus.PULLING) and progress is not None:
            printer.progress(device_id, tag, progress)
        answer = judge_state(body, request_id, tag)
        if answer is not None and answer.outcome is Outcome.FALLBACK and not answer.settled:
            answer = None  # a fallback from an earlier check, shown while this one still runs
        if answer is not None and answer.outcome is Outcome.DEFERRED:
            answer = None  # the device applies it by itself later: the note said when
        if answer is not None:
            return Waited(answer, last_state, events)
    return Waited(None, last_state, events)


def report_outcome(  # noqa: PLR0913, PLR0917 - the request, what came, how long
    device_id: str, tag: str, request_id: str, waited: Waited, timeout_s: float,
    printer: Printer,
) -> int:
    """Print what ``wait_for_tag`` found; the exit code."""
    answer, state = waited.answer, waited.state
    about: dict[str, Any] = {"device_id": device_id, "tag": tag, "request_id": request_id,
                             "state": state}
    if answer is not None and answer.ok:
        # the state that settles it comes just before update_succeeded: update_started tells
        updated = any(e.get("event") in (EventName.UPDATE_STARTED, EventName.UPDATE_SUCCEEDED)
                      for e in waited.events)
        outcome = CheckOutcome.UPDATED if updated else CheckOutcome.UNCHANGED
        printer.result({**about, "ok": True, "outcome": outcome, "reason": None},
                       f"{device_id}: {'updated to' if updated else 'already runs'} {tag}")
        return EXIT_OK
    if answer is None:
        running = printable(text_at(state, "running", "tag") or "-", CELL_CHARS)
        kind, code = "timeout", EXIT_TIMEOUT
        reason = f"no answer from {device_id} within {timeout_s:g} s" + (
            f" (last seen running {running}, {status_text(state)})" if state else "")
        shown = printable(reason)
    else:
        kind, code, reason = answer.outcome, EXIT_FAILED, answer.reason
        # the reason may quote the device (its last_error): printable on a terminal
        shown = printable(reason)
        if answer.outcome is Outcome.SUPERSEDED and waited.event is not None:
            shown = superseded_text(waited.event)
            about.update(new_tag=waited.event.get("new_tag"),
                         superseded_by=waited.event.get("superseded_by"))
    text = f"{device_id}: {tag} not applied: {shown}"
    printer.result({**about, "ok": False, "outcome": kind, "reason": reason}, text)
    printer.error(text)
    return code
