"""A real Home Assistant for the tests, from the virtualenvs that ``scripts/stack`` caches.

``releases()`` lists the releases in ``tests/stack/home-assistant.txt``; scripts/stack
installs each into ``$HA_CACHE/ha-<release>-py<python>`` (default HA_CACHE
``/var/cache/edge-agent``). ``HomeAssistant`` runs one of them as a process
(``python -m homeassistant --skip-pip``) on a free loopback port with a throwaway config
directory, and sets it up the way a user would, through its own HTTP API, so nothing
depends on the layout of its storage files:

- onboarding: the owner account (``/api/onboarding/users``) and its access token
  (``/auth/token``); the other onboarding steps are marked done in its storage before
  start (they would set up integrations that go to the internet), so the frontend
  opens on the dashboard;
- the MQTT integration: the config flow (``/api/config/config_entries/flow``) pointed at
  the test broker with the given login; MQTT discovery is on, as by default.

Only what the tests need is configured (``http``, ``api`` and the integrations Home
Assistant always loads; no ``default_config``); MQTT logs at debug level. Its log is
``log()``; ``problems()`` lists every warning and error in it (less two that any start
here logs), which a test asserts to be empty: a refused payload, a template that does
not render or an invalid discovery config all show up there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import requests

from tests.support import REPO_ROOT, free_port, terminate, wait_until

__all__ = [
    "HomeAssistant",
    "HomeAssistantMissing",
    "Release",
    "ha_cache",
    "releases",
    "venv_python",
]

RELEASES_FILE = REPO_ROOT / "tests" / "stack" / "home-assistant.txt"
HOST = "127.0.0.1"
STAMP = ".edge-agent-stamp"
OWNER = ("edge", "edge-agent-test-owner")  # user name, password of the owner account

# Warnings every start here logs, unrelated to what the agent sends: --skip-pip itself,
# and no zlib-ng/isal accelerator (optional native wheels).
BENIGN = (
    re.compile(r"\[homeassistant\.bootstrap\] Skipping pip installation"),
    re.compile(r"\[aiohttp_fast_zlib\] zlib_ng and isal are not available"),
)
# Who wrote a log line: "<date> <time> LEVEL (thread) [logger] message".
LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) \([^)]*\) \[(?P<logger>[^\]]+)\] ")


class HomeAssistantMissing(RuntimeError):
    """The release's virtualenv is not there: scripts/stack installs it."""


@dataclass(frozen=True)
class Release:
    """One Home Assistant release the tests run against, and its Python (X.Y)."""

    version: str
    python: str

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split(".") if part.isdigit())

    @property
    def has_progress(self) -> bool:
        """2024.11 brought in_progress/update_percentage to MQTT update entities."""
        return self.numbers >= (2024, 11)

    def __str__(self) -> str:
        return self.version


def releases(path: Path = RELEASES_FILE) -> list[Release]:
    found = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            found.append(Release(fields[0], fields[1]))
    return found


def ha_cache() -> Path:
    return Path(os.environ.get("HA_CACHE", "/var/cache/edge-agent"))


