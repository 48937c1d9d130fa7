"""A registry with Docker's token authentication, for tests: a front on 127.0.0.1 with
its own token service, in front of a real registry (the shared one by default).

``TokenAuthRegistry`` answers every request without a valid bearer token with a 401
challenge ``Bearer realm="http://<front>/token",service="edge-test",scope=...``; the
challenge names ``challenge_actions`` (default ``pull,push``, as some registries do for a
plain manifest request). Its token service checks the basic credentials, records what
each client asked for (``token_requests``) and grants the requested actions it allows
(``allowed_actions``), as the token specification says. Requests with a token that
grants ``pull`` on the repository are passed to the real registry, so ``docker pull``
through the front works too.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support import DEFAULT_REGISTRY

SERVICE = "edge-test"
_NAME_RE = re.compile(r"^/v2/(?P<name>.+?)/(manifests|blobs|tags)/")
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-authenticate", "proxy-authorization"})


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token service: who asked (User-Agent) and for what scope."""

    scope: str
    service: str
    user: str | None
    user_agent: str


class TokenAuthRegistry:
    """The front; ``close()`` stops it. Repositories are the upstream's, seen here."""

    def __init__(
        self, *, username: str, password: str, upstream: str = DEFAULT_REGISTRY,
        challenge_actions: str = "pull,push", allowed_actions: frozenset[str] = frozenset(
            {"pull", "push"}),
    ) -> None:
        self.username = username
        self.password = password
        self.upstream = upstream
        self.challenge_actions = challenge_actions
        self.allowed_actions = allowed_actions
        self.token_requests: list[TokenRequest] = []
        # When set, the token service answers 200 with these bytes instead (a broken or
        # hostile token service).
        self.token_answer: bytes | None = None
        self._grants: dict[str, set[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="token-registry-"))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="token-registry")
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def repo(self, upstream_repo: str) -> str:
        """``127.0.0.1:5000/t1/app`` as seen through the front."""
        _, path = upstream_repo.split("/", 1)
        return f"{self.address}/{path}"

    def docker_config_dir(self) -> Path:
        """A DOCKER_CONFIG directory holding this front's credentials under ``auths``."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        (self._dir / "config.json").write_text(json.dumps({"auths": {self.address: {
            "auth": token}}}))
        return self._dir

    def requests_from(self, user_agent_prefix: str) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.token_requests if r.user_agent.startswith(user_agent_prefix)]

    # -- the token service --------------------------------------------------------------
    def issue(self, query: dict[str, str], authorization: str | None, user_agent: str
              ) -> tuple[int, dict[str, object]]:
        user = _basic_user(authorization, self.username, self.password)
        scope = query.get("scope", "")
        with self._lock:
            self.token_requests.append(TokenRequest(scope, query.get("service", ""),
                                                    user, user_agent))
        if authorization and user is None:
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        granted: set[tuple[str, str]] = set()
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and user is not None:
                granted |= {(name, a) for a in actions.split(",") if a in self.allowed_actions}
        token = secrets.token_hex(16)
        with self._lock:
            self._grants[token] = granted
        return 200, {"token": token, "access_token": token, "expires_in": 300}

    def allows(self, authorization: str | None, name: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        with self._lock:
            granted = self._grants.get(authorization.removeprefix("Bearer "))
        if granted is None:
            return False
        return name is None or (name, "pull") in granted

    def challenge(self, name: str | None) -> str:
        text = f'Bearer realm="http://{self.address}/token",service="{SERVICE}"'
        if name is not None:
            text += f',scope="repository:{name}:{self.challenge_actions}"'
        return text

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _basic_user(authorization: str | None, username: str, password: str) -> str | None:
    if not authorization or not authorization.startswith("Basic "):
        return None
    try:
        user, _, given = base64.b64decode(authorization[6:]).decode().partition(":")
    except ValueError:
        return None
    return user if (user, given) == (username, password) else None


def _handler_for(front: TokenAuthRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet

        def _send_json(self, status: int, body: dict[str, object],
                       headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _token(self, query: dict[str, str]) -> None:
            status, body = front.issue(query, self.headers.get("Authorization"),
                                       self.headers.get("User-Agent", ""))
            raw = front.token_answer
            if raw is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                return
            self._send_json(status, body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
            if self.path.startswith("/token"):
                auth = self.headers.get("Authorization")
                if auth is None and "username" in form:
                    pair = f"{form['username']}:{form.get('password', '')}".encode()
                    auth = "Basic " + base64.b64encode(pair).decode()
                status, body = front.issue(form, auth, self.headers.get("User-Agent", ""))
                self._send_json(status, body)
                return
            self._send_json(405, {"errors": [{"code": "UNSUPPORTED"}]})

        def do_HEAD(self) -> None:
            self._registry()

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/token":
                self._token(dict(urllib.parse.parse_qsl(url.query)))
                return
            self._registry()

        def _registry(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            match = _NAME_RE.match(url.path)
            name = match.group("name") if match else None
            if not front.allows(self.headers.get("Authorization"), name):
                self._send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]},
                                {"WWW-Authenticate": front.challenge(name)})
                return
            self._forward()

        def _forward(self) -> None:
            upstream = http.client.HTTPConnection(front.upstream, timeout=30)
            upstream.putrequest(self.command, self.path, skip_accept_encoding=True)
            # header by header: Docker sends several Accept lines, and a registry that sees
            # only one of them may answer with another manifest schema (another digest)
            for key, value in self.headers.items():
                if key.lower() not in _HOP_BY_HOP | {"authorization", "host"}:
                    upstream.putheader(key, value)
            upstream.endheaders()
            answer = upstream.getresponse()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in _HOP_BY_HOP:
                    self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                while chunk := answer.read(65536):
                    self.wfile.write(chunk)
            upstream.close()

    return Handler
