"""The agent updates itself (docs/SELF-UPDATE.md): the management lock, the handover's
steps, and the reconciliation at start. Decisions come from ``agent/handover.py``; every
Docker call goes through ``Engine``.

Exactly one agent manages the app: the one holding an exclusive ``flock`` on
DATA_DIR/agent.lock (both containers share DATA_DIR). The kernel drops the lock of a
process that dies, so a killed agent never leaves it behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edge_agent import __version__
from edge_agent.agent.config import Settings
from edge_agent.agent.engine import ContainerInfo, Engine
from edge_agent.agent.errors import ManifestUnknown
from edge_agent.agent.handover import (
    CANDIDATE_SUFFIX,
    MARKER_ENV,
    VERSION_ENV,
    Handover,
    Next,
    Phase,
    Role,
    candidate_config,
    decide,
    own_container_id,
    role_of,
    satisfied,
)
from edge_agent.agent.reconcile import Desired
from edge_agent.files import atomic_write, read_regular_file
from edge_agent.protocol import safejson
from edge_agent.protocol.errors import EdgeAgentError
from edge_agent.protocol.events import EventName
from edge_agent.protocol.state import AgentUpdateStatus
from edge_agent.protocol.tags import split_image

log = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
RECORD_FILE = "handover.json"
CANDIDATE_FILE = "handover-candidate.json"
MEMORY_FILE = "agent-update.json"
MAX_FILE_BYTES = 64 * 1024
POLL_S = 0.5
# A pull or registry blip is retried after this long; a tag that does not exist is not.
RETRY_S = 60.0


def running_agent_version() -> str:
    """The version this agent reports: EDGE_AGENT_VERSION (set by test and custom
    images) or the package's."""
    return os.environ.get(VERSION_ENV) or __version__


class ManagementLock:
    """The exclusive flock on DATA_DIR/agent.lock: who holds it manages the app."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self.held = False

    def try_acquire(self) -> bool:
        if self.held:
            return True
        if self._file is None:
            self._file = self.path.open("ab")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def release(self) -> None:
        if self._file is not None and self.held:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self.held = False


@dataclass
class AgentView:
    """The state document's ``agent`` object."""

    desired: str | None = None
    source: str | None = None
    request_id: str | None = None
    status: AgentUpdateStatus = AgentUpdateStatus.IDLE
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"desired": self.desired, "source": self.source, "request_id": self.request_id,
                "status": str(self.status), "last_error": self.last_error}


EventSink = Callable[..., None]