def venv_python(release: Release) -> Path:
    """The Python of the release's cached virtualenv (the newest one whose stamp says
    the install finished)."""
    candidates = sorted(ha_cache().glob(f"ha-{release.version}-py{release.python}.*"),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for venv in candidates:
        stamp = venv / STAMP
        python = venv / "bin" / "python"
        if (stamp.is_file() and stamp.read_text().startswith(f"homeassistant=={release.version} ")
                and python.exists()):
            return python
    raise HomeAssistantMissing(
        f"Home Assistant {release.version} (Python {release.python}) is not installed in "
        f"{ha_cache()}: run scripts/stack")


CONFIGURATION = """\
homeassistant:
  name: edge-agent test
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  country: NL
  currency: EUR
http:
  server_host: {host}
  server_port: {port}
api:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: debug
    homeassistant.bootstrap: info
"""


class HomeAssistant:
    """One Home Assistant process; ``start()`` onboards it and adds the MQTT integration."""

    def __init__(self, release: Release, *, mqtt_port: int, mqtt_user: str,
                 mqtt_password: str) -> None:
        self.release = release
        self.python = venv_python(release)
        self.mqtt = {"broker": HOST, "port": mqtt_port, "username": mqtt_user,
                     "password": mqtt_password}
        self.dir = Path(tempfile.mkdtemp(prefix=f"edge-ha-{release.version}-"))
        self.config_dir = self.dir / "config"
        self.config_dir.mkdir()
        self.log_path = self.dir / "home-assistant.log"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.client_id = f"{self.url}/"
        self.token: str | None = None
        self.refresh_token: str | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()

    # -- lifecycle ------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> Self:
        (self.config_dir / "configuration.yaml").write_text(
            CONFIGURATION.format(host=HOST, port=self.port))
        # Onboarding's other steps set up weather, radio and TTS integrations that would
        # go to the internet: mark them done; the owner is still created through the API.
        storage = self.config_dir / ".storage"
        storage.mkdir()
        (storage / "onboarding").write_text(json.dumps(
            {"version": 4, "minor_version": 1, "key": "onboarding",
             "data": {"done": ["core_config", "analytics", "integration"]}}))
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            # --skip-pip: everything it needs is in the venv; it must never install
            self._proc = subprocess.Popen(
                [str(self.python), "-m", "homeassistant", "--config", str(self.config_dir),
                 "--skip-pip", "--log-no-color", "--log-file", str(self.dir / "ha-file.log")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, env=env, start_new_session=True)
        deadline = started + timeout
        wait_until(lambda: self._answers("/api/onboarding"), timeout=timeout, interval=0.2,
                   message=f"Home Assistant {self.release} to answer HTTP")
        self._onboard()
        wait_until(self._running, timeout=max(1.0, deadline - time.monotonic()),
                   interval=0.2, message=f"Home Assistant {self.release} to be running")
        self._add_mqtt()
        self.startup_s = time.monotonic() - started
        return self

    def _answers(self, path: str) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"Home Assistant {self.release} exited with "
                               f"{self._proc.returncode}:\n{self.log()[-4000:]}")
        try:
            return self._session.get(self.url + path, timeout=2).ok
        except requests.RequestException:
            return False

    def _running(self) -> bool:
        self._answers("/")  # raises if it died
        try:
            config = self.api("GET", "/api/config")
        except requests.RequestException:
            return False
        return bool(config.get("state") == "RUNNING")

    def _onboard(self) -> None:
        """Create the owner and log in, as the onboarding page would."""
        user, password = OWNER
        response = self._session.post(f"{self.url}/api/onboarding/users", timeout=30, json={
            "client_id": self.client_id, "name": "Edge Test", "username": user,
            "password": password, "language": "en"})
        response.raise_for_status()
        self._token_from_code(response.json()["auth_code"])

    def _token_from_code(self, code: str) -> None:
        response = self._session.post(f"{self.url}/auth/token", timeout=30, data={
            "grant_type": "authorization_code", "code": code, "client_id": self.client_id})
        response.raise_for_status()
        tokens = response.json()
        self.token = tokens["access_token"]
        self.refresh_token = tokens.get("refresh_token")

    def _add_mqtt(self) -> None:
        """The MQTT integration, through its config flow (the form a user fills in)."""
        flow = self.api("POST", "/api/config/config_entries/flow",
                        {"handler": "mqtt", "show_advanced_options": False})
        if flow.get("step_id") != "broker":
            raise RuntimeError(f"unexpected MQTT config flow step: {flow}")
        result = self.api("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                          self.mqtt)
        if result.get("type") != "create_entry":
            raise RuntimeError(f"the MQTT config flow did not create an entry: {result}")
        entry_id = result["result"]["entry_id"] if isinstance(result.get("result"), dict) \
            else result.get("result")

        def loaded() -> bool:
            entries = self.api("GET", "/api/config/config_entries/entry")
            return any(e.get("entry_id") == entry_id and e.get("state") == "loaded"
                       for e in entries)
        wait_until(loaded, timeout=30, interval=0.2, message="the MQTT integration to load")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 60.0) -> None:
        proc, self._proc = self._proc, None
        terminate(proc, timeout)
        self._session.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the REST API -----------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30.0) -> Any:
        """One authenticated REST call; the decoded JSON answer (None for an empty one)."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        response = self._session.request(method, self.url + path, json=body,
                                         headers=headers, timeout=timeout)
        if not response.ok:
            raise HomeAssistantError(method, path, response.status_code, response.text)
        return response.json() if response.content else None

    def state(self, entity_id: str) -> dict[str, Any] | None:
        """The entity's state object (``state``, ``attributes``), None if it has none."""
        try:
            found: dict[str, Any] = self.api("GET", f"/api/states/{entity_id}")
        except HomeAssistantError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def wait_state(self, entity_id: str, predicate: Callable[[dict[str, Any]], bool],
                   *, timeout: float = 30.0, message: str = "",
                   interval: float = 0.1) -> dict[str, Any]:
        """Poll the entity until ``predicate(state)``; the timeout names the last state."""
        last: list[dict[str, Any] | None] = [None]

        def check() -> dict[str, Any] | None:
            current = self.state(entity_id)
            last[0] = current
            return current if current is not None and predicate(current) else None
        try:
            return wait_until(check, timeout=timeout, interval=interval,
                              message=message or f"a state of {entity_id}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; last state: {last[0]}") from None

    def find_entity(self, domain: str, predicate: Callable[[dict[str, Any]], bool], *,
                    timeout: float = 30.0, message: str = "") -> str:
        """The id of the first ``domain`` entity whose state object matches (REST has no
        entity registry; a test matches on an attribute it set, e.g. ``title``)."""
        def find() -> str | None:
            for state in self.api("GET", "/api/states"):
                entity_id = str(state.get("entity_id", ""))
                if entity_id.startswith(f"{domain}.") and predicate(state):
                    return entity_id
            return None
        return wait_until(find, timeout=timeout, interval=0.2,
                          message=message or f"a {domain} entity")

    def call(self, domain: str, service: str, data: dict[str, Any]) -> Any:
        return self.api("POST", f"/api/services/{domain}/{service}", data)

    # -- the log ----------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def problems(self) -> list[str]:
        """Every warning and error in Home Assistant's log, less the few that any start
        in this sandbox logs (``BENIGN``): a refused payload ("Schema violation"), a
        template that does not render, an invalid discovery config all land here."""
        found = []
        for line in self.log().splitlines():
            match = LOG_LINE.match(line)
            if match is None or match["level"] not in ("WARNING", "ERROR", "CRITICAL"):
                continue
            if not any(pattern.search(line) for pattern in BENIGN):
                found.append(line)
        return found


class HomeAssistantError(RuntimeError):
    """Home Assistant answered a REST call with an error status."""

    def __init__(self, method: str, path: str, status: int, text: str) -> None:
        super().__init__(f"{method} {path}: {status} {text[:500]}")
        self.status = status
