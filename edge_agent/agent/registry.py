"""Asks the image registry for a tag's digest with one manifest HEAD request.

docker-py's ``get_registry_data`` costs two manifest requests and a config-blob GET;
a single ``HEAD /v2/<name>/manifests/<ref>`` with the index and manifest Accept
headers answers "what digest does this tag point at" in a few hundred bytes.
Authentication follows the registry's challenge (Bearer token or Basic) with
credentials from the standard Docker config (DOCKER_CONFIG).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from docker import auth as docker_auth
from docker.errors import DockerException

from edge_agent.agent.errors import ManifestUnknown, RegistryError

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
TIMEOUT_S = 10.0


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
    scheme = "http" if _is_loopback(host) else "https"
    return RepositoryLocation(registry=index, base_url=f"{scheme}://{host}", name=name)


def _is_loopback(host: str) -> bool:
    """Docker talks plain HTTP to registries on 127.0.0.0/8 by default; so do we."""
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class RegistryClient:
    """Resolves tags to digests for one repository, caching bearer tokens."""

    def __init__(self, repository: str, auth_configs: Mapping[str, Any] | None = None) -> None:
        self.location = locate(repository)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "edge-agent"
        self._credentials = _credentials_for(self.location.registry, auth_configs)
        # The Authorization header earned by the last challenge, and until when it is good.
        self._auth_header: str | None = None
        self._auth_expires = 0.0

    def close(self) -> None:
        self._session.close()

    def digest(self, reference: str) -> str:
        """Return the registry digest of ``reference`` (a tag or ``sha256:`` digest).

        Raises ManifestUnknown when the registry does not have it, RegistryError
        when the question could not be answered.
        """
        url = f"{self.location.base_url}/v2/{self.location.name}/manifests/{reference}"
        response = self._head(url)
        if response.status_code == 401:
            self._authenticate(response)
            response = self._head(url)
        if response.status_code == 404:
            raise ManifestUnknown(f"manifest unknown: {self.location.name}:{reference}")
        if response.status_code == 401:
            raise RegistryError(f"registry refused our credentials for {self.location.name}")
        if response.status_code != 200:
            raise RegistryError(
                f"registry answered HTTP {response.status_code} "
                f"for {self.location.name}:{reference}"
            )
        digest = response.headers.get("Docker-Content-Digest")
        if not digest or not digest.startswith("sha256:"):
            raise RegistryError("registry did not return a Docker-Content-Digest header")
        return digest

    def _head(self, url: str) -> requests.Response:
        headers = {"Accept": MANIFEST_ACCEPT}
        if self._auth_header and time.monotonic() < self._auth_expires:
            headers["Authorization"] = self._auth_header
        try:
            return self._session.head(url, headers=headers, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise RegistryError(f"registry unreachable: {_short(exc)}") from None

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
        query = {"service": params.get("service", "")}
        query["scope"] = params.get("scope") or f"repository:{self.location.name}:pull"
        auth = self._credentials if self._credentials else None
        try:
            token_response = self._session.get(
                params["realm"], params=query, auth=auth, timeout=TIMEOUT_S
            )
        except requests.RequestException as exc:
            raise RegistryError(f"token service unreachable: {_short(exc)}") from None
        if token_response.status_code != 200:
            raise RegistryError(f"token service answered HTTP {token_response.status_code}")
        try:
            body = token_response.json()
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in", 60))
        except (ValueError, AttributeError, TypeError):
            raise RegistryError("token service sent an unreadable answer") from None
        if not isinstance(token, str):
            raise RegistryError("token service sent no token")
        self._auth_header = f"Bearer {token}"
        # Refresh a little early so a check never sends an expired token.
        self._auth_expires = time.monotonic() + max(expires_in - 10, 1)


def _credentials_for(
    registry: str, auth_configs: Mapping[str, Any] | None
) -> tuple[str, str] | None:
    """Username and password for ``registry`` from the Docker config, if any."""
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


def _short(exc: Exception) -> str:
    """First line of a requests error, without the urllib3 object soup."""
    text = str(exc)
    match = re.search(r"\[Errno [^\]]*\] [^')]*", text)
    if match:
        return match.group(0)
    return text.splitlines()[0][:160] if text else type(exc).__name__
