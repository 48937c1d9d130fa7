"""Reading the files in DATA_DIR without trusting what is there, and writing them atomically.

Whoever can write DATA_DIR (another container sharing the volume, a careless script) can
put there a symbolic or hard link to a secret the agent may read, a FIFO that blocks
``open()`` forever, a device that never ends (or acts when opened), a directory, or a
huge file. So every read here:

- looks first (``lstat``) and never opens anything but a regular file;
- opens without following a final symbolic link (``O_NOFOLLOW``) and without blocking
  (``O_NONBLOCK``: a FIFO swapped in meanwhile cannot hold ``open()``);
- checks what it actually opened (``fstat`` of the descriptor, so nothing can be swapped
  in between): a regular file with one link, within the size limit;
- reads at most the limit, whatever the file does meanwhile.

A refusal is a ``StorageError`` naming the path and the reason in one line; the content
is never read, so it cannot show up in a message, a state or a request. Writes
(``atomic_write``) create a new file and rename it over the old name, which replaces a
planted link rather than following it. The agent's DATA_DIR and the bridge's rollout
records both use these.

This module imports nothing heavy: ``edge-agent status`` and ``healthcheck`` use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from edge_agent.protocol.errors import EdgeAgentError

_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)


class StorageError(EdgeAgentError):
    """A file in DATA_DIR (or another data directory) could not be read or written."""


class FileRefused(StorageError):
    """A file in DATA_DIR is not something the agent reads (link, FIFO, device, too big)."""



def permission_hint(exc: OSError, path: Path) -> str:
    """What to do about EACCES/EPERM on a file of a data directory (the agent's DATA_DIR,
    the bridge's rollout records): whose the files must be."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    uid = os.getuid()
    return (f" (this program runs as uid {uid}: make {path.parent} its own, "
            f"chown -R {uid} {path.parent})")


def _kind(mode: int) -> str | None:  # noqa: PLR0911 - one return per file type
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _refuse(path: Path, reason: str) -> FileRefused:
    return FileRefused(f"{path}: refused: {reason} (only a regular file is read)")


def _check(path: Path, st: os.stat_result, max_bytes: int) -> None:
    kind = _kind(st.st_mode)
    if kind is not None:
        raise _refuse(path, f"it is {kind}")
    if st.st_nlink > 1:
        raise _refuse(path, f"it has {st.st_nlink} hard links (an alias of another file)")
    if st.st_size > max_bytes:
        raise _refuse(path, f"it is {st.st_size} bytes, more than the limit of {max_bytes}")


def read_regular_file(path: Path, *, max_bytes: int) -> bytes | None:
    """The bytes of ``path``, None when it does not exist; FileRefused for anything but
    a regular file of at most ``max_bytes``, StorageError when it cannot be read."""
    try:
        _check(path, os.lstat(path), max_bytes)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except FileRefused:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link put there after the lstat
            raise _refuse(path, "it is a symbolic link") from None
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}"
                           f"{permission_hint(exc, path)}") from None
    try:
        _check(path, os.fstat(fd), max_bytes)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except FileRefused:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}"
                           f"{permission_hint(exc, path)}") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise _refuse(path, f"it grew past the limit of {max_bytes} bytes while read")
    return b"".join(chunks)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new bytes, nothing else.

    ``durable=False`` skips the fsyncs: for derived files rewritten often (status.json),
    where flash wear matters more than surviving a power cut.
    """
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if not durable:
            return
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}"
                           f"{permission_hint(exc, path)}") from None
