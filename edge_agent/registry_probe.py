"""Does a tag exist? The operator tools' question to the registry, before they publish.

The bridge and edge-ctl ask it when an operator sets a desired tag, so that a mistyped
tag is caught before a device falls back to ``FALLBACK_TAG``. Standard library only
(operator tools never load docker-py; tests/test_layers.py): one
``HEAD /v2/<name>/manifests/<tag>`` with the index and manifest Accept headers, after a
401 the registry's challenge (a Bearer token for pull, or Basic) with the credentials of
``REGISTRY_USERNAME``/``REGISTRY_PASSWORD_FILE`` if set. Plain HTTP for loopback
registries and those in ``REGISTRY_INSECURE`` (as the Docker daemon's
insecure-registries), HTTPS with verification otherwise.

Strictly bounded: one probe has a total deadline (``REGISTRY_CHECK_TIMEOUT``, enforced by
shutting the socket down, so a registry dripping a byte at a time cannot stretch it),
response heads are read by ``http.client`` (at most 100 header lines of 64 KiB) and a
token answer is read up to 64 KiB. Every failure becomes an ``UNKNOWN`` answer with a
one-line reason here, once: the caller warns and goes on.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from edge_agent.protocol import safejson
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import parse_bool, parse_number

MANIFEST_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
DOCKER_HUB_INDEX = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
MAX_TOKEN_ANSWER_BYTES = 64 * 1024
MAX_PASSWORD_BYTES = 4096
MAX_REASON_CHARS = 200
JOIN_GRACE_S = 0.2
NEEDS_CREDENTIALS = ("the registry needs credentials (REGISTRY_USERNAME, "
                     "REGISTRY_PASSWORD_FILE, REGISTRY_HOST)")
MAX_REPOSITORY_CHARS = 256
USER_AGENT = "edge-agent-operator"
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
# Docker's reference grammar for a repository (as edge_agent.agent.config checks
# CONTAINER_IMAGE): a device's state names its repository, and nothing else reaches a URL.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(
    rf"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$"
)
_HOST_RE = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")

#: (variable, default as shown, meaning), for the settings tables of the bridge and edge-ctl
PROBE_SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("REGISTRY_CHECK", "true", "before publishing a desired tag, ask the devices' registry "
     "whether it exists (refused unless forced when it does not; a warning when the "
     "registry cannot be asked); false turns it off"),
    ("REGISTRY_CHECK_TIMEOUT", f"{DEFAULT_TIMEOUT_S:g}", "seconds one registry question may take"),
    ("REGISTRY_INSECURE", "(none)", "comma-separated registries (host:port) spoken to over "
     "plain HTTP, as the devices' Docker daemon does (loopback always is)"),
    ("REGISTRY_USERNAME", "(none)", "user for the registry (pull is enough)"),
    ("REGISTRY_PASSWORD_FILE", "(none)", "file holding that user's password"),
    ("REGISTRY_HOST", "(none)", "the registry (host:port as in the image name) those "
     "credentials are for; they are sent to no other"),
)


class Verdict(enum.StrEnum):
    """What the registry said about a tag."""

    EXISTS = "exists"
    MISSING = "missing"
    UNKNOWN = "unknown"  # could not be asked: ``TagCheck.reason`` says why


@dataclass(frozen=True)
class ProbeSettings:
    """How the operator tools ask the registry. ``password`` is never shown."""

    enabled: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S
    insecure: frozenset[str] = frozenset()
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    credentials_for: str | None = None  # the one registry the credentials are sent to


@dataclass(frozen=True)
class TagCheck:
    """The answer for one repository and tag."""

    repository: str
    tag: str
    verdict: Verdict
    reason: str = ""


def load_probe_settings(environ: Mapping[str, str]) -> ProbeSettings:
    """The REGISTRY_* settings; raises ConfigError naming the variable."""
    enabled = True if not environ.get("REGISTRY_CHECK", "").strip() else parse_bool(
        environ, "REGISTRY_CHECK")
    timeout_s = parse_number(environ, "REGISTRY_CHECK_TIMEOUT", DEFAULT_TIMEOUT_S,
                             minimum=0.1, maximum=MAX_TIMEOUT_S)
    insecure = frozenset(h.strip().lower() for h in environ.get("REGISTRY_INSECURE", "")
                         .split(",") if h.strip())
    for host in insecure:
        if not _HOST_RE.fullmatch(host):
            raise ConfigError(f"REGISTRY_INSECURE: {host[:80]!r} is not a host[:port]")
    username = environ.get("REGISTRY_USERNAME", "").strip() or None
    path = environ.get("REGISTRY_PASSWORD_FILE", "").strip()
    password = None
    if path:
        try:
            with Path(path).open("rb") as handle:
                data = handle.read(MAX_PASSWORD_BYTES + 1)
            password = data.decode("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"REGISTRY_PASSWORD_FILE: cannot read {path}: "
                              f"{exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"REGISTRY_PASSWORD_FILE: {path} is not UTF-8 text") from None
        if len(data) > MAX_PASSWORD_BYTES or not password:
            raise ConfigError(f"REGISTRY_PASSWORD_FILE: {path} must hold a password of "
                              f"1-{MAX_PASSWORD_BYTES} bytes")
    creds_host = environ.get("REGISTRY_HOST", "").strip().lower() or None
    if (username is None) != (password is None) or (username is None) != (creds_host is None):
        # a device names its own repository: credentials without a registry of their own
        # would go to whichever registry a device names
        raise ConfigError("REGISTRY_USERNAME, REGISTRY_PASSWORD_FILE and REGISTRY_HOST go "
                          "together")
    if creds_host is not None and not _HOST_RE.fullmatch(creds_host):
        raise ConfigError(f"REGISTRY_HOST: {creds_host[:80]!r} is not a host[:port]")
    return ProbeSettings(enabled, timeout_s, insecure, username, password, creds_host)


@dataclass(frozen=True)
class Location:
    """Where a repository's manifests are: ``base_url`` + ``/v2/<name>/manifests/``."""

    registry: str  # as in the image reference (docker.io for Docker Hub)
    base_url: str
    name: str


