"""The agent's main loop: one thread, one inbox, one check at a time.

Everything that happens to the agent (a desired tag over MQTT, a command, a Docker
event, a signal) becomes a typed message in ``inbox``; ``step()`` takes every queued
message, handles them, and runs a check when one is due. Docker work happens only here.

A burst of desired tags therefore collapses into one check on the latest, and a
command waits for at most the check in progress. A request whose desired tag was
replaced before it was applied is answered with a ``tag_superseded`` event.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.agent.config import Settings
from edge_agent.agent.deferral import LOCK_POLL_S, Deferral, UpdateGate
from edge_agent.agent.engine import Engine
from edge_agent.agent.errors import (
    InsufficientSpace,
    ManifestUnknown,
    RunConfigError,
    SignatureRefused,
)
from edge_agent.agent.reconcile import (
    Action,
    Desired,
    RemoteTag,
    Target,
    backoff_s,
    deciding_keys,
    resolve_desired,
)
from edge_agent.agent.registry import RegistryClient
from edge_agent.agent.remote import VIEW_HOLD_MAX_S, RemoteKey, RemoteView
from edge_agent.agent.selfupdate import SelfUpdate
from edge_agent.agent.status import Status
from edge_agent.agent.store import DataDir
from edge_agent.agent.updater import CheckResult, Updater
from edge_agent.files import StorageError
from edge_agent.logs import REQUEST_ID
from edge_agent.protocol.errors import EdgeAgentError, TagError
from edge_agent.protocol.events import CheckOutcome, EventName, FailureCode
from edge_agent.protocol.messages import (
    CheckRequest,
    RemoteAgentMessage,
    RemoteReady,
    RemoteReset,
    RemoteTagMessage,
    Reply,
)
from edge_agent.protocol.state import BUSY, DeferReason, Source, UpdateStatus
from edge_agent.protocol.tags import DesiredTag, PayloadRejected, parse_tag_payload
from edge_agent.protocol.timestamps import format_utc

log = logging.getLogger(__name__)

RETRY_BASE_S = 2.0
RETRY_CAP_S = 300.0
# Retained desired tags arrive one topic at a time after (re)connecting; wait this long
# before acting on a retained one, so a fleet tag is never applied just before the
# device tag lands. Live publishes (retain flag clear on delivery) need no wait.
REMOTE_SETTLE_S = 0.3
# After a new desired tag stopped a pull, tags are changing faster than an update: the
# next check waits until none has come for REMOTE_SETTLE_S, at most this long, so a
# burst costs one registry request per hold rather than one per tag.
BURST_HOLD_S = 2.0
# Messages taken from the inbox before a check: a flood cannot hold checks off forever.
MAX_BATCH = 1000
# Desired-tag requests remembered until they are answered; a flood of request ids
# beyond this forgets the oldest (their waiters time out, as without an answer).
MAX_OPEN_REQUESTS = 1024
# Kinds of handling failure (message type, exception type) logged with a traceback, once
# each; past this many, a new kind logs at debug like a repeated one (bounded memory).
MAX_FAILURE_KINDS = 64

@dataclass(frozen=True)
class ContainerEvent:
    """Something Docker reported about the managed container (die, health_status, ...)."""

    action: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Wake:
    """Nothing to do; makes ``step()`` look at ``should_exit`` and the clock again."""


Message = (CheckRequest | RemoteTagMessage | RemoteAgentMessage | ContainerEvent | Wake
           | RemoteReset | RemoteReady)


@dataclass(frozen=True)
class SpreadHold:
    """A group or fleet tag this device acts on only from ``until`` (monotonic; ``at``:
    the same instant as epoch seconds, for the state document)."""

    tag: str
    spread_s: float
    until: float
    at: float


@dataclass(frozen=True)
class OpenRequest:
    """A desired-tag request not answered yet, and the topic (scope, group) it came on."""

    tag: str
    key: RemoteKey


class Agent:
    """Owns the check schedule, the desired-tag sources and the updater."""

    def __init__(
        self,
        settings: Settings,
        *,
        connect_engine: Callable[[], Engine] = Engine.connect,
    ) -> None:
        self.settings = settings
        self.data = DataDir(settings.data_dir)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.should_exit = False
        self.status = Status(device_id=settings.device_id, image=settings.repository,
                             groups=settings.device_groups)
        self.status.state_sinks.append(self._write_status_file)
        self.status.event_sinks.append(_log_event)
        self.state = self.data.load_state()
        self.registry = RegistryClient(settings.repository)
        # desired app tags and agent versions (docs/SELF-UPDATE.md) by topic, session by
        # session (agent/remote.py); the handover, when run by ``edge-agent run``
        # (runtime.py sets it)
        self.tags = RemoteView()
        self.agent_versions = RemoteView()
        self.selfupdate: SelfUpdate | None = None
        self._agent_settle_until = 0.0
        self._connect_engine = connect_engine
        self._updater: Updater | None = None
        self._failures = 0
        self._next_check = 0.0  # check at once on start
        self._install_requested = False
        # force: the next check applies an update despite the window and the app's lock
        self._force_requested = False
        self._forcing = False
        self.gate = UpdateGate(settings.update_window, settings.update_lock_file,
                               settings.update_lock_max_hold_s)
        # While an update waits on the app's lock: when to look at the lock file next.
        self._lock_poll_at: float | None = None
        self._spread: dict[RemoteKey, SpreadHold] = {}
        self._replies: list[tuple[CheckRequest, Reply]] = []
        # Messages taken from the inbox but not handled yet (see ``_pull_superseded``).
        self._backlog: deque[Message] = deque()
        # Requests that no state or event has answered yet, oldest first; the request id
        # each topic carried last; and the open ones whose topic has moved on since.
        self._open: dict[str, OpenRequest] = {}
        self._request_at: dict[RemoteKey, str | None] = {}
        self._replaced: set[str] = set()
        # The desired tag of the check in progress, and the one that stopped its pull.
        self._working_on: Desired | None = None
        self._superseded_by: Desired | None = None
        self._burst_hold_until = 0.0
        self._handling_failures: set[tuple[str, str]] = set()
        self._rejected_file_tag: str | None = None
        # The last failure reported, with the request it concerned: a repeat is logged at
        # DEBUG only, but a new request gets its own event so the bridge can answer it.
        self._last_error: tuple[str, str | None] | None = None

    # -- lifecycle --------------------------------------------------------------
    def request_exit(self) -> None:
        """Ask the loop to stop (signal handler safe): finish the step, then return."""
        self.should_exit = True
        self.inbox.put(Wake())

    def defer_first_check(self, seconds: float) -> None:
        """Hold the first check so retained MQTT tags can arrive first (RemoteReady
        brings it forward); without this a fresh device would run its initial tag only
        to replace it a moment later."""
        self._next_check = time.monotonic() + seconds

    def run(self) -> None:
        log.info("edge-agent for %s (container %s, device %s) starting",
                 self.settings.repository, self.settings.container_name, self.settings.device_id)
        while not self.should_exit:
            self.step()
        self.close()
        log.info("edge-agent stopped; %s keeps running", self.settings.container_name)

    def close(self) -> None:
        self.registry.close()
        if self._updater is not None:
            self._updater.engine.close()

    def step(self, max_wait_s: float | None = None) -> None:
        """Wait for a message (or time out), handle every queued one, then run a check
        if one is due: the check sees the latest desired state, not the first of a burst."""
        now = time.monotonic()
        wait = min(self._next_check - now,
                   self.status.last_published + self.settings.telemetry_interval_s - now)
        if max_wait_s is not None:
            wait = min(wait, max_wait_s)
        if self._lock_poll_at is not None:
            wait = min(wait, self._lock_poll_at - now)
        if not self._backlog:
            with contextlib.suppress(queue.Empty):
                self._backlog.append(self.inbox.get(timeout=max(wait, 0.0)))
        while len(self._backlog) < MAX_BATCH:
            try:
                self._backlog.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        while self._backlog:
            self.handle(self._backlog.popleft())
        if self.should_exit:
            return
        now = time.monotonic()
        if self._lock_poll_at is not None and now >= self._lock_poll_at:
            self._poll_lock(now)
        if now >= self._next_check:
            self.check()
        elif now - self.status.last_published >= self.settings.telemetry_interval_s:
            self._heartbeat()
        self._agent_step()

    def _agent_step(self) -> None:
        """The agent's own update, only between checks: an app update in flight (or due,
        or a desired tag still settling) goes first; the handover then blocks the loop."""
        selfupdate = self.selfupdate
        now = time.monotonic()
        if (selfupdate is None or self.should_exit or now >= self._next_check
                or now < self._agent_settle_until or self.status.update_status in BUSY
                or (self._updater is None and not selfupdate.resume_wait)):
            return
        desired = self.resolve_agent()
        if not selfupdate.resume_wait and self._unconfirmed(self.agent_versions, desired, now):
            return  # a message for it, or the hold's end, brings the loop back
        before = self.status.agent.to_json()
        try:
            selfupdate.step(desired)
        except EdgeAgentError as exc:
            log.error("agent update: %s", exc)
            self.status.agent.last_error = str(exc)
        except Exception:  # the loop boundary: a bug here must not end the agent
            log.exception("unexpected error during the agent's own update")
        if self.status.agent.to_json() != before:
            self._heartbeat()

    def resolve_agent(self) -> Desired | None:
        """The desired agent version: device, then groups, then fleet (as tags)."""
        versions = self.agent_versions
        groups = [(g, versions.get((Source.GROUP, g))) for g in self.settings.device_groups]
        return resolve_desired(device=versions.get((Source.DEVICE, None)),
                               groups=groups, fleet=versions.get((Source.FLEET, None)),
                               file_tag=None, image_tag=None, fallback_tag=None)

    # -- messages ---------------------------------------------------------------
    def handle(self, message: Message) -> None:
        """Handle one message. Never raises: a bug met while handling one message is
        logged with its traceback (once per kind of failure) and the message dropped,
        so no message can stop the loop."""
        try:
            self._dispatch(message)
        except Exception as exc:  # the loop boundary: one message must never end the agent
            what = type(message).__name__
            topic = getattr(message, "topic", "")
            kind = (what, type(exc).__name__)
            if (kind not in self._handling_failures
                    and len(self._handling_failures) < MAX_FAILURE_KINDS):
                self._handling_failures.add(kind)
                log.exception("internal error while handling a %s%s; the message is dropped",
                              what, f" on {topic}" if topic else "")
            else:
                log.debug("internal error while handling a %s (again): %s: %s", what,
                          type(exc).__name__, exc)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, CheckRequest):
            self._install_requested |= message.install
            self._force_requested |= message.force
            if message.reply is not None:
                self._replies.append((message, message.reply))
            if message.fleet and message.spread > 0:
                delay = random.random() * message.spread
                log.info("fleet check spread over %.0f s: checking in %.1f s", message.spread,
                         delay)
                self._next_check = min(self._next_check, time.monotonic() + delay)
                return
            if not message.fleet:
                # an operator addressing this device wants it now: no spread delay
                self._spread.clear()
            self._next_check = 0.0
        elif isinstance(message, RemoteTagMessage):
            self._handle_remote_tag(message)
        elif isinstance(message, RemoteAgentMessage):
            self._handle_remote_agent(message)
        elif isinstance(message, ContainerEvent):
            self._handle_container_event(message)
        elif isinstance(message, RemoteReset):
            # A tag cleared while we were away must not linger, but an incomplete replay
            # (a subscription refused) must not count as the whole truth either.
            for view in (self.tags, self.agent_versions):
                view.reset(time.monotonic())
        elif isinstance(message, RemoteReady):
            for view in (self.tags, self.agent_versions):
                view.ready(time.monotonic())
            self._next_check = min(self._next_check, time.monotonic() + REMOTE_SETTLE_S)
            if self._updater is not None:  # before the first check there is nothing to show
                self._heartbeat()

    def _unconfirmed(self, view: RemoteView, desired: Desired | None,
                     now: float) -> list[RemoteKey]:
        """The topics deciding ``desired`` that this session has not confirmed yet."""
        return view.unconfirmed(deciding_keys(desired, self.settings.device_groups), now)

    def _accept(self, view: RemoteView,
                message: RemoteTagMessage | RemoteAgentMessage) -> DesiredTag | None:
        """The message's desired tag or agent version, or None when it changes nothing:
        a payload the agent rejects (a ``tag_rejected`` event answers its request), or a
        retained replay after a live message on its topic in the same session, which is
        older. Seen on a NATS cluster after a node died: the new node granted a
        subscription late and replayed the value from before a rollout's live publish
        the agent had already acted on; taking it would send the device back."""
        what = "desired tag" if view is self.tags else "desired agent version"
        try:
            parsed = parse_tag_payload(message.payload)
        except TagError as exc:
            log.warning("rejected %s on %s: %s", what, message.topic, exc)
            request_id = exc.request_id if isinstance(exc, PayloadRejected) else None
            self._event_of_request(EventName.TAG_REJECTED, request_id, topic=message.topic,
                                   reason=str(exc))
            return None
        if view.stale((message.scope, message.group), retained=message.retained):
            log.info("ignored a retained %s on %s: older than the live one this session "
                     "already brought", what, message.topic)
            return None
        return parsed

    def _handle_remote_tag(self, message: RemoteTagMessage) -> None:
        parsed = self._accept(self.tags, message)
        if parsed is None:
            return
        key = (message.scope, message.group)
        previous = self._request_at.get(key)
        if previous is not None and previous != parsed.request_id and previous in self._open:
            self._replaced.add(previous)  # answered by the next check, which is due shortly
        self._request_at[key] = parsed.request_id
        self._spread.pop(key, None)
        if (parsed.spread > 0 and parsed.tag is not None and not message.retained
                and message.scope is not Source.DEVICE and parsed.tag != self.status.running.tag):
            # A fleet-wide change: this device takes its turn at a random moment of the
            # spread, so the fleet does not hit the registry in the same second.
            delay = random.random() * parsed.spread
            self._spread[key] = SpreadHold(parsed.tag, parsed.spread, time.monotonic() + delay,
                                           time.time() + delay)
        self.tags.lay(key, _remote_tag(parsed))
        if parsed.tag is not None and parsed.request_id is not None and not message.retained:
            # Live: someone asks now. A retained replay was asked (and answered) before;
            # it is taken up if a check acts on it.
            self._open_request(parsed.request_id, OpenRequest(parsed.tag, key))
        now = time.monotonic()
        if now < self._burst_hold_until:
            # A burst: wait for a quiet moment (bounded), unless a command asked for a check.
            if self._next_check > 0.0:
                self._next_check = min(now + REMOTE_SETTLE_S, self._burst_hold_until)
            return
        # A live publish is acted on at once; a retained replay waits for its siblings.
        settle = REMOTE_SETTLE_S if message.retained else 0.0
        self._next_check = min(self._next_check, now + settle)

    def _handle_remote_agent(self, message: RemoteAgentMessage) -> None:
        parsed = self._accept(self.agent_versions, message)
        if parsed is None:
            return
        key = (message.scope, message.group)
        self.agent_versions.lay(key, _remote_tag(parsed))
        # an app tag published with it is taken first (the check runs before the handover)
        self._agent_settle_until = time.monotonic() + REMOTE_SETTLE_S

    def _handle_container_event(self, message: ContainerEvent) -> None:
        # A container the agent itself removed (rollback, recovery) is no longer the one
        # shown as running by the time this event is handled: not a crash.
        container_id = message.attributes.get("id")
        current = container_id is None or container_id == self.status.running.container_id
        # Not while an update handles containers; but idle, error and notify mode's
        # "available" all leave the container to itself.
        if message.action == "die" and current and self.status.update_status not in BUSY:
            raw = message.attributes.get("exitCode", "")
            # Docker's event attributes are strings; the updater reports an int.
            code = int(raw) if raw.isascii() and raw.isdigit() else None
            log.warning("container %s exited (code %s)", self.settings.container_name, code)
            self.status.event(EventName.CONTAINER_EXITED, exit_code=code)
        self._heartbeat()

    # -- desired tag ------------------------------------------------------------
    def resolve(self) -> Desired | None:
        """The effective desired tag from every source, by precedence."""
        tags = self.tags
        groups = [(g, tags.get((Source.GROUP, g))) for g in self.settings.device_groups]
        desired = resolve_desired(
            device=tags.get((Source.DEVICE, None)),
            groups=groups,
            fleet=tags.get((Source.FLEET, None)),
            file_tag=self._read_tag_file(),
            image_tag=self.settings.image_tag,
            fallback_tag=self.settings.fallback_tag,
        )
        weaker = desired is None or desired.source in (Source.IMAGE, Source.FALLBACK)
        if self._rejected_file_tag is not None and weaker:
            # A tag file that is there but unusable (garbage, a link, a FIFO) says nothing
            # about what to run: the weaker sources must not move the container meanwhile.
            raise TagError(f"the tag file is unusable ({self._rejected_file_tag}); the "
                           "container is left as it is until the file is fixed")
        return desired

    def _read_tag_file(self) -> str | None:
        try:
            tag = self.data.read_tag()
        except (TagError, StorageError) as exc:
            message = str(exc)
            if message != self._rejected_file_tag:
                log.error("tag file ignored: %s", message)
                self.status.event(EventName.TAG_REJECTED, source="file", reason=message)
                self._rejected_file_tag = message
            return None
        self._rejected_file_tag = None
        return tag

    def _persist(self, desired: Desired) -> None:
        """A tag that came over MQTT becomes the tag file, so it survives a restart offline."""
        if desired.source in (Source.DEVICE, Source.GROUP, Source.FLEET):
            current = self._read_tag_file()
            if current != desired.tag:
                self.data.write_tag(desired.tag)

    # -- checks -----------------------------------------------------------------
    def check(self) -> CheckResult | None:  # noqa: PLR0912, PLR0915 - one pass, top to bottom
        """One reconcile pass; never raises for faults it can wait out."""
        install, self._install_requested = self._install_requested, False
        force, self._force_requested = self._force_requested, False
        self._forcing = force
        self._lock_poll_at = None
        replies, self._replies = self._replies, []
        self._next_check = time.monotonic() + self.settings.poll_interval_s
        for view in (self.tags, self.agent_versions):
            last = view.expire(time.monotonic())
            if last is not None:  # look again when the last value no replay confirmed goes
                self._next_check = min(self._next_check, last)
        self._superseded_by = None
        result: CheckResult | None = None
        error: str | None = None
        desired: Desired | None = None
        answered = False  # whether a state or event of this check answers desired's request
        try:
            desired = self.resolve()
            self.status.desired = desired
            self._answer_replaced(desired)
            REQUEST_ID.set(desired.request_id if desired else None)
            if desired is None:
                raise RunConfigError("no desired tag: set one, or a tag in CONTAINER_IMAGE, "
                                     "or FALLBACK_TAG")
            if desired.request_id is not None:
                self._open_request(desired.request_id,
                                   OpenRequest(desired.tag, _key_of(desired)))
            held = self._broker_hold(desired) or self._spread_hold(desired, force=force)
            if held is not None:
                result = held
            else:
                updater = self._ensure_updater()
                self._persist(desired)
                self._working_on = desired
                result = updater.check(desired, install=install)
        except RunConfigError as exc:
            error = str(exc)
            self._report_failure(error, event=EventName.CONFIG_ERROR)
            answered = True
        except EdgeAgentError as exc:
            if self._superseded_by is not None:
                # Not a failure: a newer desired tag stopped the pull. Its check runs at
                # once and answers the commands of this one.
                self._pull_superseded(self._superseded_by, replies, install, force)
                return None
            if self.should_exit:
                # SIGTERM gave up a blocking call: not the update's failure. The next
                # start finishes or redoes whatever was under way.
                log.info("check interrupted: the agent is stopping (%s)", exc)
                error = "interrupted: the agent is stopping"
            else:
                # An update that started and broke off, or a tag that exists nowhere (not
                # even the fallback), is an answer for whoever asked; a registry blip is not.
                final = (isinstance(exc, (ManifestUnknown, InsufficientSpace, SignatureRefused))
                         or self.status.update_status in BUSY)
                error = str(exc)
                self._report_failure(error, event=EventName.UPDATE_FAILED if final else None,
                                     **_failure_details(exc))
                answered = final
        except Exception as exc:  # the loop boundary: a bug must not kill the agent
            log.exception("unexpected error during a check; the container is left as it is")
            error = f"internal error: {type(exc).__name__}: {exc}"
            self._report_failure(error, event=None)
        else:
            self._failures = 0
            self._last_error = None
            # notify mode's "available" still waits for cmd/install; "deferred" for its
            # window, lock or turn; "interrupted" for the next start
            answered = result.outcome not in (CheckOutcome.AVAILABLE, CheckOutcome.DEFERRED,
                                              CheckOutcome.INTERRUPTED)
            if result.outcome is CheckOutcome.DEFERRED:
                self._wake_for(self.status.deferred)
        finally:
            REQUEST_ID.set(None)
            self._working_on = None
        if answered and desired is not None and desired.request_id is not None:
            self._open.pop(desired.request_id, None)
        for request, reply in replies:
            reply(_check_answer(request, result, error, self.status.deferred))
        return result

    # -- deferrals ----------------------------------------------------------------
    def _consider(self, tag: str) -> Deferral | None:
        """The updater's question: must an update to ``tag`` wait? (agent/deferral.py)"""
        return self.gate.consider(tag, force=self._forcing)

    def _spread_hold(self, desired: Desired, *, force: bool) -> CheckResult | None:
        """Defer ``desired`` without asking the registry while its spread delay runs."""
        key = _key_of(desired)
        hold = self._spread.get(key)
        if hold is None or hold.tag != desired.tag:
            return None
        if force or time.monotonic() >= hold.until:
            del self._spread[key]
            return None
        self.status.defer(Deferral(desired.tag, DeferReason.SPREAD,
                                   f"a {_scope_name(key)} change spread over "
                                   f"{hold.spread_s:g} s; this device's turn comes at "
                                   f"{format_utc(hold.at)}", hold.at))
        self._next_check = min(self._next_check, hold.until)
        return CheckResult(Action.UPDATE, CheckOutcome.DEFERRED, Target(desired.tag, None))

    def _broker_hold(self, desired: Desired) -> CheckResult | None:
        """Defer a change of version while the broker has not confirmed, since the
        reconnect, the tags that decide it (VIEW_HOLD_MAX_S). Not even ``force`` goes
        ahead: the question is which tag, not when."""
        now = time.monotonic()
        session_at = self.tags.session_at
        if desired.tag == self.status.running.tag or session_at is None:
            return None
        pending = self._unconfirmed(self.tags, desired, now)
        if not pending:
            return None
        ends = session_at + VIEW_HOLD_MAX_S
        at = time.time() + (ends - now)
        scopes = " and ".join(_scope_name(key) for key in pending)
        self.status.defer(Deferral(desired.tag, DeferReason.BROKER,
                                   f"waiting for the broker to confirm the desired tag of "
                                   f"{scopes} after the reconnect", at))
        self._next_check = min(self._next_check, ends)
        return CheckResult(Action.UPDATE, CheckOutcome.DEFERRED, Target(desired.tag, None))

    def _wake_for(self, deferral: Deferral | None) -> None:
        """Check again when the deferral can end: at the window's opening or the lock's
        maximum hold, and as soon as the app releases its lock."""
        if deferral is None:
            return
        now = time.monotonic()
        if deferral.until is not None:
            # a hair late rather than early: the window is open at ``until`` itself
            self._next_check = min(self._next_check,
                                   now + max(deferral.until - time.time(), 0.0) + 0.01)
        if deferral.reason is DeferReason.LOCK:
            self._lock_poll_at = now + LOCK_POLL_S

    def _poll_lock(self, now: float) -> None:
        """While an update waits on the app's lock: a stat, and a check once it is gone."""
        if self.gate.lock_held():
            self._lock_poll_at = now + LOCK_POLL_S
            return
        log.info("the update lock %s was released; checking now", self.gate.lock_file)
        self._lock_poll_at = None
        self._next_check = 0.0

    # -- requests -----------------------------------------------------------------
    def _open_request(self, request_id: str, request: OpenRequest) -> None:
        self._open.pop(request_id, None)  # re-inserted as the newest
        self._open[request_id] = request
        while len(self._open) > MAX_OPEN_REQUESTS:
            forgotten = next(iter(self._open))
            del self._open[forgotten]
            self._replaced.discard(forgotten)
            log.debug("forgot the unanswered request %s (more than %d open)", forgotten,
                      MAX_OPEN_REQUESTS)

    def _answer_replaced(self, desired: Desired | None) -> None:
        """Answer every open request whose topic carried another desired tag since: no
        check will act on it. Its waiter learns what replaced it."""
        replaced, self._replaced = self._replaced, set()
        superseded = [(rid, self._open.pop(rid)) for rid in list(self._open)
                      if rid in replaced and (desired is None or rid != desired.request_id)]
        for request_id, request in superseded:
            now = self.tags.get(request.key)
            scope = _scope_name(request.key)
            if now is None:
                reason = (f"the {scope} desired tag {request.tag} was cleared before it was "
                          "applied")
            else:
                by = f" (request {now.request_id})" if now.request_id else ""
                reason = (f"the {scope} desired tag {request.tag} was replaced by "
                          f"{now.tag}{by} before it was applied")
            self.status.event(EventName.TAG_SUPERSEDED, request_id=request_id, tag=request.tag,
                              superseded_by=now.request_id if now else None,
                              new_tag=now.tag if now else None, reason=reason)
        if superseded:
            log.info("%d desired-tag request(s) superseded before they were applied; acting "
                     "on %s", len(superseded), desired.tag if desired else "no tag")

    def _should_abort(self) -> bool:
        """Asked by the updater between pull progress messages: stop for SIGTERM, or when
        the desired tag has changed since the pull began (why finish a download that
        would be installed only to be replaced?). Installing and verifying are never
        broken off for a new tag: the container swap finishes first."""
        if self.should_exit:
            return True
        working_on = self._working_on
        if working_on is None or self.status.update_status is not UpdateStatus.PULLING:
            return False
        if not self._take_tags_now():
            return False
        desired = self.resolve()
        if desired is None or desired.tag == working_on.tag:
            return False
        self._superseded_by = desired
        return True

    def _take_tags_now(self) -> bool:
        """Handle the desired tags that arrived since the check began; every other message
        waits for the loop, in order. True when any tag was handled."""
        handled = False
        for _ in range(MAX_BATCH - len(self._backlog)):
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                break
            # After a reset, the tags that follow belong to the new session: keep the order.
            reset_waiting = any(isinstance(m, RemoteReset) for m in self._backlog)
            if isinstance(message, RemoteTagMessage) and not reset_waiting:
                self.handle(message)
                handled = True
            else:
                self._backlog.append(message)
        return handled

    def _pull_superseded(
        self, desired: Desired, replies: list[tuple[CheckRequest, Reply]], install: bool,
        force: bool,
    ) -> None:
        # The state keeps saying "pulling" until the next check, which follows shortly: an
        # idle state now would tell a waiter that its request settled on the old tag.
        working_on = self.status.desired
        log.info("the desired tag changed to %s while pulling for %s; the pull stops and the "
                 "newest desired tag is checked as soon as tags stop changing (at most %.0f s)",
                 desired.tag, working_on.tag if working_on else None, BURST_HOLD_S)
        self._replies[:0] = replies
        self._install_requested |= install
        self._force_requested |= force
        now = time.monotonic()
        self._burst_hold_until = now + BURST_HOLD_S
        self._next_check = now + REMOTE_SETTLE_S

    def _event_of_request(self, name: EventName, request_id: str | None, **fields: Any) -> None:
        """An event that answers ``request_id`` only: without one it must not borrow the
        current desired tag's request id (``Status.event``'s default), or a foreign
        payload would answer a request it has nothing to do with."""
        self.status.event(name, request_id=request_id, **fields)

    def _ensure_updater(self) -> Updater:
        if self._updater is None:
            engine = self._connect_engine()
            # Plain HTTP or HTTPS as the daemon's pull will: asked once per connection.
            try:
                insecure = engine.registry_is_insecure(self.registry.location.registry)
            except EdgeAgentError:
                engine.close()
                raise
            self.registry.follow_daemon(insecure)
            self._updater = Updater(self.settings, engine, self.registry, self.data, self.state,
                                    self.status, should_abort=self._should_abort,
                                    gate=self._consider)
        return self._updater

    def _report_failure(self, error: str, event: EventName | None, *,
                        code: FailureCode | None = None, **details: Any) -> None:
        self._failures += 1
        delay = min(self.settings.poll_interval_s,
                    backoff_s(self._failures, RETRY_BASE_S, RETRY_CAP_S))
        # min: a desired tag that arrived during the check asked for one at once
        self._next_check = min(self._next_check, time.monotonic() + delay)
        desired = self.status.desired
        tag = desired.tag if desired else None
        # A failure with a code is the same condition while its numbers move (free space)
        key = (f"{code} {tag} {details.get('digest') or ''}" if code else error,
               desired.request_id if desired else None)
        if key != self._last_error:
            log.error("%s (retrying in %.0f s)", error, delay)
            if event is not None:
                coded = {"code": code, **details} if code else {}
                self.status.event(event, error=error, tag=tag, **coded)
        else:
            log.debug("%s (again; retrying in %.0f s)", error, delay)
        self._last_error = key
        self.status.failure_code = (code, error) if code else None
        self.status.set_update(UpdateStatus.ERROR, error=error)
        self._observe_quietly()

    def _heartbeat(self) -> None:
        self._observe_quietly()
        self.status.publish()

    def _observe_quietly(self) -> None:
        if self._updater is None:
            return
        try:
            self._updater.observe()
        except EdgeAgentError as exc:
            log.debug("cannot observe the container: %s", exc)

    def _write_status_file(self, document: dict[str, Any]) -> None:
        # status.json also says what the healthcheck needs beyond the state document
        self.data.write_status({**document,
                                "registry_answered_at": self.status.registry_answered_at})


