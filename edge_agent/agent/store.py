"""Everything the agent keeps in DATA_DIR: the tag file, the run config and its own state.

All writes are atomic (temp file, fsync, rename, fsync of the directory) so a power
loss leaves either the old or the new content, never a torn file; the rename replaces
a link planted under the name instead of writing through it. Every read goes through
``files.read_regular_file`` (no links, FIFOs or devices, a size limit) and JSON through
the bounded decoder ``safejson``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docker.models.containers import RUN_CREATE_KWARGS, RUN_HOST_CONFIG_KWARGS

from edge_agent.agent.errors import RunConfigError
from edge_agent.files import StorageError, atomic_write, permission_hint, read_regular_file
from edge_agent.protocol import safejson
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import validate_tag

log = logging.getLogger(__name__)

TAG_FILE = "tag"
RUN_CONFIG_FILE = "docker_config.json"
STATE_FILE = "state.json"
STATUS_FILE = "status.json"
MAX_FILE_BYTES = 1 << 20
# One tag and a newline; some slack for stray whitespace.
MAX_TAG_FILE_BYTES = 4096
# an error about a damaged file is cut to this many characters
SHORT_ERROR_CHARS = 160

# Set by the agent itself; a value in docker_config.json is dropped with a warning.
AGENT_OWNED_KWARGS = frozenset({"detach", "name", "image"})
# containers.run arguments that only make sense for a foreground run.
FOREGROUND_ONLY_KWARGS = frozenset({"remove", "stdout", "stderr", "stream"})
# Everything docker-py's containers.run forwards to create/host config.
ACCEPTED_KWARGS = (
    frozenset(RUN_CREATE_KWARGS) | frozenset(RUN_HOST_CONFIG_KWARGS)
    | {"ports", "volumes", "network", "networking_config"}
) - AGENT_OWNED_KWARGS - {"version"}


@dataclass(frozen=True)
class RunConfig:
    """Validated ``containers.run`` keyword arguments and a hash that identifies them."""

    kwargs: dict[str, Any]
    digest: str
    warnings: tuple[str, ...] = ()


@dataclass
class ImageRef:
    """An image the agent has run: the tag asked for, the registry digest and local id."""

    tag: str
    digest: str | None
    image_id: str


@dataclass
class PendingUpdate:
    """Journal of an update in flight, so a crash at any step can be finished or undone."""

    step: str
    target: ImageRef
    old_container_id: str | None
    new_container_id: str | None = None
    request_id: str | None = None
    desired_tag: str | None = None  # the desired tag it serves: failures are kept per tag
    config_digest: str | None = None  # the docker_config.json the new container was made with
    failure: str | None = None  # why it failed, set before the rollback starts


@dataclass
class AgentState:
    """What the agent remembers across restarts.

    ``failed`` and ``interrupted`` hold attempts as ``{"desired", "digest", "config",
    "reason"}``: a digest (or local image id) that failed under a desired tag with a
    docker_config.json, and updates broken off (agent killed, daemon gone) with no verdict.
    """

    applied: ImageRef | None = None
    previous: ImageRef | None = None
    failed: list[dict[str, str]] = field(default_factory=list)
    pending: PendingUpdate | None = None
    interrupted: list[dict[str, str]] = field(default_factory=list)
    # digests whose signature was verified ({"digest", "keys", "repository"}): TRUSTED_KEYS
    verified: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any) -> AgentState:
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise ValueError("not a version 1 state object")

        def image(value: Any) -> ImageRef | None:
            return None if value is None else ImageRef(**value)

        pending_raw = obj.get("pending")
        pending = None
        if pending_raw is not None:
            pending = PendingUpdate(
                step=str(pending_raw["step"]),
                target=ImageRef(**pending_raw["target"]),
                old_container_id=pending_raw.get("old_container_id"),
                new_container_id=pending_raw.get("new_container_id"),
                request_id=pending_raw.get("request_id"),
                desired_tag=pending_raw.get("desired_tag"),
                config_digest=pending_raw.get("config_digest"),
                failure=pending_raw.get("failure"),
            )
        failed = [
            {str(k): str(v) for k, v in item.items()} for item in obj.get("failed", [])
        ]
        interrupted = [
            {str(k): str(v) for k, v in item.items()} for item in obj.get("interrupted", [])
        ]
        verified = [
            {str(k): str(v) for k, v in item.items()} for item in obj.get("verified", [])
        ]
        return cls(
            applied=image(obj.get("applied")),
            previous=image(obj.get("previous")),
            failed=failed,
            pending=pending,
            interrupted=interrupted,
            verified=verified,
        )


class DataDir:
    """The agent's files in DATA_DIR."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # -- tag file -----------------------------------------------------------------
    def read_tag(self) -> str | None:
        """The tag in the tag file; None when absent. Raises TagError for bad content."""
        data = read_regular_file(self.path / TAG_FILE, max_bytes=MAX_TAG_FILE_BYTES)
        if data is None:
            return None
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise TagError("tag file is not UTF-8 text") from None
        if not text:
            return None
        if "\n" in text:
            raise TagError("tag file must hold one line")
        return validate_tag(text)

    def write_tag(self, tag: str | None) -> None:
        """Persist the effective desired tag; None removes the file."""
        path = self.path / TAG_FILE
        if tag is None:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot remove {path}: {exc.strerror}"
                                   f"{permission_hint(exc, path)}") from None
            return
        atomic_write(path, (validate_tag(tag) + "\n").encode())

    # -- docker_config.json -------------------------------------------------------
    def read_run_config(self) -> RunConfig:
        """Read and validate docker_config.json; a missing file means no extra arguments."""
        path = self.path / RUN_CONFIG_FILE
        try:
            data = read_regular_file(path, max_bytes=MAX_FILE_BYTES)
        except StorageError as exc:
            raise RunConfigError(str(exc)) from None
        if data is None:
            return parse_run_config({})
        try:
            obj = safejson.loads(data, max_bytes=MAX_FILE_BYTES)
        except safejson.UntrustedJson as exc:
            raise RunConfigError(f"{path} is not valid JSON: {exc}") from None
        return parse_run_config(obj)

    # -- the agent's own state ----------------------------------------------------
    def load_state(self) -> AgentState:
        """The remembered state; a missing or damaged file starts fresh (and says so)."""
        path = self.path / STATE_FILE
        try:
            data = read_regular_file(path, max_bytes=MAX_FILE_BYTES)
        except StorageError as exc:
            log.error("%s; starting from what Docker shows", exc)
            return AgentState()
        if data is None:
            return AgentState()
        try:
            return AgentState.from_json(safejson.loads(data, max_bytes=MAX_FILE_BYTES))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # AttributeError: a value of the wrong JSON type where an object belongs
            log.error("state file %s is damaged (%s); starting from what Docker shows", path,
                      _short(exc))
            return AgentState()

    def save_state(self, state: AgentState) -> None:
        atomic_write(self.path / STATE_FILE, json.dumps(state.to_json(), indent=1).encode())

    def write_status(self, status: dict[str, Any]) -> None:
        """The latest published state document, for standalone use and the healthcheck."""
        atomic_write(self.path / STATUS_FILE, json.dumps(status, indent=1).encode(), durable=False)

    def read_status(self) -> dict[str, Any] | None:
        """The last state document written; None when absent or unreadable as one."""
        data = read_regular_file(self.path / STATUS_FILE, max_bytes=MAX_FILE_BYTES)
        if data is None:
            return None
        try:
            return safejson.loads_object(data, max_bytes=MAX_FILE_BYTES)
        except safejson.UntrustedJson:
            return None


