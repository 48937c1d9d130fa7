"""edge-ctl's HTTP client of the bridge (``edge-bridge``), for what lives only there: the
rollouts (docs/PROTOCOL.md, "Rollouts").

Standard library only (``http.client``), one request per call, each with a timeout.
Every failure becomes a ``CtlError`` here, once: the bridge unreachable or silent is
EXIT_TIMEOUT; a refused token and a spec the bridge refuses (400) are usage errors
(EXIT_USAGE) with the bridge's own words; any other refusal (404, 409, 503) is
EXIT_FAILED with them.

Settings, as for the bridge itself: ``BRIDGE_URL`` (default http://127.0.0.1:8080),
``BRIDGE_TOKEN`` or ``BRIDGE_TOKEN_FILE``; ``--bridge-url`` and ``--bridge-token-file``
override them.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE, CtlError
from edge_agent.ctl.render import printable
from edge_agent.protocol import safejson

DEFAULT_BRIDGE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT_S = 15.0
ROLLOUTS_PATH = "/api/v1/rollouts"
# A rollout document names every device of its target: a 10,000-device fleet is a few MB.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_TOKEN_CHARS = 4096
# The bridge's own words, as much of them as an operator needs.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class BridgeSettings:
    """Where the bridge is and the token it wants. ``token`` is never shown."""

    url: str
    token: str
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __repr__(self) -> str:
        return f"BridgeSettings(url={self.url!r})"


def load_bridge_settings(environ: Mapping[str, str], url: str | None = None,
                         token_file: str | None = None) -> BridgeSettings:
    """``BRIDGE_URL`` and ``BRIDGE_TOKEN``/``BRIDGE_TOKEN_FILE``, the options over them;
    CtlError (usage) naming the setting when one is wrong."""
    chosen_url = (url or environ.get("BRIDGE_URL", "") or DEFAULT_BRIDGE_URL).strip()
    parts = urlsplit(chosen_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CtlError(f"BRIDGE_URL {chosen_url!r}: must be http(s)://host[:port]", EXIT_USAGE)
    try:
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        raise CtlError(f"BRIDGE_URL {chosen_url!r}: bad port", EXIT_USAGE) from None
    direct = "" if token_file else environ.get("BRIDGE_TOKEN", "")
    path = token_file or environ.get("BRIDGE_TOKEN_FILE", "").strip()
    if direct and path:
        raise CtlError("set BRIDGE_TOKEN or BRIDGE_TOKEN_FILE, not both", EXIT_USAGE)
    name = "BRIDGE_TOKEN"
    if path:
        name = "--bridge-token-file" if token_file else "BRIDGE_TOKEN_FILE"
        try:
            direct = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CtlError(f"{name}: cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
        except UnicodeDecodeError:
            raise CtlError(f"{name}: {path} is not UTF-8 text", EXIT_USAGE) from None
    token = direct.strip()
    if not token:
        raise CtlError("rollouts are driven by the bridge: set BRIDGE_TOKEN or "
                       "BRIDGE_TOKEN_FILE (or --bridge-token-file) to its token", EXIT_USAGE)
    if len(token) > MAX_TOKEN_CHARS or not all("\x21" <= c <= "\x7e" for c in token):
        raise CtlError(f"{name}: the token must be printable ASCII without spaces", EXIT_USAGE)
    return BridgeSettings(chosen_url.rstrip("/"), token)


class BridgeClient:
    """The bridge's rollout routes, as calls that return the decoded JSON answer."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        parts = urlsplit(settings.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base = parts.path.rstrip("/")

    # -- the rollout routes -------------------------------------------------------------
    def start_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", ROLLOUTS_PATH, spec)

    def list_rollouts(self) -> list[Any]:
        rollouts = self.request("GET", ROLLOUTS_PATH).get("rollouts")
        if not isinstance(rollouts, list):
            raise CtlError("the bridge's rollout list has no 'rollouts' list", EXIT_FAILED)
        return rollouts

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.request("GET", f"{ROLLOUTS_PATH}/{quote(rollout_id, safe='')}")

    def action(self, rollout_id: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume`` or ``abort``."""
        return self.request("POST", f"{ROLLOUTS_PATH}/{quote(rollout_id, safe='')}/{action}")

    # -- one request --------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One request; the answer's JSON object, or CtlError (see the module)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.settings.token}",
                   "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        where = f"the bridge at {self.settings.url}"
        connection = self._connection()
        try:
            connection.request(method, self._base + path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            raise CtlError(f"{where} did not answer within {self.settings.timeout_s:g} s",
                           EXIT_TIMEOUT) from None
        except ssl.SSLError as exc:
            raise CtlError(f"{where}: TLS failed: {exc.reason or exc}", EXIT_USAGE) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise CtlError(f"{where} is unreachable: {reason or type(exc).__name__}",
                           EXIT_TIMEOUT) from None
        finally:
            connection.close()
        return self._answer(path, response.status, raw)

    def _connection(self) -> http.client.HTTPConnection:
        timeout = self.settings.timeout_s
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _answer(self, path: str, status: int, raw: bytes) -> dict[str, Any]:
        try:
            answer = safejson.loads(raw, max_bytes=MAX_ANSWER_BYTES)
        except safejson.UntrustedJson as exc:
            answer = {"error": f"answer not readable: {exc}"}
        if not isinstance(answer, dict):
            answer = {"error": "answer is not a JSON object"}
        if 200 <= status < 300:  # noqa: PLR2004 - the success class
            return answer
        said = printable(answer.get("error", "(no reason given)"), MAX_ERROR_CHARS)
        if status == http.client.UNAUTHORIZED:
            raise CtlError("the bridge refused the token (401): check BRIDGE_TOKEN or "
                           "BRIDGE_TOKEN_FILE", EXIT_USAGE)
        if status == http.client.BAD_REQUEST:
            raise CtlError(f"refused by the bridge: {said}", EXIT_USAGE)
        if status == http.client.NOT_FOUND and path == ROLLOUTS_PATH:
            raise CtlError(f"{self.settings.url} has no rollout routes (an older bridge?)",
                           EXIT_FAILED)
        raise CtlError(f"refused by the bridge ({status}): {said}", EXIT_FAILED)
