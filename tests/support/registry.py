"""Registries for tests: reading the request log, and private registries.

``RegistryLog`` reads a registry's log (by default the shared registry's,
``$STACK_DIR/registry.log``) from an offset and counts the requests in it, e.g. to
prove that a check made no pull::

    mark = registry_log.mark()
    ...  # the code under test
    registry_log.sync()  # make sure everything before is in the log
    assert registry_log.count("GET", f"/v2/{path}/blobs/", since=mark) == 0

The log format (distribution 2.8, logrus text formatter, checked on the real
registry) is one line per event with ``key=value`` fields, values quoted Go-style when
they contain spaces or quotes, e.g.::

    time="..." level=info msg="response completed" go.version=go1.19.8
    http.request.host="127.0.0.1:5000" http.request.id=57871e5e-...
    http.request.method=GET http.request.remoteaddr="127.0.0.1:50518"
    http.request.uri=/v2/ http.request.useragent=curl/7.88.1 ...
    http.response.status=200 http.response.written=2

A request can log several lines ("authorized request" then "response completed";
"response completed with error" for 4xx/5xx; a 401 logs only a warning "error
authorizing context: ..." without a status), all with the same ``http.request.id``,
so requests are counted by id. The registry's access log (Apache combined format,
``127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "" "agent"``) is in the same file
and ignored here.

``PrivateRegistry`` runs another ``docker-registry serve`` on a free 127.0.0.1 port
with its own storage and log, optionally with htpasswd basic auth. Basic auth over
plain http works: distribution does not insist on TLS, and the Docker daemon treats
127.0.0.0/8 as insecure registries, so it logs in and pulls over http.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.support import DEFAULT_REGISTRY, REPO_ROOT, free_port, stack_dir, terminate

__all__ = [
    "MANIFEST_ACCEPT",
    "PrivateRegistry",
    "RegistryLog",
    "RegistryRequest",
    "manifest_digest",
    "registry_answers",
    "repo_path",
]

REGISTRY_CONFIG = REPO_ROOT / "tests" / "stack" / "registry.yml"

#: Accept header for a manifest request that may be answered with any schema
MANIFEST_ACCEPT = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    ]
)


def repo_path(repo: str) -> str:
    """The repository's path in the registry API: ``127.0.0.1:5000/t1/app`` -> ``t1/app``.

    A repository without a registry host is returned unchanged.
    """
    first, sep, rest = repo.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return repo


# ---------------------------------------------------------------------------- log


@dataclass(frozen=True)
class RegistryRequest:
    """One request, as the registry logged it."""

    id: str
    method: str
    uri: str
    status: int | None  # None when no line carried it
    user_agent: str
    offset: int  # where its first log line starts

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


# the request sync() sends; requests() leaves it out
_SYNC_URI = "/v2/?edge-test-sync="

# key=value, value either bare or a Go-quoted string
_FIELD = re.compile(r'([A-Za-z0-9_.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value[1:-1]
        return decoded if isinstance(decoded, str) else value[1:-1]
    return value


def parse_fields(line: str) -> dict[str, str]:
    """The ``key=value`` fields of one logrus text line (empty for other lines)."""
    if not line.startswith("time="):
        return {}
    return {key: _unquote(value) for key, value in _FIELD.findall(line)}


class RegistryLog:
    """Reads a registry log file and counts requests by method and path.

    Offsets are byte offsets into the file; ``mark()`` is the current end.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, address: str = DEFAULT_REGISTRY
    ) -> None:
        self.path = Path(path) if path is not None else stack_dir() / "registry.log"
        self.address = address

    def mark(self) -> int:
        """The current end of the log: pass it as ``since`` to see only later requests."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, since: int = 0) -> Iterator[tuple[int, str]]:
        """(offset, line) for each complete line from ``since`` on."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(since)
                offset = since
                for raw in fh:
                    if not raw.endswith(b"\n"):
                        break  # being written; the next read gets it whole
                    yield offset, raw.decode("utf-8", "replace").rstrip("\n")
                    offset += len(raw)
        except FileNotFoundError:
            return

    def requests(self, since: int = 0) -> list[RegistryRequest]:
        """Every request logged from offset ``since`` on, in log order, one per request id."""
        found: dict[str, RegistryRequest] = {}
        for offset, line in self.lines(since):
            fields = parse_fields(line)
            request_id = fields.get("http.request.id")
            method = fields.get("http.request.method")
            if not request_id or not method:
                continue
            uri = fields.get("http.request.uri", "")
            if uri.startswith(_SYNC_URI):
                continue  # our own bookkeeping (sync), not the code under test
            req = found.get(request_id) or RegistryRequest(
                id=request_id,
                method=method,
                uri=uri,
                status=None,
                user_agent=fields.get("http.request.useragent", ""),
                offset=offset,
            )
            status = fields.get("http.response.status")
            if status and status.isdigit():
                req = dataclasses.replace(req, status=int(status))
            elif req.status is None and fields.get("msg", "").startswith(
                "error authorizing context"
            ):
                req = dataclasses.replace(req, status=401)
            found[request_id] = req
        return list(found.values())

    def matching(
        self,
        method: str | None = None,
        path: str | re.Pattern[str] = "",
        *,
        since: int = 0,
        status: int | None = None,
    ) -> list[RegistryRequest]:
        """Requests with this method (None: any) whose path starts with ``path`` (a str)
        or matches it (a compiled pattern, searched), and with ``status`` if given."""
        out = []
        for req in self.requests(since):
            if method is not None and req.method != method.upper():
                continue
            if isinstance(path, re.Pattern):
                if not path.search(req.path):
                    continue
            elif not req.path.startswith(path):
                continue
            if status is not None and req.status != status:
                continue
            out.append(req)
        return out

    def count(
        self,
        method: str | None = None,
        path: str | re.Pattern[str] = "",
        *,
        since: int = 0,
        status: int | None = None,
    ) -> int:
        """How many requests ``matching`` finds."""
        return len(self.matching(method, path, since=since, status=status))

    # shorthands for the questions tests ask most ---------------------------------

    def blob_gets(self, repo: str, since: int = 0) -> int:
        """``GET /v2/<repo>/blobs/...``: layer or config downloads (a pull)."""
        return self.count("GET", f"/v2/{repo_path(repo)}/blobs/", since=since)

    def manifest_requests(self, repo: str, method: str | None = None, since: int = 0) -> int:
        """``HEAD``/``GET /v2/<repo>/manifests/...`` (``method`` None: both)."""
        return self.count(method, f"/v2/{repo_path(repo)}/manifests/", since=since)

    def pushes(self, repo: str, since: int = 0) -> int:
        """``PUT /v2/<repo>/manifests/...``: one per pushed tag."""
        return self.count("PUT", f"/v2/{repo_path(repo)}/manifests/", since=since)

    def sync(self, timeout: float = 5.0, auth: tuple[str, str] | None = None) -> None:
        """Make sure that every request answered before this call is in the log.

        The registry writes a request's line just after it sends the response, so a
        test that reads the log right after the code under test could miss the last
        line. This sends ``GET /v2/?edge-test-sync=<uuid>`` and waits until that request is
        logged. ``requests()`` and the counts leave these requests out.
        """
        token = uuid.uuid4().hex
        start = self.mark()
        request = urllib.request.Request(f"http://{self.address}{_SYNC_URI}{token}")
        if auth:
            basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {basic}")
        with contextlib.suppress(urllib.error.HTTPError):  # a 401 is logged too
            urllib.request.urlopen(request, timeout=timeout).close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(token in line for _, line in self.lines(start)):
                # the logrus line and the access-log line are written one after another
                time.sleep(0.01)
                return
            time.sleep(0.02)
        raise TimeoutError(f"the registry log {self.path} did not show the sync request")