def _short(exc: Exception) -> str:
    """An exception in one short line (a damaged file's text is not echoed at length)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= SHORT_ERROR_CHARS else text[:SHORT_ERROR_CHARS - 3] + "..."


def parse_run_config(obj: Any) -> RunConfig:
    """Validate ``containers.run`` kwargs: unknown or foreground-only keys are refused."""
    if not isinstance(obj, dict):
        raise RunConfigError("docker_config.json must hold a JSON object of containers.run args")
    kwargs = dict(obj)
    warnings = []
    for key in sorted(AGENT_OWNED_KWARGS & kwargs.keys()):
        warnings.append(f"docker_config.json: {key!r} is set by the agent; ignored")
        del kwargs[key]
    foreground = sorted(FOREGROUND_ONLY_KWARGS & kwargs.keys())
    if foreground:
        raise RunConfigError(
            f"docker_config.json: {', '.join(foreground)} cannot be used for a detached container"
        )
    unknown = sorted(kwargs.keys() - ACCEPTED_KWARGS)
    if unknown:
        raise RunConfigError(
            f"docker_config.json: unknown containers.run argument(s): {', '.join(unknown)}"
        )
    labels = kwargs.get("labels")
    if labels is not None and not isinstance(labels, dict | list):
        raise RunConfigError("docker_config.json: 'labels' must be an object or a list")
    canonical = json.dumps(kwargs, sort_keys=True, separators=(",", ":"))
    return RunConfig(
        kwargs=kwargs,
        digest=hashlib.sha256(canonical.encode()).hexdigest()[:16],
        warnings=tuple(warnings),
    )
