"""Asks the image registry for a tag's digest with one manifest HEAD request.

docker-py's ``get_registry_data`` costs two manifest requests and a config-blob GET;
a single ``HEAD /v2/<name>/manifests/<ref>`` with the index and manifest Accept
headers answers "what digest does this tag point at" in a few hundred bytes.
Authentication follows the registry's challenge (Bearer token or Basic) with
credentials from the standard Docker config (DOCKER_CONFIG); a token is asked for the
one thing the agent does, pulling this repository, whatever scope the challenge names.

One question (HEAD, and the token request and second HEAD a challenge brings) has a total
deadline, ``DEADLINE_S``, on top of the per-read socket timeout that a registry dripping
a byte every few seconds would never trip. When it passes, or the agent is stopping,
the question is given up and its connections are shut down, so nothing lingers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import re
import socket
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import requests
import urllib3
from docker import auth as docker_auth
from docker.errors import DockerException
from docker.utils import config as docker_config
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from edge_agent.agent import deadline
from edge_agent.agent.errors import ManifestUnknown, RegistryError
from edge_agent.agent.signatures import (
    MAX_PAYLOAD_BYTES,
    BadSignature,
    SignedPayload,
    signature_layers,
    signature_tag,
)
from edge_agent.agent.space import (
    ImageLayers,
    Platform,
    UnreadableManifest,
    is_index,
    pick_manifest,
    read_diff_ids,
    read_manifest,
)
from edge_agent.files import StorageError, read_regular_file
from edge_agent.protocol import safejson
from edge_agent.registry_probe import is_loopback

log = logging.getLogger(__name__)

MANIFEST_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
DOCKER_HUB_INDEX = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
# Total time for one digest question, whatever the registry does byte by byte.
DEADLINE_S = 30.0
# A token answer is a few kilobytes of JSON; more is refused unread.
MAX_TOKEN_ANSWER_BYTES = 64 * 1024
MAX_DOCKER_CONFIG_BYTES = 1 << 20
# A manifest (distribution refuses more than 4 MiB) and an image config, read whole
# before a pull to estimate its size; more is refused unread.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20


class _NotFound(RegistryError):
    """HTTP 404 for a manifest or blob fetched by GET."""


@dataclass(frozen=True)
class RepositoryLocation:
    """Where a repository lives: the registry host, API base URL and repository path."""

    registry: str
    base_url: str
    name: str


def locate(repository: str) -> RepositoryLocation:
    """Map ``host[:port]/path`` (or a Docker Hub short name) to its registry API."""
    index, name = docker_auth.resolve_repository_name(repository)
    if index == DOCKER_HUB_INDEX:
        host = DOCKER_HUB_API
        if "/" not in name:
            name = f"library/{name}"
    else:
        host = index
    scheme = "http" if is_loopback(host) else "https"
    return RepositoryLocation(registry=index, base_url=f"{scheme}://{host}", name=name)


class _ShutdownAdapter(HTTPAdapter):
    """An HTTPAdapter that can shut down its connections' sockets from another thread,
    waking a thread blocked reading one (closing alone would not)."""

    def __init__(self) -> None:
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes()

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:  # SOCKS managers have pools of their own
            manager.pool_classes_by_scheme = self._pool_classes()
        return manager

    def _pool_classes(self) -> dict[str, type[HTTPConnectionPool]]:
        connections = self._connections

        class Pool(HTTPConnectionPool):
            def _new_conn(self) -> Any:
                conn = super()._new_conn()
                connections.add(conn)
                return conn

        class SecurePool(HTTPSConnectionPool):
            def _new_conn(self) -> Any:
                conn = super()._new_conn()
                connections.add(conn)
                return conn

        return {"http": Pool, "https": SecurePool}

    def shut_down(self) -> None:
        for conn in list(self._connections):
            sock = getattr(conn, "sock", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


class RegistryClient:
    """Resolves tags to digests for one repository, caching bearer tokens."""

    def __init__(
        self, repository: str, auth_configs: Mapping[str, Any] | None = None, *,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self.location = locate(repository)
        self.deadline_s = deadline_s
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "edge-agent"
        self._adapter = _ShutdownAdapter()
        self._session.mount("http://", self._adapter)
        self._session.mount("https://", self._adapter)
        self._credentials = _credentials_for(self.location.registry, auth_configs)
        # The Authorization header earned by the last challenge, and until when it is good.
        self._auth_header: str | None = None
        self._auth_expires = 0.0

    def close(self) -> None:
        self._adapter.shut_down()
        self._session.close()

    def digest(self, reference: str) -> str:
        """Return the registry digest of ``reference`` (a tag or ``sha256:`` digest).

        Raises ManifestUnknown when the registry does not have it, RegistryError
        when the question could not be answered within ``deadline_s``.
        """
        what = f"registry check of {self.location.name}:{reference}"
        try:
            # A question changes nothing: on a stop it is dropped at once.
            return deadline.call(lambda: self._digest(reference), timeout_s=self.deadline_s,
                                 what=what, cancel=self._adapter.shut_down,
                                 should_abort=deadline.stopping)
        except deadline.GaveUp as exc:
            if exc.stopping:
                raise RegistryError(f"{what} given up: the agent is stopping") from None
            raise RegistryError(f"registry did not answer within {self.deadline_s:g} s "
                                f"(slow or stalled) for {self.location.name}:{reference}"
                                ) from None

    def _digest(self, reference: str) -> str:
        url = f"{self.location.base_url}/v2/{self.location.name}/manifests/{reference}"
        response = self._head(url)
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            self._authenticate(response)
            response = self._head(url)
        if response.status_code == HTTPStatus.NOT_FOUND:
            raise ManifestUnknown(f"manifest unknown: {self.location.name}:{reference}")
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            raise RegistryError(f"registry refused our credentials for {self.location.name}")
        if response.status_code != HTTPStatus.OK:
            raise RegistryError(
                f"registry answered HTTP {response.status_code} "
                f"for {self.location.name}:{reference}"
            )
        digest = response.headers.get("Docker-Content-Digest")
        if not digest or not digest.startswith("sha256:"):
            raise RegistryError("registry did not return a Docker-Content-Digest header")
        return digest

    def image_layers(self, digest: str, platform: Platform) -> ImageLayers:
        """What the image at ``digest`` is made of (for ``platform`` when it is a
        multi-arch index): its manifest's compressed layer sizes and its config's diff ids.
        Asked only before a pull; RegistryError when the registry cannot say."""
        what = f"size estimate of {self.location.name}@{digest}"
        try:
            return deadline.call(lambda: self._image_layers(digest, platform),
                                 timeout_s=self.deadline_s, what=what,
                                 cancel=self._adapter.shut_down,
                                 should_abort=deadline.stopping)
        except deadline.GaveUp as exc:
            if exc.stopping:
                raise RegistryError(f"{what} given up: the agent is stopping") from None
            raise RegistryError(f"registry did not answer within {self.deadline_s:g} s "
                                f"({what})") from None
        except UnreadableManifest as exc:
            raise RegistryError(f"{what}: {exc}") from None

    def _image_layers(self, digest: str, platform: Platform) -> ImageLayers:
        base = f"{self.location.base_url}/v2/{self.location.name}"
        manifest = self._get_json(f"{base}/manifests/{digest}", MAX_MANIFEST_BYTES)
        if is_index(manifest):
            chosen = pick_manifest(manifest, platform)
            manifest = self._get_json(f"{base}/manifests/{chosen}", MAX_MANIFEST_BYTES)
        config_digest, sizes = read_manifest(manifest)
        config = self._get_json(f"{base}/blobs/{config_digest}", MAX_CONFIG_BYTES)
        return ImageLayers(sizes, read_diff_ids(config))

    def signatures(self, digest: str) -> list[SignedPayload]:
        """The sigstore signatures the registry holds for the manifest ``digest`` (cosign's
        ``sha256-<hex>.sig`` tag): each payload with its signature, the payloads checked
        against their blob digests. Asked only before an update. ManifestUnknown when the
        image is not signed at all, BadSignature when the signature manifest is not one,
        RegistryError when the registry cannot say."""
        what = f"signatures of {self.location.name}@{digest}"
        try:
            return deadline.call(lambda: self._signatures(digest), timeout_s=self.deadline_s,
                                 what=what, cancel=self._adapter.shut_down,
                                 should_abort=deadline.stopping)
        except deadline.GaveUp as exc:
            if exc.stopping:
                raise RegistryError(f"{what} given up: the agent is stopping") from None
            raise RegistryError(f"registry did not answer within {self.deadline_s:g} s "
                                f"({what})") from None

    def _signatures(self, digest: str) -> list[SignedPayload]:
        base = f"{self.location.base_url}/v2/{self.location.name}"
        tag = signature_tag(digest)
        try:
            manifest = self._get_json(f"{base}/manifests/{tag}", MAX_MANIFEST_BYTES)
        except _NotFound:
            raise ManifestUnknown(f"no signature in the registry ({self.location.name}:{tag} "
                                  "does not exist)") from None
        found = []
        for layer in signature_layers(manifest):
            status, body = self._get(f"{base}/blobs/{layer.payload_digest}", MAX_PAYLOAD_BYTES)
            if status == HTTPStatus.UNAUTHORIZED:
                status, body = self._get(f"{base}/blobs/{layer.payload_digest}",
                                         MAX_PAYLOAD_BYTES, answer_challenge=False)
            if status == HTTPStatus.NOT_FOUND:
                continue  # a dangling layer proves nothing; another may
            if status != HTTPStatus.OK:
                raise RegistryError(f"registry answered HTTP {status} for the signature "
                                    f"payload {layer.payload_digest}")
            if len(body) > MAX_PAYLOAD_BYTES:
                raise BadSignature(f"a signature payload is larger than {MAX_PAYLOAD_BYTES} "
                                   "bytes")
            if f"sha256:{hashlib.sha256(body).hexdigest()}" != layer.payload_digest:
                raise BadSignature(f"the signature payload {layer.payload_digest} does not "
                                   "match its digest")
            found.append(SignedPayload(body, layer.signature))
        return found

    def _get_json(self, url: str, max_bytes: int) -> dict[str, Any]:
        """GET a manifest or blob (answering an auth challenge), bounded, as a JSON object."""
        status, body = self._get(url, max_bytes)
        if status == HTTPStatus.UNAUTHORIZED:
            status, body = self._get(url, max_bytes, answer_challenge=False)
        if status == HTTPStatus.NOT_FOUND:
            raise _NotFound(f"registry answered HTTP {status} for {url}")
        if status != HTTPStatus.OK:
            raise RegistryError(f"registry answered HTTP {status} for {url}")
        try:
            return safejson.loads_object(body, max_bytes=max_bytes)
        except safejson.UntrustedJson as exc:
            raise RegistryError(f"registry sent an unreadable document for {url}: {exc}"
                                ) from None

    def _get(self, url: str, max_bytes: int, *, answer_challenge: bool = True,
             ) -> tuple[int, bytes]:
        headers = {"Accept": MANIFEST_ACCEPT}
        if self._auth_header and time.monotonic() < self._auth_expires:
            headers["Authorization"] = self._auth_header
        try:
            # blobs may redirect to storage elsewhere; requests drops Authorization there
            with self._session.get(url, headers=headers, stream=True,
                                   timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
                if response.status_code == HTTPStatus.UNAUTHORIZED and answer_challenge:
                    self._authenticate(response)
                    return response.status_code, b""
                body = response.raw.read(max_bytes + 1, decode_content=True)
                return response.status_code, body
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise RegistryError(f"registry unreachable at {self.location.base_url}/v2/: "
                                f"{_short(exc)}") from None

    def _head(self, url: str) -> requests.Response:
        headers = {"Accept": MANIFEST_ACCEPT}
        if self._auth_header and time.monotonic() < self._auth_expires:
            headers["Authorization"] = self._auth_header
        try:
            return self._session.head(url, headers=headers,
                                      timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except requests.RequestException as exc:
            raise RegistryError(f"registry unreachable at {self.location.base_url}/v2/: "
                                f"{_short(exc)}{self._unreachable_hint(exc)}") from None

    def follow_daemon(self, insecure: bool) -> None:
        """Speak plain HTTP to the registry when the Docker daemon does (its
        ``insecure-registries``): the check must reach what the pull will reach."""
        scheme = "http" if insecure or is_loopback(self.location.registry) else "https"
        host = self.location.base_url.split("://", 1)[1]
        self.location = replace(self.location, base_url=f"{scheme}://{host}")

    def _unreachable_hint(self, exc: Exception) -> str:
        """What an operator can do, for the two failures a first deployment meets."""
        if self.location.base_url.startswith("https://") and _is_tls_error(exc):
            return unreachable_hint("tls")
        if is_loopback(self.location.registry) and in_container():
            return unreachable_hint("loopback")
        return ""

    def _authenticate(self, response: requests.Response) -> None:
        """Answer a 401 challenge: fetch a bearer token, or switch to Basic auth."""
        challenge = response.headers.get("WWW-Authenticate", "")
        scheme, _, params_text = challenge.partition(" ")
        params = dict(CHALLENGE_PARAM_RE.findall(params_text))
        if scheme.lower() == "basic":
            if not self._credentials:
                raise RegistryError(f"registry needs credentials for {self.location.registry}")
            user, password = self._credentials
            basic = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._auth_header = f"Basic {basic}"
            self._auth_expires = float("inf")
            return
        if scheme.lower() != "bearer" or "realm" not in params:
            raise RegistryError(f"registry sent an unsupported auth challenge: {challenge[:80]}")
        # Pull access to this repository is all the agent needs, whatever the challenge
        # names (some registries ask for "pull,push"): a read-only robot account may be
        # refused more, and a token should not carry rights the agent never uses.
        query = {"service": params.get("service", ""),
                 "scope": f"repository:{self.location.name}:pull"}
        auth = self._credentials if self._credentials else None
        try:
            with self._session.get(params["realm"], params=query, auth=auth, stream=True,
                                   timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
                                   ) as token_response:
                status = token_response.status_code
                answer = token_response.raw.read(MAX_TOKEN_ANSWER_BYTES + 1,
                                                  decode_content=True)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise RegistryError(f"token service unreachable: {_short(exc)}") from None
        if status != HTTPStatus.OK:
            raise RegistryError(f"token service answered HTTP {status}")
        try:
            body = safejson.loads_object(answer, max_bytes=MAX_TOKEN_ANSWER_BYTES)
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in", 60))
        except (ValueError, TypeError):
            raise RegistryError("token service sent an unreadable answer") from None
        if not isinstance(token, str):
            raise RegistryError("token service sent no token")
        if not math.isfinite(expires_in):
            expires_in = 60.0
        self._auth_header = f"Bearer {token}"
        # Refresh a little early so a check never sends an expired token.
        self._auth_expires = time.monotonic() + min(max(expires_in - 10, 1), 24 * 3600)


def _credentials_for(  # noqa: PLR0911 - each way to find no credentials
    registry: str, auth_configs: Mapping[str, Any] | None
) -> tuple[str, str] | None:
    """Username and password for ``registry`` from the Docker config, if any."""
    if auth_configs is None:
        # Read the way every file the agent reads is (DOCKER_CONFIG may be in DATA_DIR):
        # a link, FIFO or junk there is refused, not followed, blocked on or guessed at.
        path = docker_config.find_config_file()
        if path is None:
            return None
        try:
            data = read_regular_file(Path(str(path)), max_bytes=MAX_DOCKER_CONFIG_BYTES)
        except StorageError as exc:  # names the path and the reason
            log.warning("cannot read registry credentials: %s", exc)
            return None
        try:
            auth_configs = safejson.loads_object(data or b"{}",
                                                 max_bytes=MAX_DOCKER_CONFIG_BYTES)
        except safejson.UntrustedJson as exc:
            log.warning("cannot read registry credentials: %s: %s", path, exc)
            return None
    try:
        config = docker_auth.load_config(config_dict=dict(auth_configs) if auth_configs else None)
        entry = config.resolve_authconfig(registry)
    except DockerException as exc:
        log.warning("cannot read registry credentials: %s", exc)
        return None
    if not entry:
        return None
    user = entry.get("username") or entry.get("Username")
    password = entry.get("password") or entry.get("Password")
    if user and password:
        return str(user), str(password)
    return None


def unreachable_hint(kind: str) -> str:
    """The advice appended to ``registry unreachable``."""
    if kind == "tls":
        return ("; the registry does not speak HTTPS here: if it is a plain-HTTP registry, "
                "list it in the Docker daemon's insecure-registries (the agent follows the "
                "daemon)")
    return ("; the agent runs in a container, where 127.0.0.1 is the container itself, not "
            "the host: for a registry on the host, run the agent with --network host, or name "
            "the registry by the host's address")


def in_container() -> bool:
    """True inside a Docker (or Podman) container."""
    return Path("/.dockerenv").exists() or Path("/run/.containerenv").exists()


def _is_tls_error(exc: Exception) -> bool:
    return isinstance(exc, requests.exceptions.SSLError) or "SSL" in str(exc)


def _short(exc: Exception) -> str:
    """First line of a requests error, without the urllib3 object soup."""
    text = str(exc)
    match = re.search(r"\[Errno [^\]]*\] [^'\")]*", text)
    if match:
        return match.group(0)
    # The OpenSSL reason is the clue (WRONG_VERSION_NUMBER: plain HTTP on the other side);
    # it sits at the end of a long line that a cut would lose.
    match = re.search(r"\[SSL: [A-Z_]+\][^')(]*", text)
    if match:
        return f"TLS failed: {match.group(0).strip()}"
    return text.splitlines()[0][:160] if text else type(exc).__name__