class SelfUpdate:
    """One agent's side of a handover."""

    def __init__(self, settings: Settings, view: AgentView, event: EventSink,
                 should_exit: Callable[[], bool],
                 connect_engine: Callable[[], Engine] = Engine.connect) -> None:
        self.settings = settings
        self.view = view
        self._event = event
        self._should_exit = should_exit
        self._connect_engine = connect_engine
        self.dir = settings.data_dir
        self.lock = ManagementLock(self.dir / LOCK_FILE)
        self.version = running_agent_version()
        self.marker = os.environ.get(MARKER_ENV) or None
        self.my_id = _read_own_id()
        self.pause_link: Callable[[], None] = lambda: None
        self.resume_link: Callable[[], None] = lambda: None
        self._engine: Engine | None = None
        self._me: dict[str, Any] | None = None
        self._unavailable: str | None = None if self.my_id else (
            "the agent does not run in a Docker container (or cannot see its own id): "
            "it cannot update itself")
        self._retry_at = 0.0
        self._said: str | None = None
        self.resume_wait = False
        self.announce: tuple[EventName, dict[str, Any]] | None = None

    # -- files ---------------------------------------------------------------------
    def _read_json(self, name: str) -> dict[str, Any] | None:
        try:
            data = read_regular_file(self.dir / name, max_bytes=MAX_FILE_BYTES)
            return None if data is None else safejson.loads_object(data,
                                                                    max_bytes=MAX_FILE_BYTES)
        except (EdgeAgentError, safejson.UntrustedJson) as exc:
            log.error("handover: %s is unreadable (%s); ignored", name, exc)
            return None

    def record(self) -> Handover | None:
        obj = self._read_json(RECORD_FILE)
        if obj is None:
            return None
        try:
            return Handover.from_json(obj)
        except ValueError as exc:
            log.error("handover: %s is damaged (%s); ignored", RECORD_FILE, exc)
            return None

    def _save(self, record: Handover) -> None:
        atomic_write(self.dir / RECORD_FILE, json.dumps(record.to_json()).encode())

    def _clear(self) -> None:
        for name in (RECORD_FILE, CANDIDATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()

    def failed_version(self) -> str | None:
        memory = self._read_json(MEMORY_FILE) or {}
        failed = memory.get("failed")
        return failed if isinstance(failed, str) else None

    def _remember_failure(self, version: str | None, reason: str | None) -> None:
        atomic_write(self.dir / MEMORY_FILE,
                     json.dumps({"failed": version, "reason": reason}).encode())

    # -- docker --------------------------------------------------------------------
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._connect_engine()
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    # -- start -----------------------------------------------------------------------
    def startup(self) -> bool:
        """Before the loop: a candidate proves itself; every agent then waits for the
        lock and acts on an unfinished handover. False when asked to stop meanwhile."""
        record = self.record()
        if role_of(record, self.my_id, self.marker) is Role.CANDIDATE and not self._prove():
            return False
        if not self._acquire():
            return False
        record = self.record()
        role = role_of(record, self.my_id, self.marker)
        if record is None or role is Role.OTHER:
            return True
        decision = decide(record, role, holding_lock=True,
                          candidate_running=self._candidate_running(record),
                          candidate_ready=self._candidate_ready(record), now=time.time())
        log.info("handover %s to agent %s found at start (phase %s, we are the %s): %s",
                 record.id[:8], record.version, record.phase, role, decision.next)
        if decision.next is Next.RETRY:
            self._drop_candidate(record)
            self._clear()
        elif decision.next in (Next.TAKE_OVER, Next.FINISH):
            self._finish(record)
        elif decision.next is Next.FAIL:
            self._fail(record, decision.reason)
        else:  # WAIT, RELEASE: the loop resumes waiting once the link runs
            self.resume_wait = True
            self.view.status = AgentUpdateStatus.UPDATING
        return True

    def _acquire(self) -> bool:
        """Wait for the management lock. While it waits, an old agent still watches its
        handover: a candidate that fails to prove itself in time is removed."""
        waiting_said = False
        while not self._should_exit():
            try:
                if self.lock.try_acquire():
                    return True
            except OSError as exc:
                log.error("cannot take the management lock %s (%s): managing without it",
                          self.lock.path, exc.strerror)
                return True
            if not waiting_said:
                log.info("waiting for the management lock %s (another agent manages the "
                         "app)", self.lock.path)
                waiting_said = True
            record = self.record()
            role = role_of(record, self.my_id, self.marker)
            if record is not None and role is Role.OLD:
                decision = decide(record, role, holding_lock=False,
                                  candidate_running=self._candidate_running(record),
                                  candidate_ready=True, now=time.time())
                if decision.next is Next.FAIL:
                    self._drop_candidate(record)  # its death frees the lock
            time.sleep(POLL_S)
        return False

    def _prove(self) -> bool:
        """The candidate's proof before it may take the lock: Docker answers (it sees its
        own container and the app's) and, when configured, the broker takes a
        connection. Written to DATA_DIR for the old agent; retried until it holds."""
        record = self.record()
        said: str | None = None
        while not self._should_exit() and record is not None:
            error = self._proof_error()
            atomic_write(self.dir / CANDIDATE_FILE, json.dumps(
                {"id": record.id, "ready": error is None, "error": error}).encode())
            if error is None:
                log.info("handover %s: the new agent %s is ready (Docker and broker "
                         "reachable); waiting for the old agent to hand over", record.id[:8],
                         self.version)
                return True
            if error != said:
                log.error("handover %s: the new agent cannot prove itself: %s",
                          record.id[:8], error)
                said = error
            time.sleep(2.0)
        return False

    def _proof_error(self) -> str | None:
        try:
            engine = self.engine()
            if engine.container_attrs(self.my_id or "") is None:
                return "Docker does not show the new agent's own container"
            engine.container(self.settings.container_name)
        except EdgeAgentError as exc:
            self._engine = None
            return f"cannot reach Docker: {exc}"
        if self.settings.mqtt is not None:
            from edge_agent.protocol.mqtt import BrokerClient  # noqa: PLC0415 - paho: MQTT only

            probe = BrokerClient(self.settings.mqtt,
                                 f"edge-agent-{self.settings.device_id}-candidate")
            try:
                probe.start(wait_s=10.0)
            except EdgeAgentError as exc:
                return f"cannot reach the broker: {exc}"
            finally:
                probe.stop()
        return None

    # -- the old agent's side ----------------------------------------------------------
    def unavailable(self, desired: Desired | None) -> None:
        self.view.status = AgentUpdateStatus.UNAVAILABLE
        self.view.last_error = self._unavailable
        key = f"unavailable {desired.tag if desired else None}"
        if desired is not None and key != self._said:
            self._said = key
            log.warning("agent update to %s requested, but %s", desired.tag, self._unavailable)
            self._event(EventName.AGENT_UPDATE_FAILED, request_id=desired.request_id,
                        version=desired.tag, reason=self._unavailable)

    def step(self, desired: Desired | None) -> None:  # noqa: PLR0911 - each reason to wait
        """Between checks: update the agent when its desired version differs."""
        self.view.desired = desired.tag if desired else None
        self.view.source = str(desired.source) if desired else None
        self.view.request_id = desired.request_id if desired else None
        if self.resume_wait:
            self.resume_wait = False
            record = self.record()
            if record is not None:
                self._wait(record)
            return
        if desired is None:
            if self.view.status is not AgentUpdateStatus.UNAVAILABLE:
                self.view.status = AgentUpdateStatus.IDLE
            return
        if self._unavailable is not None:
            self.unavailable(desired)
            return
        try:
            me = self._own()
        except EdgeAgentError as exc:
            self._say(f"cannot inspect the agent's own container: {exc}")
            return
        image_tag = _tag_of(str((me.get("Config") or {}).get("Image") or ""))
        if satisfied(desired.tag, self.version, image_tag):
            self.view.status = AgentUpdateStatus.IDLE
            return
        if desired.tag == self.failed_version():
            self.view.status = AgentUpdateStatus.FAILED
            return
        if time.monotonic() < self._retry_at:
            return
        self._start(desired, me)

    def _own(self) -> dict[str, Any]:
        me = self.engine().container_attrs(self.my_id or "")
        if me is None:
            raise EdgeAgentError(f"no container {self.my_id}")
        return me

    def _say(self, error: str) -> None:
        if error != self._said:
            log.error("agent update: %s", error)
            self._said = error
        self.view.last_error = error

    def _start(self, desired: Desired, me: dict[str, Any]) -> None:
        repository = self.settings.agent_image or _repository_of(
            str((me.get("Config") or {}).get("Image") or ""))
        name = str(me.get("Name") or "").lstrip("/")
        if not repository or not name:
            self._say("the agent's own image repository or container name is unknown; set "
                      "AGENT_IMAGE")
            return
        record = Handover(
            id=uuid.uuid4().hex, version=desired.tag, image=f"{repository}:{desired.tag}",
            old_id=str(me["Id"]), old_name=name, candidate_name=name + CANDIDATE_SUFFIX,
            phase=Phase.PULLING, deadline=0.0, request_id=desired.request_id,
            old_version=self.version)
        log.info("agent update %s -> %s (%s): handover %s starts", self.version, desired.tag,
                 record.image, record.id[:8])
        self.view.status = AgentUpdateStatus.UPDATING
        self.view.last_error = None
        self._event(EventName.AGENT_UPDATE_STARTED, request_id=desired.request_id,
                    version=desired.tag, from_version=self.version, image=record.image)
        self._save(record)
        engine = self.engine()
        try:
            engine.pull(repository, desired.tag, lambda _: None, self._should_exit)
            old_image = engine.image_attrs(str(me.get("Image") or "")) or {}
            config = candidate_config(me, old_image, record.image, record.id)
            record = _replace(record, phase=Phase.CREATING)
            self._save(record)
            self._drop_candidate(record)  # a leftover of an earlier attempt
            candidate_id = engine.create_from_config(record.candidate_name, config)
            record = _replace(record, candidate_id=candidate_id, phase=Phase.STARTED,
                              deadline=time.time() + self.settings.agent_update_timeout_s)
            self._save(record)
            engine.start(candidate_id)
        except EdgeAgentError as exc:
            permanent = isinstance(exc, ManifestUnknown)
            self._drop_candidate(record)
            self._clear()
            self._report_failure(record, f"cannot start the new agent: {exc}",
                                 remember=permanent)
            if not permanent:
                self._retry_at = time.monotonic() + RETRY_S
            return
        self._wait(record)

    def _wait(self, record: Handover) -> None:
        """Until the candidate is proven (stand down) or failed (take over again)."""
        released = not self.lock.held
        while not self._should_exit():
            current = self.record() if released else record
            if current is None:
                if released:  # the new agent finished; it removes us
                    time.sleep(POLL_S)
                    continue
                return
            record = current
            decision = decide(record, Role.OLD, holding_lock=self.lock.held,
                              candidate_running=self._candidate_running(record),
                              candidate_ready=self._candidate_ready(record), now=time.time())
            if decision.next is Next.RELEASE:
                record = _replace(record, phase=Phase.RELEASED)
                self._save(record)
                log.info("handover %s: the new agent is ready; handing the management lock "
                         "over", record.id[:8])
                self.pause_link()
                self.lock.release()
                released = True
            elif decision.next is Next.FAIL:
                self._fail(record, decision.reason)
                return
            elif decision.next is Next.STAND_DOWN and self._said != f"stand down {record.id}":
                self._said = f"stand down {record.id}"
                log.info("handover %s: the new agent %s proved itself; this agent waits "
                         "to be removed", record.id[:8], record.version)
            time.sleep(POLL_S)

    def _fail(self, record: Handover, reason: str) -> None:
        detail = self._candidate_detail(record)
        self._drop_candidate(record)
        while not self.lock.held and not self._should_exit():
            with contextlib.suppress(OSError):
                self.lock.try_acquire()
            time.sleep(0.1)
        self._clear()
        self._report_failure(record, f"{reason}{detail}", remember=True)
        self.resume_link()

    def _report_failure(self, record: Handover, reason: str, *, remember: bool) -> None:
        log.error("agent update to %s failed: %s; agent %s keeps managing", record.version,
                  reason, self.version)
        if remember:
            self._remember_failure(record.version, reason)
            self.view.status = AgentUpdateStatus.FAILED
        else:
            self.view.status = AgentUpdateStatus.IDLE
        self.view.last_error = reason
        self._event(EventName.AGENT_UPDATE_FAILED, request_id=record.request_id,
                    version=record.version, reason=reason)

    def _candidate_detail(self, record: Handover) -> str:
        proof = self._read_json(CANDIDATE_FILE) or {}
        parts = []
        if proof.get("id") == record.id and isinstance(proof.get("error"), str):
            parts.append(str(proof["error"]))
        info = self._candidate_info(record)
        if info is not None and (info.restart_count or not info.running):
            parts.append(f"its container is {info.status}, exit code {info.exit_code}, "
                         f"restarted {info.restart_count} times")
        return f": {'; '.join(parts)}" if parts else ""

    def _candidate_info(self, record: Handover) -> ContainerInfo | None:
        try:
            return self.engine().container(record.candidate_id or record.candidate_name)
        except EdgeAgentError:
            return None

    def _candidate_running(self, record: Handover) -> bool | None:
        if record.candidate_id is None and record.phase not in (Phase.PULLING, Phase.CREATING):
            return None
        try:
            info = self.engine().container(record.candidate_id or record.candidate_name)
        except EdgeAgentError:
            return True  # unknown: only the deadline decides
        return None if info is None else info.running

    def _candidate_ready(self, record: Handover) -> bool:
        proof = self._read_json(CANDIDATE_FILE) or {}
        return proof.get("id") == record.id and proof.get("ready") is True

    def _drop_candidate(self, record: Handover) -> None:
        engine = self.engine()
        for ref in {record.candidate_id, record.candidate_name} - {None}:
            with contextlib.suppress(EdgeAgentError):
                info = engine.container(str(ref))
                if info is not None and info.id != self.my_id:
                    engine.remove(info.id)

    # -- the new agent's side ---------------------------------------------------------
    def _finish(self, record: Handover) -> None:
        """The candidate holds the lock: proven. Remove the old agent, take its name."""
        if record.phase is not Phase.PROVEN:
            record = _replace(record, phase=Phase.PROVEN)
            self._save(record)
            log.info("handover %s: the new agent %s holds the management lock", record.id[:8],
                     self.version)
        engine = self.engine()
        engine.remove(record.old_id)
        with contextlib.suppress(EdgeAgentError):
            old = engine.container(record.old_name)
            if old is not None and old.id != self.my_id:
                engine.remove(old.id)
        me = engine.container(self.my_id or "")
        if me is not None and me.name != record.old_name:
            engine.rename(me.id, record.old_name)
        self._clear()
        self._remember_failure(None, None)
        self.view.status = AgentUpdateStatus.IDLE
        log.info("handover %s done: agent %s replaced %s", record.id[:8], self.version,
                 record.old_version)
        self.announce = (EventName.AGENT_UPDATE_SUCCEEDED,
                         {"request_id": record.request_id, "version": self.version,
                          "from_version": record.old_version})


def _read_own_id() -> str | None:
    try:
        text = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return own_container_id(text)


def _replace(record: Handover, **changes: Any) -> Handover:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(record, **changes)


def _repository_of(image: str) -> str:
    try:
        return split_image(image.split("@", 1)[0])[0]
    except EdgeAgentError:
        return ""


def _tag_of(image: str) -> str | None:
    try:
        return split_image(image.split("@", 1)[0])[1]
    except EdgeAgentError:
        return None