def locate(repository: str, insecure: frozenset[str] = frozenset()) -> Location:
    """Map ``host[:port]/path`` (or a Docker Hub name) to its registry API, as Docker
    does: the first component is a registry when it has a dot or a port or is
    ``localhost``. A tag or digest on the reference is dropped."""
    reference = repository.split("@", 1)[0]
    if reference.rfind(":") > reference.rfind("/"):
        reference = reference[:reference.rfind(":")]
    first, slash, rest = reference.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, name = first.lower(), rest
    else:
        registry, name = DOCKER_HUB_INDEX, reference
    host = registry
    if registry == DOCKER_HUB_INDEX:
        host = DOCKER_HUB_API
        if "/" not in name:
            name = f"library/{name}"
    scheme = "http" if is_loopback(host) or registry in insecure else "https"
    return Location(registry, f"{scheme}://{host}", name)


def is_loopback(host: str) -> bool:
    """Docker speaks plain HTTP to registries on loopback by default; so do we."""
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class _Unknown(Exception):
    """The registry could not be asked (the reason, one line)."""


class _Probe:
    """One question, its connections and its deadline."""

    def __init__(self, location: Location, settings: ProbeSettings) -> None:
        self.location = location
        self.settings = settings
        self.deadline = time.monotonic() + settings.timeout_s
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._expired = False

    def expire(self) -> None:
        """Shut every socket down: a thread blocked reading one wakes up at once."""
        with self._lock:
            self._expired = True
            for conn in self._connections:
                sock = conn.sock
                if isinstance(sock, socket.socket):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self._expired:
            raise _Unknown(f"no answer within {self.settings.timeout_s:g} s")
        return left

    def request(self, url: str, method: str, headers: dict[str, str],
                max_body: int = 0) -> tuple[int, http.client.HTTPMessage, bytes]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Unknown(f"unusable URL {url[:100]!r}")
        timeout = self.remaining()
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        try:
            conn.connect()
            with self._lock:  # expire() shuts down only the sockets it knows of
                self._connections.append(conn)
                if self._expired:
                    raise TimeoutError
            conn.request(method, target, headers={"User-Agent": USER_AGENT, **headers})
            response = conn.getresponse()
            body = response.read(max_body + 1) if max_body else b""
            # expire() ends a read by shutting the socket: what was read up to then is a
            # cut-off answer (http.client takes the end of input for the end of the head)
            self.remaining()
            return response.status, response.headers, body
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.remaining()  # the deadline, if that is what ended it
            raise _Unknown(_reason(exc)) from None
        finally:
            conn.close()


