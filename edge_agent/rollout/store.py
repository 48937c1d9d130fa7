"""Durable rollout state: one JSON file per rollout in ``BRIDGE_DATA_DIR/rollouts/``,
and the lock that makes one controller the only one.

A file and not retained MQTT messages: the broker has no compare-and-set, so two
bridges could both read "no controller" and both take over; a lock in the broker cannot
be made exclusive without that race. ``fcntl.flock`` on ``controller.lock`` is
exclusive by the kernel, held for the controller's lifetime and freed by the kernel
when the process dies, even by SIGKILL, so a restarted bridge takes over at once.

Reads and writes go through ``edge_agent.files``, as the agent's DATA_DIR does: writes
are atomic and durable (a reader, or the next start after a power cut, sees the old
record or the new one); reads take regular files only, bounded in size (a planted link
or FIFO is refused, never followed).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

from edge_agent.files import StorageError, atomic_write, read_regular_file
from edge_agent.protocol import safejson
from edge_agent.protocol.topics import ID_RE
from edge_agent.rollout.plan import Rollout
from edge_agent.rollout.spec import SPEC_FIELDS, SpecError, parse_spec

log = logging.getLogger(__name__)

LOCK_NAME = "controller.lock"
SUFFIX = ".json"
MAX_RECORD_BYTES = 16 * 1024 * 1024  # 10,000 devices at ~400 bytes each, and room


class StoreError(Exception):
    """The rollout directory cannot be used; the message says why."""


class RolloutStore:
    """Rollout records in ``directory``; ``acquire`` makes this process the controller."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None

    def prepare(self) -> None:
        """Create the directory; StoreError when it cannot be written."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".probe."):
                pass
        except OSError as exc:
            raise StoreError(f"cannot write {self.directory}: {exc.strerror or exc}") from None

    def acquire(self) -> bool:
        """Take the controller lock without waiting; False when another process holds it."""
        path = self.directory / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise StoreError(f"cannot lock {path}: {exc.strerror or exc}") from None
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    @property
    def holds_lock(self) -> bool:
        return self._lock_fd is not None

    def path(self, rollout_id: str) -> Path:
        return self.directory / f"{rollout_id}{SUFFIX}"

    def save(self, rollout: Rollout) -> None:
        """Write the record atomically and durably; StoreError when it cannot."""
        data = json.dumps(rollout.to_json(), separators=(",", ":"), allow_nan=False).encode()
        try:
            atomic_write(self.path(rollout.id), data)
        except StorageError as exc:
            raise StoreError(str(exc)) from None

    def load_all(self) -> list[Rollout]:
        """Every readable record, oldest first; an unreadable one is logged and left."""
        rollouts = []
        try:
            names = sorted(p.name for p in self.directory.iterdir())
        except OSError as exc:
            raise StoreError(f"cannot list {self.directory}: {exc.strerror or exc}") from None
        for name in names:
            if not name.endswith(SUFFIX) or not ID_RE.fullmatch(name[: -len(SUFFIX)]):
                continue
            try:
                rollouts.append(self.load(self.directory / name))
            except StoreError as exc:
                log.error("rollout record ignored: %s", exc)
        rollouts.sort(key=lambda r: (r.created_at, r.id))
        return rollouts

    def load(self, path: Path) -> Rollout:
        try:
            data = read_regular_file(path, max_bytes=MAX_RECORD_BYTES)
        except StorageError as exc:
            raise StoreError(str(exc)) from None
        if data is None:
            raise StoreError(f"{path}: gone")
        try:
            obj = safejson.loads_object(data, max_bytes=MAX_RECORD_BYTES)
            spec = parse_spec({k: v for k, v in obj["spec"].items() if k in SPEC_FIELDS})
            return Rollout.from_json(obj, spec)
        except (safejson.UntrustedJson, SpecError, KeyError, TypeError, ValueError,
                AttributeError) as exc:
            raise StoreError(f"{path}: not a rollout record ({exc})") from None
