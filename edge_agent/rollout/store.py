"""Durable rollout state: one JSON file per rollout in ``BRIDGE_DATA_DIR/rollouts/``,
and the lock that makes one controller the only one.

A file and not retained MQTT messages: the broker has no compare-and-set, so two
bridges could both read "no controller" and both take over; a lock in the broker cannot
be made exclusive without that race. ``fcntl.flock`` on ``controller.lock`` is
exclusive by the kernel, held for the controller's lifetime and freed by the kernel
when the process dies, even by SIGKILL, so a restarted bridge takes over at once.

Writes are atomic (a new file, fsync, rename over the old name, fsync of the
directory): a reader, or the next start after a power cut, sees the old record or the
new one. Reads take regular files only, bounded in size (a planted link or FIFO is
refused, never followed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

from edge_agent.protocol import safejson
from edge_agent.protocol.topics import ID_RE
from edge_agent.rollout.plan import Rollout
from edge_agent.rollout.spec import SPEC_FIELDS, SpecError, parse_spec

log = logging.getLogger(__name__)

LOCK_NAME = "controller.lock"
SUFFIX = ".json"
MAX_RECORD_BYTES = 16 * 1024 * 1024  # 10,000 devices at ~400 bytes each, and room
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


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
        _atomic_write(self.path(rollout.id), data)

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
        data = _read_regular_file(path, MAX_RECORD_BYTES)
        try:
            obj = safejson.loads_object(data, max_bytes=MAX_RECORD_BYTES)
            spec = parse_spec({k: v for k, v in obj["spec"].items() if k in SPEC_FIELDS})
            return Rollout.from_json(obj, spec)
        except (safejson.UntrustedJson, SpecError, KeyError, TypeError, ValueError,
                AttributeError) as exc:
            raise StoreError(f"{path}: not a rollout record ({exc})") from None


def _read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (no link, FIFO or device)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise StoreError(f"{path}: not a regular file of at most {max_bytes} bytes")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise StoreError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise StoreError(f"{path}: larger than {max_bytes} bytes")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None