# ------------------------------------------------------------------ HTTP helpers


def registry_answers(address: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET /v2/`` (200, or 401 with auth), None if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def manifest_digest(
    repo: str,
    reference: str,
    *,
    registry: str = DEFAULT_REGISTRY,
    auth: tuple[str, str] | None = None,
    timeout: float = 5.0,
) -> str | None:
    """The registry's digest for ``repo:reference`` (one HEAD request), None if unknown."""
    host, sep, _ = repo.partition("/")
    if sep and ("." in host or ":" in host):
        registry = host
    url = f"http://{registry}/v2/{repo_path(repo)}/manifests/{reference}"
    request = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_ACCEPT})
    if auth:
        basic = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {basic}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            digest = resp.headers.get("Docker-Content-Digest")
            return str(digest) if digest else None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


# ------------------------------------------------------------- private registry


def _htpasswd_line(username: str, password: str) -> str:
    """A bcrypt htpasswd entry (distribution's htpasswd auth accepts only bcrypt)."""
    htpasswd = shutil.which("htpasswd")
    if htpasswd:
        out = subprocess.run(
            [htpasswd, "-B", "-n", "-i", username],
            input=password,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return out.strip() + "\n"
    try:
        import bcrypt  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError as exc:
        raise RuntimeError(
            "need htpasswd (apt-get install apache2-utils; scripts/stack does) "
            "or the bcrypt module for a registry with auth"
        ) from exc
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    return f"{username}:{hashed}\n"


class PrivateRegistry:
    """Another registry (on 127.0.0.1, or ``host``) with its own storage and log, for one test.

    ``stop()`` and ``start()`` keep the port and the storage, so a test can take the
    registry away and bring it back with the same content. ``close()`` stops it and
    removes its directory. With ``username``/``password`` it requires basic auth.
    """

    def __init__(  # noqa: PLR0913 - keyword-only options of a test fixture
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        port: int | None = None,
        config: Path = REGISTRY_CONFIG,
        start: bool = True,
        host: str = "127.0.0.1",
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.username = username
        self.password = password
        self.port = port or free_port(host)
        self.address = f"{host}:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="edge-registry-"))
        self.storage = self.dir / "storage"
        self.storage.mkdir()
        self.log_path = self.dir / "registry.log"
        self.log = RegistryLog(self.log_path, self.address)
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self.htpasswd: Path | None = None
        if username is not None and password is not None:
            self.htpasswd = self.dir / "htpasswd"
            self.htpasswd.write_text(_htpasswd_line(username, password))
        if start:
            self.start()

    # -- credentials -----------------------------------------------------------

    @property
    def auth(self) -> tuple[str, str] | None:
        """(username, password), or None without auth."""
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)

    @property
    def auth_config(self) -> dict[str, str] | None:
        """docker-py's ``auth_config`` for push/pull, or None without auth."""
        if self.username is None or self.password is None:
            return None
        return {"username": self.username, "password": self.password}

    def docker_config_dir(self, path: Path | None = None) -> Path:
        """A directory with a Docker ``config.json`` holding this registry's credentials
        under ``auths`` (use as DOCKER_CONFIG, or ``docker --config``)."""
        target = path or Path(tempfile.mkdtemp(prefix="docker-config-", dir=self.dir))
        target.mkdir(parents=True, exist_ok=True)
        auths: dict[str, dict[str, str]] = {}
        if self.username is not None and self.password is not None:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            auths[self.address] = {"auth": token}
        (target / "config.json").write_text(json.dumps({"auths": auths}, indent=2) + "\n")
        return target

    def repo(self, path: str) -> str:
        """``path`` as a repository of this registry: ``127.0.0.1:<port>/<path>``."""
        return f"{self.address}/{path}"

    # -- lifecycle -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start (or restart) the registry on the same port and storage; waits until it
        answers."""
        if self.running:
            return
        env = dict(os.environ)
        env.update(
            REGISTRY_HTTP_ADDR=self.address,
            REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(self.storage),
        )
        if self.htpasswd is not None:
            env.update(
                REGISTRY_AUTH_HTPASSWD_REALM="edge-agent-test",
                REGISTRY_AUTH_HTPASSWD_PATH=str(self.htpasswd),
            )
        registry_bin = shutil.which("docker-registry")
        if registry_bin is None:
            raise RuntimeError("docker-registry not installed: run scripts/stack")
        self._log_fh = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [registry_bin, "serve", str(self._config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while registry_answers(self.address, timeout=1.0) is None:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self._cleanup_proc()
                raise RuntimeError(f"registry on {self.address} exited at start:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"registry on {self.address} did not answer in {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the registry process (storage and port stay for ``start()``)."""
        proc = self._proc
        if proc is None:
            return
        terminate(proc, timeout)
        self._cleanup_proc()
        # the process is gone, so the port is closed; make sure of it
        deadline = time.monotonic() + timeout
        while registry_answers(self.address, timeout=0.5) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"registry on {self.address} still answers after stop")
            time.sleep(0.05)

    def _cleanup_proc(self) -> None:
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def close(self) -> None:
        """Stop the registry and remove its storage, log and credentials."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        auth = " auth" if self.htpasswd else ""
        state = "running" if self.running else "stopped"
        return f"<PrivateRegistry {self.address}{auth} {state} {self.dir}>"
