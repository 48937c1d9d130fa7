"""The agent's own update, as pure decisions (docs/SELF-UPDATE.md): the handover record
kept in DATA_DIR, what an agent does with it when it holds (or waits for) the management
lock, and the configuration a candidate container is created with. No I/O here: the
handover's steps run in ``agent/selfupdate.py``, every Docker call in ``agent/engine.py``.

Roles: the *old* agent (the record's ``old_id`` is its container) starts the handover;
the *candidate* (its ``EDGE_AGENT_HANDOVER`` marker equals the record's ``id``) is the new
agent proving itself; any other agent ignores a record that is not about it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass
from typing import Any

# The environment variable and label that mark a container as a handover's candidate.
MARKER_ENV = "EDGE_AGENT_HANDOVER"
MARKER_LABEL = "io.edge-agent.handover"
# Overrides the version the agent reports (test images; see docs/SELF-UPDATE.md).
VERSION_ENV = "EDGE_AGENT_VERSION"
CANDIDATE_SUFFIX = "-next"
_CONTAINER_ID_RE = re.compile(r"/containers/([0-9a-f]{64})/")


class Phase(enum.StrEnum):
    """How far a handover got; persisted before each step, so a restart knows."""

    PULLING = "pulling"  # old: pulling the new image
    CREATING = "creating"  # old: creating the candidate (its id may not be recorded yet)
    STARTED = "started"  # old: the candidate runs and proves itself; old holds the lock
    RELEASED = "released"  # old: the candidate was ready; the lock is the candidate's to take
    PROVEN = "proven"  # candidate: it holds the lock and its first check is done


class Role(enum.StrEnum):
    OLD = "old"
    CANDIDATE = "candidate"
    OTHER = "other"


class Next(enum.StrEnum):
    """What the agent holding (or waiting for) the lock does next."""

    MANAGE = "manage"  # no handover about us: manage the app
    RETRY = "retry"  # old: broken off before the candidate ran; drop it, not a failure
    WAIT = "wait"  # keep waiting (for the candidate's proof, or for the lock)
    RELEASE = "release"  # old: the candidate is ready; hand it the lock
    FAIL = "fail"  # old: remove the candidate, take over again, report the failure
    STAND_DOWN = "stand_down"  # old: the candidate proved itself; wait to be removed
    TAKE_OVER = "take_over"  # candidate with the lock: run the first check, then PROVEN
    FINISH = "finish"  # candidate, proven: remove the old agent, take its name


@dataclass(frozen=True)
class Handover:
    """The record in DATA_DIR/handover.json: written only by the agent holding the lock."""

    id: str
    version: str  # the desired agent version (the new image's tag)
    image: str  # repository:version
    old_id: str
    old_name: str
    candidate_name: str
    phase: Phase
    deadline: float  # epoch seconds by which the candidate must be proven
    candidate_id: str | None = None
    request_id: str | None = None
    old_version: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version_of_record": 1, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any) -> Handover:
        """Raises ValueError for anything but a record this module wrote."""
        if not isinstance(obj, dict) or obj.get("version_of_record") != 1:
            raise ValueError("not a version 1 handover record")
        texts = ("id", "version", "image", "old_id", "old_name", "candidate_name")
        for key in texts:
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise ValueError(f"handover record: {key} must be a non-empty string")
        for key in ("candidate_id", "request_id"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise ValueError(f"handover record: {key} must be a string or null")
        deadline = obj.get("deadline")
        if not isinstance(deadline, int | float) or isinstance(deadline, bool):
            raise ValueError("handover record: deadline must be a number")
        return cls(id=obj["id"], version=obj["version"], image=obj["image"],
                   old_id=obj["old_id"], old_name=obj["old_name"],
                   candidate_name=obj["candidate_name"], phase=Phase(str(obj.get("phase"))),
                   deadline=float(deadline), candidate_id=obj.get("candidate_id"),
                   request_id=obj.get("request_id"),
                   old_version=str(obj.get("old_version") or ""))


def role_of(record: Handover | None, my_id: str | None, marker: str | None) -> Role:
    """Which side of ``record`` this agent is on."""
    if record is None:
        return Role.OTHER
    if marker is not None and marker == record.id:
        return Role.CANDIDATE
    if my_id is not None and my_id == record.old_id:
        return Role.OLD
    return Role.OTHER


@dataclass(frozen=True)
class Decision:
    next: Next
    reason: str = ""


def decide(  # noqa: PLR0911, PLR0913 - one answer per case of the table in the docs
        record: Handover | None, role: Role, *, holding_lock: bool,
           candidate_running: bool | None, candidate_ready: bool, now: float) -> Decision:
    """What to do with the handover ``record``, from ``role``'s side.

    ``candidate_running``: the candidate container runs (None: it does not exist);
    ``candidate_ready``: it wrote its readiness proof. The old agent decides both while it
    holds the lock and while it waits for it (after RELEASED); the candidate only once it
    holds the lock.
    """
    if record is None or role is Role.OTHER:
        return Decision(Next.MANAGE if holding_lock else Next.WAIT)
    if role is Role.CANDIDATE:
        if not holding_lock:
            return Decision(Next.WAIT)
        if record.phase is Phase.PROVEN:
            return Decision(Next.FINISH)
        # The old agent released the lock, or is gone and cannot hold it: either way the
        # candidate is the only agent able to manage; it proves itself by doing so.
        return Decision(Next.TAKE_OVER)
    # role OLD
    if record.phase in (Phase.PULLING, Phase.CREATING):
        # the candidate never ran (or never got the chance to): start over, no verdict
        return Decision(Next.RETRY if holding_lock else Next.WAIT,
                        "the handover was broken off before the new agent started")
    if record.phase is Phase.PROVEN:
        return Decision(Next.STAND_DOWN)
    if candidate_running is None:
        return Decision(Next.FAIL, "the new agent's container is gone")
    if now >= record.deadline:
        return Decision(Next.FAIL, "the new agent did not prove itself in time"
                        + ("" if candidate_running else " (it is not running: it exited)"))
    if record.phase is Phase.STARTED:
        if not holding_lock:
            return Decision(Next.WAIT)
        return Decision(Next.RELEASE if candidate_ready and candidate_running else Next.WAIT)
    # RELEASED: the candidate may hold the lock now; holding it ourselves means it does
    # not, so give it back while there is time
    return Decision(Next.RELEASE if holding_lock else Next.WAIT)


def own_container_id(mountinfo: str) -> str | None:
    """This process's container id, from /proc/self/mountinfo: Docker bind-mounts the
    container's hostname, hosts and resolv.conf from ``.../containers/<id>/``."""
    found = {match.group(1) for match in _CONTAINER_ID_RE.finditer(mountinfo)}
    return found.pop() if len(found) == 1 else None