def _check_answer(
    request: CheckRequest, result: CheckResult | None, error: str | None,
    deferred: Deferral | None,
) -> dict[str, Any]:
    answer: dict[str, Any] = {"request_id": request.request_id, "ok": error is None}
    if result is not None:
        answer.update(outcome=result.outcome, tag=result.target.tag, digest=result.target.digest)
        if result.outcome is CheckOutcome.DEFERRED and deferred is not None:
            answer["deferred"] = deferred.to_json()
    if error is not None:
        answer["error"] = error
    return answer


def _failure_details(exc: Exception) -> dict[str, Any]:
    """The machine-readable code and numbers of a failure that has them."""
    if isinstance(exc, InsufficientSpace):
        return {"code": FailureCode.INSUFFICIENT_SPACE, "needed_bytes": exc.needed,
                "free_bytes": exc.free, "path": exc.path}
    if isinstance(exc, SignatureRefused):
        return {"code": FailureCode.SIGNATURE_INVALID, "digest": exc.digest}
    return {}


def _remote_tag(parsed: DesiredTag) -> RemoteTag | None:
    return None if parsed.tag is None else RemoteTag(parsed.tag, parsed.request_id)


def _key_of(desired: Desired) -> RemoteKey:
    return (desired.source, desired.detail if desired.source is Source.GROUP else None)


def _scope_name(key: RemoteKey) -> str:
    source, group = key
    return f"group {group}" if group is not None else str(source)


def _log_event(event: dict[str, Any]) -> None:
    if event.get("event") == EventName.PULL_PROGRESS:
        log.debug("pull %s%%", event.get("progress"))
        return
    if event.get("event") == EventName.TAG_SUPERSEDED:  # a burst makes many; check() sums them up
        log.debug("event tag_superseded %s", event.get("reason"),
                  extra={"request_id": event.get("request_id")})
        return
    skip = ("event", "ts", "device_id")
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    log.info("event %s %s", event.get("event"), details,
             extra={"request_id": event.get("request_id")})