def probe(repository: str, tag: str, settings: ProbeSettings) -> TagCheck:
    """Ask the registry whether ``repository:tag`` exists, within ``settings.timeout_s``
    whatever the registry does; never raises for the registry's sake (an ``UNKNOWN``
    answer says why it could not be asked)."""
    if len(repository) > MAX_REPOSITORY_CHARS or not REPOSITORY_RE.fullmatch(repository):
        return TagCheck(repository[:MAX_REPOSITORY_CHARS], tag, Verdict.UNKNOWN,
                        "not a repository name")
    location = locate(repository, settings.insecure)
    question = _Probe(location, settings)
    outcome: list[Verdict | str] = []

    def ask() -> None:
        try:
            outcome.append(_ask(question, tag))
        except _Unknown as exc:
            outcome.append(str(exc))

    # The question runs in a thread of its own, so that no part of it (a TLS handshake
    # dripping in, a DNS lookup) can hold the caller past the deadline.
    worker = threading.Thread(target=ask, name="registry-probe", daemon=True)
    worker.start()
    worker.join(settings.timeout_s + JOIN_GRACE_S)
    # decided once, here: whatever the worker appends after this came past the deadline
    finished = bool(outcome)
    if not finished:
        question.expire()
    answer = outcome[0] if finished else f"no answer within {settings.timeout_s:g} s"
    if isinstance(answer, Verdict):
        return TagCheck(repository, tag, answer)
    reason = f"{location.base_url}/v2/{location.name}: {answer}"
    return TagCheck(repository, tag, Verdict.UNKNOWN, reason)


def _ask(question: _Probe, tag: str) -> Verdict:
    location = question.location
    url = f"{location.base_url}/v2/{location.name}/manifests/{tag}"
    headers = {"Accept": MANIFEST_ACCEPT}
    status, answer, _ = question.request(url, "HEAD", headers)
    if status == HTTPStatus.UNAUTHORIZED:
        headers["Authorization"] = _authorization(question, answer.get("WWW-Authenticate", ""))
        status, answer, _ = question.request(url, "HEAD", headers)
    if status == HTTPStatus.NOT_FOUND:
        return Verdict.MISSING
    if status == HTTPStatus.OK:
        return Verdict.EXISTS
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        if _sends_credentials(question):
            raise _Unknown(f"HTTP {status}: the registry refused REGISTRY_USERNAME")
        raise _Unknown(f"HTTP {status}: {NEEDS_CREDENTIALS}")
    raise _Unknown(f"the registry answered HTTP {status}")