def satisfied(desired: str, version: str, image_tag: str | None) -> bool:
    """Whether this agent already is ``desired``: it reports that version, or runs from
    the image tagged so (a tag like ``stable`` names no version)."""
    return desired in (version, image_tag)


def candidate_config(container: dict[str, Any], old_image: dict[str, Any], image: str,
                     handover_id: str) -> dict[str, Any]:
    """The create request (Docker API ``Config`` with its ``HostConfig``) for a candidate
    running ``image`` the way ``container`` (our own inspect) runs: what was set for the
    container is carried over, what came from the old image is left to the new image
    (environment, labels, user, healthcheck, working directory, entrypoint and command)."""
    config = container.get("Config") or {}
    image_config = old_image.get("Config") or {}
    image_env = set(image_config.get("Env") or ())
    env = [item for item in config.get("Env") or ()
           if item not in image_env and not item.startswith((f"{MARKER_ENV}=",
                                                              f"{VERSION_ENV}="))]
    image_labels = image_config.get("Labels") or {}
    labels = {key: value for key, value in (config.get("Labels") or {}).items()
              if image_labels.get(key) != value and key != MARKER_LABEL}
    created: dict[str, Any] = {
        "Image": image,
        "Env": [*env, f"{MARKER_ENV}={handover_id}"],
        "Labels": {**labels, MARKER_LABEL: handover_id},
        "HostConfig": _host_config(container.get("HostConfig") or {}),
    }
    # Docker names a container's host after its id unless told otherwise: a host name
    # that was chosen (DEVICE_ID may default to it) is kept, a generated one is not.
    hostname = config.get("Hostname")
    if hostname and not str(container.get("Id", "")).startswith(str(hostname)):
        created["Hostname"] = hostname
    for key in ("User", "Healthcheck", "StopSignal", "WorkingDir"):
        if key in config and config[key] != image_config.get(key):
            created[key] = config[key]
    if config.get("Domainname"):
        created["Domainname"] = config["Domainname"]
    return created


def _host_config(host: dict[str, Any]) -> dict[str, Any]:
    """The old container's host configuration, minus what names that container only."""
    kept = dict(host)
    # A container's own files and links: Docker fills them in for the new one.
    for key in ("ContainerIDFile", "Links"):
        kept.pop(key, None)
    return kept
