"""The agent's main loop: one thread, one inbox, one check at a time.

Everything that happens to the agent (a desired tag over MQTT, a command, a Docker
event, a signal) becomes a typed message in ``inbox``; ``step()`` takes the next
one, handles it, and runs a check when one is due. Docker work happens only here.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edge_agent.config import Settings
from edge_agent.engine import Engine
from edge_agent.errors import (
    EdgeAgentError,
    ManifestUnknown,
    RunConfigError,
    StorageError,
    TagError,
)
from edge_agent.logs import REQUEST_ID
from edge_agent.reconcile import Desired, RemoteTag, Source, backoff_s, resolve_desired
from edge_agent.registry import RegistryClient
from edge_agent.status import BUSY, Status, UpdateStatus
from edge_agent.store import DataDir
from edge_agent.tags import parse_tag_payload
from edge_agent.updater import CheckResult, Updater

log = logging.getLogger(__name__)

RETRY_BASE_S = 2.0
RETRY_CAP_S = 300.0
# Retained desired tags arrive one topic at a time after (re)connecting; wait this long
# before acting on a retained one, so a fleet tag is never applied just before the
# device tag lands. Live publishes (retain flag clear on delivery) need no wait.
REMOTE_SETTLE_S = 0.3

Reply = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CheckRequest:
    """Check the registry now; ``install`` also applies a pending update in notify mode."""

    request_id: str | None = None
    install: bool = False
    reply: Reply | None = None


@dataclass(frozen=True)
class RemoteTagMessage:
    """A desired-tag message from MQTT: scope is device, group or fleet."""

    scope: Source
    payload: bytes
    topic: str = ""
    group: str | None = None
    # Retained (a replay after (re)connecting) or live (an operator publishing now).
    retained: bool = True


@dataclass(frozen=True)
class ContainerEvent:
    """Something Docker reported about the managed container (die, health_status, ...)."""

    action: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Wake:
    """Nothing to do; makes ``step()`` look at ``should_exit`` and the clock again."""


@dataclass(frozen=True)
class RemoteReset:
    """The MQTT session (re)started: forget the remote desired tags. The broker replays
    the retained ones; a tag cleared while we were away must not linger."""


@dataclass(frozen=True)
class RemoteReady:
    """The desired-tag subscriptions are acknowledged: publish a fresh state, and check
    once the retained tags that follow have settled."""


Message = (
    CheckRequest | RemoteTagMessage | ContainerEvent | Wake | RemoteReset | RemoteReady
)


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
        self.status = Status(device_id=settings.device_id, image=settings.repository)
        self.status.state_sinks.append(self._write_status_file)
        self.status.event_sinks.append(_log_event)
        self.state = self.data.load_state()
        self.registry = RegistryClient(settings.repository)
        self.remote: dict[tuple[Source, str | None], RemoteTag] = {}
        self._connect_engine = connect_engine
        self._updater: Updater | None = None
        self._failures = 0
        self._next_check = 0.0  # check at once on start
        self._install_requested = False
        self._replies: list[tuple[CheckRequest, Reply]] = []
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
        """Handle one message (or time out), then run a check if one is due."""
        now = time.monotonic()
        wait = min(self._next_check - now,
                   self.status.last_published + self.settings.telemetry_interval_s - now)
        if max_wait_s is not None:
            wait = min(wait, max_wait_s)
        try:
            message = self.inbox.get(timeout=max(wait, 0.0))
        except queue.Empty:
            message = None
        if message is not None:
            self.handle(message)
        if self.should_exit:
            return
        now = time.monotonic()
        if now >= self._next_check:
            self.check()
        elif now - self.status.last_published >= self.settings.telemetry_interval_s:
            self._heartbeat()

    # -- messages ---------------------------------------------------------------
    def handle(self, message: Message) -> None:
        if isinstance(message, CheckRequest):
            self._install_requested |= message.install
            if message.reply is not None:
                self._replies.append((message, message.reply))
            self._next_check = 0.0
        elif isinstance(message, RemoteTagMessage):
            self._handle_remote_tag(message)
        elif isinstance(message, ContainerEvent):
            self._handle_container_event(message)
        elif isinstance(message, RemoteReset):
            self.remote.clear()
        elif isinstance(message, RemoteReady):
            self._next_check = min(self._next_check, time.monotonic() + REMOTE_SETTLE_S)
            if self._updater is not None:  # before the first check there is nothing to show
                self._heartbeat()

    def _handle_remote_tag(self, message: RemoteTagMessage) -> None:
        try:
            parsed = parse_tag_payload(message.payload)
        except TagError as exc:
            log.warning("rejected desired tag on %s: %s", message.topic, exc)
            self.status.event("tag_rejected", topic=message.topic, reason=str(exc))
            return
        key = (message.scope, message.group)
        if parsed.tag is None:
            self.remote.pop(key, None)
        else:
            self.remote[key] = RemoteTag(parsed.tag, parsed.request_id)
        # A live publish is acted on at once; a retained replay waits for its siblings.
        settle = REMOTE_SETTLE_S if message.retained else 0.0
        self._next_check = min(self._next_check, time.monotonic() + settle)

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
            code = int(raw) if raw.isdigit() else None
            log.warning("container %s exited (code %s)", self.settings.container_name, code)
            self.status.event("container_exited", exit_code=code)
        self._heartbeat()

    # -- desired tag ------------------------------------------------------------
    def resolve(self) -> Desired | None:
        """The effective desired tag from every source, by precedence."""
        groups = [(g, self.remote.get((Source.GROUP, g))) for g in self.settings.device_groups]
        return resolve_desired(
            device=self.remote.get((Source.DEVICE, None)),
            groups=groups,
            fleet=self.remote.get((Source.FLEET, None)),
            file_tag=self._read_tag_file(),
            image_tag=self.settings.image_tag,
            fallback_tag=self.settings.fallback_tag,
        )

    def _read_tag_file(self) -> str | None:
        try:
            tag = self.data.read_tag()
        except (TagError, StorageError) as exc:
            message = str(exc)
            if message != self._rejected_file_tag:
                log.error("tag file ignored: %s", message)
                self.status.event("tag_rejected", source="file", reason=message)
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
    def check(self) -> CheckResult | None:
        """One reconcile pass; never raises for faults it can wait out."""
        install, self._install_requested = self._install_requested, False
        replies, self._replies = self._replies, []
        self._next_check = time.monotonic() + self.settings.poll_interval_s
        result: CheckResult | None = None
        error: str | None = None
        try:
            updater = self._ensure_updater()
            desired = self.resolve()
            self.status.desired = desired
            REQUEST_ID.set(desired.request_id if desired else None)
            if desired is None:
                raise RunConfigError("no desired tag: set one, or a tag in CONTAINER_IMAGE, "
                                     "or FALLBACK_TAG")
            self._persist(desired)
            result = updater.check(desired, install=install)
        except RunConfigError as exc:
            error = str(exc)
            self._report_failure(error, event="config_error")
        except EdgeAgentError as exc:
            # An update that started and broke off, or a tag that exists nowhere (not even
            # the fallback), is an answer for whoever asked; a registry blip is not.
            final = isinstance(exc, ManifestUnknown) or self.status.update_status in BUSY
            error = str(exc)
            self._report_failure(error, event="update_failed" if final else None)
        except Exception as exc:  # the loop boundary: a bug must not kill the agent
            log.exception("unexpected error during a check; the container is left as it is")
            error = f"internal error: {type(exc).__name__}: {exc}"
            self._report_failure(error, event=None)
        else:
            self._failures = 0
            self._last_error = None
        finally:
            REQUEST_ID.set(None)
        for request, reply in replies:
            reply(_check_answer(request, result, error))
        return result

    def _ensure_updater(self) -> Updater:
        if self._updater is None:
            engine = self._connect_engine()
            self._updater = Updater(self.settings, engine, self.registry, self.data, self.state,
                                    self.status, should_abort=lambda: self.should_exit)
        return self._updater

    def _report_failure(self, error: str, event: str | None) -> None:
        self._failures += 1
        delay = min(self.settings.poll_interval_s,
                    backoff_s(self._failures, RETRY_BASE_S, RETRY_CAP_S))
        self._next_check = time.monotonic() + delay
        desired = self.status.desired
        key = (error, desired.request_id if desired else None)
        if key != self._last_error:
            log.error("%s (retrying in %.0f s)", error, delay)
            if event is not None:
                self.status.event(event, error=error, tag=desired.tag if desired else None)
        else:
            log.debug("%s (again; retrying in %.0f s)", error, delay)
        self._last_error = key
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
        self.data.write_status(document)


def _check_answer(
    request: CheckRequest, result: CheckResult | None, error: str | None
) -> dict[str, Any]:
    answer: dict[str, Any] = {"request_id": request.request_id, "ok": error is None}
    if result is not None:
        answer.update(outcome=result.outcome, tag=result.target.tag, digest=result.target.digest)
    if error is not None:
        answer["error"] = error
    return answer


def _log_event(event: dict[str, Any]) -> None:
    if event.get("event") == "pull_progress":
        log.debug("pull %s%%", event.get("progress"))
        return
    skip = ("event", "ts", "device_id")
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in skip)
    log.info("event %s %s", event.get("event"), details,
             extra={"request_id": event.get("request_id")})