def _authorization(question: _Probe, challenge: str) -> str:
    """The Authorization header that answers a 401 challenge."""
    settings = question.settings
    scheme, _, params_text = challenge[:2048].partition(" ")
    params = dict(_CHALLENGE_PARAM_RE.findall(params_text))
    basic = None
    if _sends_credentials(question) and settings.username and settings.password:
        basic = base64.b64encode(f"{settings.username}:{settings.password}".encode()).decode()
    if scheme.lower() == "basic":
        if basic is None:
            raise _Unknown(NEEDS_CREDENTIALS)
        return f"Basic {basic}"
    if scheme.lower() != "bearer" or "realm" not in params:
        raise _Unknown(f"unsupported auth challenge {challenge[:60]!r}")
    # pull on this repository is all the question needs, whatever the challenge names
    query = urllib.parse.urlencode({"service": params.get("service", ""),
                                    "scope": f"repository:{question.location.name}:pull"})
    realm = params["realm"]
    headers = {"Authorization": f"Basic {basic}"} if basic else {}
    status, _, body = question.request(f"{realm}{'&' if '?' in realm else '?'}{query}", "GET",
                                       headers, max_body=MAX_TOKEN_ANSWER_BYTES)
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        raise _Unknown(f"the token service answered HTTP {status}: {NEEDS_CREDENTIALS}")
    if status != HTTPStatus.OK:
        raise _Unknown(f"the token service answered HTTP {status}")
    try:
        document = safejson.loads_object(body, max_bytes=MAX_TOKEN_ANSWER_BYTES, max_depth=4)
    except safejson.UntrustedJson as exc:
        raise _Unknown(f"the token service sent an unreadable answer ({exc})") from None
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token.isascii() or not token.isprintable():
        raise _Unknown("the token service sent no usable token")
    return f"Bearer {token}"


def _sends_credentials(question: _Probe) -> bool:
    """Credentials go to the registry they are for (REGISTRY_HOST), never elsewhere."""
    settings = question.settings
    return settings.username is not None and (
        question.location.registry == settings.credentials_for)


def _reason(exc: Exception) -> str:
    """One line for a connection failure, with the clue when TLS met plain HTTP."""
    if isinstance(exc, ssl.SSLError):
        hint = ""
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
            hint = " (a plain-HTTP registry? list it in REGISTRY_INSECURE)"
        return f"TLS failed: {getattr(exc, 'reason', None) or exc}{hint}"[:MAX_REASON_CHARS]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return f"unreachable: {exc.strerror}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:MAX_REASON_CHARS]


# -- before a desired tag is published ------------------------------------------------
MAX_REPOSITORIES = 4  # asked per desired tag: a scope's devices run one repository, usually


@dataclass(frozen=True)
class Precheck:
    """What the registry said about a desired tag for the repositories of its scope."""

    tag: str
    checks: tuple[TagCheck, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def missing(self) -> tuple[TagCheck, ...]:
        return tuple(c for c in self.checks if c.verdict is Verdict.MISSING)

    def refusal(self, force_hint: str) -> str:
        """Why the tag is refused (when ``missing``); ``force_hint`` says how to insist."""
        where = ", ".join(c.repository for c in self.missing)
        return (f"tag {self.tag} does not exist in {where} (the registry has no manifest "
                f"for it): a device would run its FALLBACK_TAG instead. Check the tag, or "
                f"{force_hint} to set it anyway (e.g. an image about to be pushed)")


def precheck(tag: str, repositories: Sequence[str], settings: ProbeSettings, *,
             who: str) -> Precheck:
    """Ask the registry about ``tag`` in each of ``repositories`` (those of the devices
    ``who`` names), each question within the timeout. Questions that cannot be answered,
    and a scope without a known repository, become warnings."""
    if not settings.enabled:
        return Precheck(tag)
    distinct = sorted(set(repositories))
    if not distinct:
        return Precheck(tag, warnings=(
            f"the registry was not asked whether tag {tag} exists: {who} reported no "
            "image repository yet",))
    warnings = []
    if len(distinct) > MAX_REPOSITORIES:
        warnings.append(f"{who} run {len(distinct)} repositories; the registry was asked "
                        f"about the first {MAX_REPOSITORIES} only")
    checks = tuple(probe(repository, tag, settings) for repository in distinct[:MAX_REPOSITORIES])
    warnings += [f"could not ask the registry whether {c.repository}:{tag} exists "
                 f"({c.reason}); set anyway" for c in checks if c.verdict is Verdict.UNKNOWN]
    return Precheck(tag, checks, tuple(warnings))
