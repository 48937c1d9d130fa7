"""The bridge's HTTP API as a plain function of a request: no sockets here.

``Api.handle(Request) -> Response``; ``server`` reads requests off the wire. Every
input is validated here: ids are single MQTT topic levels, tags go through the
agent's own ``validate_tag``, request ids follow the one grammar of ``edge_agent.protocol.tags``,
bodies are small UTF-8 JSON objects with known keys (the bounded decoder of
``edge_agent.protocol.safejson``), query parameters are known ones, numbers plain digits.
Malformed input is a 4xx with ``{"error": ...}``, never a 500.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

from edge_agent.bridge.fleet import ChangeFeed, Fleet, TooManyWaiters
from edge_agent.bridge.fleetview import MAX_QUERY_CHARS, SORT_FIELDS, STATUSES, DeviceFilter
from edge_agent.protocol import safejson
from edge_agent.protocol.answers import Answer, deferred_text
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.mqtt import BrokerUnavailable
from edge_agent.protocol.state import UpdateStatus
from edge_agent.protocol.tags import (
    MAX_SPREAD_S,
    REQUEST_ID_PATTERN,
    command_payload,
    desired_tag_payload,
    is_request_id,
    new_request_id,
    validate_tag,
)
from edge_agent.protocol.timestamps import format_utc
from edge_agent.protocol.topics import ID_RE, Topics
from edge_agent.registry_probe import ProbeSettings, precheck
from edge_agent.rollout.controller import RolloutController, RolloutError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4096
# a rollout spec may list thousands of device ids
ROLLOUT_BODY_BYTES = 1024 * 1024
ROLLOUTS_PATH = "/api/v1/rollouts"
ROLLOUT_COMMANDS = ("pause", "resume", "abort")
MAX_ID_CHARS = 64
PUT_FIELDS = frozenset({"tag", "request_id"})
# ?wait=: seconds as plain digits with an optional fraction; no sign, exponent, "_",
# spaces, nan or inf, which float() would all take
WAIT_RE = re.compile(r"^[0-9]{1,10}(\.[0-9]{1,20})?$")
SPREAD_RE = re.compile(r"^[0-9]{1,5}$")
FORCE_VALUES = {"true": True, "1": True, "false": False, "0": False}
FORCE_HINT = "add ?force=true"
JSON = "application/json"
METRICS_PATH = "/metrics"
STREAM_PATH = "/api/v1/stream"
EVENT_STREAM = "text/event-stream"
LIST_QUERY = frozenset({"q", "group", "tag", "status", "sort", "limit", "offset"})
MAX_PAGE = 1000
DEFAULT_PAGE = 100
PAGE_RE = re.compile(r"^[0-9]{1,8}$")
# the Prometheus text format (edge_agent.bridge.metrics writes it)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


class Publisher(Protocol):
    """What the API needs from the MQTT side (``link.BridgeLink``)."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None: ...


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query as sent, e.g. /api/v1/devices/a/tag?wait=5
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResponse(Response):
    """A ``text/event-stream`` answer: the server sends the head, then ``stream``'s
    messages until either side stops (``server.Connection``)."""

    stream: LiveStream | None = None


class HttpError(Exception):
    """Answer with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    return Response(status, data, JSON, dict(headers or {}))


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


Handler = Callable[["Call"], Response]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: tuple[str, ...]  # literal segments; "{id}" / "{group}" are parameters
    handler: str  # Api method name
    auth: bool = True
    query: frozenset[str] = frozenset()  # the query parameters it takes


@dataclass
class Call:
    """A matched request: decoded path parameters and query."""

    request: Request
    params: dict[str, str]
    query: dict[str, str]


ROUTES: tuple[Route, ...] = (
    Route("GET", ("healthz",), "healthz", auth=False),
    Route("GET", ("openapi.json",), "openapi", auth=False),
    Route("GET", ("metrics",), "metrics"),
    Route("GET", ("api", "v1", "devices"), "list_devices", query=LIST_QUERY),
    Route("GET", ("api", "v1", "fleet", "summary"), "fleet_summary"),
    Route("GET", ("api", "v1", "stream"), "stream"),
    Route("POST", ("api", "v1", "devices", "{id}", "install"), "install_device"),
    Route("GET", ("api", "v1", "devices", "{id}"), "get_device"),
    Route("PUT", ("api", "v1", "devices", "{id}", "tag"), "put_device_tag",
          query=frozenset({"wait", "force"})),
    Route("DELETE", ("api", "v1", "devices", "{id}", "tag"), "delete_device_tag"),
    Route("POST", ("api", "v1", "devices", "{id}", "check"), "check_device"),
    Route("PUT", ("api", "v1", "groups", "{group}", "tag"), "put_group_tag",
          query=frozenset({"wait", "spread", "force"})),
    Route("DELETE", ("api", "v1", "groups", "{group}", "tag"), "delete_group_tag"),
    Route("PUT", ("api", "v1", "fleet", "tag"), "put_fleet_tag",
          query=frozenset({"wait", "spread", "force"})),
    Route("DELETE", ("api", "v1", "fleet", "tag"), "delete_fleet_tag"),
    Route("POST", ("api", "v1", "fleet", "check"), "check_fleet", query=frozenset({"spread"})),
    # the desired agent version (docs/SELF-UPDATE.md)
    Route("PUT", ("api", "v1", "devices", "{id}", "agent"), "put_device_agent"),
    Route("DELETE", ("api", "v1", "devices", "{id}", "agent"), "delete_device_agent"),
    Route("PUT", ("api", "v1", "groups", "{group}", "agent"), "put_group_agent"),
    Route("DELETE", ("api", "v1", "groups", "{group}", "agent"), "delete_group_agent"),
    Route("PUT", ("api", "v1", "fleet", "agent"), "put_fleet_agent"),
    Route("DELETE", ("api", "v1", "fleet", "agent"), "delete_fleet_agent"),
    Route("GET", ("api", "v1", "rollouts"), "list_rollouts"),
    Route("POST", ("api", "v1", "rollouts"), "create_rollout"),
    Route("GET", ("api", "v1", "rollouts", "{id}"), "get_rollout"),
    *(Route("POST", ("api", "v1", "rollouts", "{id}", name), f"{name}_rollout")
      for name in ROLLOUT_COMMANDS),
)


def max_body_bytes(target: str) -> int:
    """The largest body the server reads for a request to ``target``."""
    return ROLLOUT_BODY_BYTES if target.partition("?")[0] == ROLLOUTS_PATH else MAX_BODY_BYTES


def load_resource(name: str) -> bytes:
    return resources.files("edge_agent.bridge").joinpath(name).read_bytes()


def openapi_document(max_wait_s: float) -> dict[str, Any]:
    """The shipped OpenAPI document, with this bridge's ``?wait`` limit filled in."""
    document: dict[str, Any] = json.loads(load_resource("openapi.json"))
    wait = document["components"]["parameters"]["wait"]["schema"]
    wait["maximum"] = max_wait_s
    return document


class Api:
    """Routes, auth and validation; publishes through ``publisher``, reads ``fleet``."""

    def __init__(  # noqa: PLR0913 - its parts, then keyword-only limits
        self,
        token: str,
        topics: Topics,
        fleet: Fleet,
        publisher: Publisher,
        *,
        max_wait_s: float = 300.0,
        new_request_id: Callable[[], str] = new_request_id,
        now: Callable[[], float] = time.time,
        metrics_token: str | None = None,
        rollouts: RolloutController | None = None,
        registry: ProbeSettings | None = None,
    ) -> None:
        self._token = token.encode()
        # /metrics takes the API token or this read-only one (for Prometheus)
        self._metrics_token = metrics_token.encode() if metrics_token else None
        self._metrics: Callable[[], bytes] | None = None
        self.topics = topics
        self.fleet = fleet
        self.publisher = publisher
        self.max_wait_s = max_wait_s
        self._new_request_id = new_request_id
        self.rollouts = rollouts
        self._now = now
        # whether (and how) a desired tag is looked up in the registry before publishing
        self.registry = registry if registry is not None else ProbeSettings(enabled=False)
        self._openapi = json.dumps(openapi_document(max_wait_s), indent=1).encode()
        self._static = {path: (load_resource(f"static/{name}"), ctype)
                        for path, (name, ctype) in STATIC_FILES.items()}

    # -- dispatch -------------------------------------------------------------------
    def handle(self, request: Request) -> Response:
        try:
            response = self._dispatch(request)
        except HttpError as exc:
            response = error_response(exc.status, exc.message, exc.headers)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.content_type == JSON:
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _dispatch(self, request: Request) -> Response:
        path, _, query_text = request.target.partition("?")
        path = path.partition("#")[0]
        method = "GET" if request.method == "HEAD" else request.method
        if path in self._static:
            if method != "GET":
                raise HttpError(405, f"{request.method} not allowed", {"Allow": "GET, HEAD"})
            body, ctype = self._static[path]
            return Response(200, body, ctype, {"Content-Security-Policy": PAGE_CSP,
                                               "Cache-Control": "no-cache"})
        if not path.startswith("/"):
            raise HttpError(400, "request target must be an absolute path")
        segments = tuple(_decode_segment(s) for s in path[1:].split("/"))
        if segments[:1] == ("api",):
            self._authenticate(request.headers, path)
        candidates = [(route, params) for route in ROUTES
                      if (params := _match(route.pattern, segments)) is not None]
        if not candidates:
            raise HttpError(404, "no such route")
        for route, params in candidates:
            if route.method == method:
                if route.auth:
                    # (the route matched the decoded path; "/%6detrics" is /metrics too)
                    self._authenticate(request.headers, METRICS_PATH
                                       if route.handler == "metrics" else path)
                query = _parse_query(query_text)
                unknown = sorted(set(query) - route.query)
                if unknown:
                    known = ", ".join(sorted(route.query)) or "none"
                    raise HttpError(400, f"unknown query parameter {unknown[0][:20]!r} "
                                         f"(this route takes: {known})")
                handler: Handler = getattr(self, route.handler)
                return handler(Call(request, params, query))
        allowed = sorted({r.method for r, _ in candidates})
        if "GET" in allowed:
            allowed.append("HEAD")
        raise HttpError(405, f"{request.method} not allowed here",
                        {"Allow": ", ".join(allowed)})

    @staticmethod
    def needs_token(target: str) -> bool:
        """Whether a request for ``target`` must carry a token (every /api route and
        /metrics)."""
        path = target.partition("?")[0]
        return target.startswith("/api/") or path in ("/api", METRICS_PATH)

    def authorized(self, headers: Mapping[str, str], target: str = "") -> bool:
        """Whether ``headers`` carry the bearer token (compared in constant time); for
        /metrics the metrics token also does."""
        value = headers.get("authorization", "")
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        ok = hmac.compare_digest(given_bytes, self._token)
        if self._metrics_token is not None and target.partition("?")[0] == METRICS_PATH:
            ok = hmac.compare_digest(given_bytes, self._metrics_token) or ok
        return ok

    def _authenticate(self, headers: Mapping[str, str], path: str) -> None:
        if not self.authorized(headers, path):
            raise HttpError(401, "missing or invalid bearer token",
                            {"WWW-Authenticate": 'Bearer realm="edge-bridge"'})

    # -- routes -------------------------------------------------------------------
    def healthz(self, call: Call) -> Response:
        connected = self.publisher.connected
        body = {
            "status": "ok" if connected else "unavailable",
            "broker": "connected" if connected else "disconnected",
            "devices": len(self.fleet),
            "waiting": self.fleet.waiting,
        }
        return json_response(200 if connected else 503, body)

    def openapi(self, call: Call) -> Response:
        return Response(200, self._openapi, JSON, {"Cache-Control": "no-cache"})

    def metrics(self, call: Call) -> Response:
        """The fleet for Prometheus; 501 when prometheus-client is not installed."""
        if self._metrics is None:
            try:
                from edge_agent.bridge.metrics import (  # noqa: PLC0415 - optional
                    FleetMetrics,
                )
            except ImportError:
                raise HttpError(501, "/metrics needs the prometheus-client library: "
                                     "pip install 'edge-agent[bridge]'") from None
            self._metrics = FleetMetrics(self.fleet, lambda: self.publisher.connected).render
        return Response(200, self._metrics(), METRICS_CONTENT_TYPE, {"Cache-Control": "no-store"})

    def list_devices(self, call: Call) -> Response:
        """Every device (no query: the answer tools have always read), or one page of
        the devices that match ``?q=&group=&tag=&status=``, sorted by ``?sort=``."""
        connected = b"true" if self.publisher.connected else b"false"
        if not call.query:
            body = (b'{"broker_connected":' + connected + b',"devices":'
                    + self.fleet.list_json() + b"}")
            return Response(200, body, JSON)
        match, sort, descending, offset, limit = _list_params(call.query)
        total, page = self.fleet.query(match, sort, descending, offset, limit)
        head = json.dumps({"total": total, "offset": offset, "limit": limit},
                          separators=(",", ":")).encode()
        body = (b'{"broker_connected":' + connected + b',"devices":[' + b",".join(page)
                + b"]," + head[1:])
        return Response(200, body, JSON)

    def fleet_summary(self, call: Call) -> Response:
        return json_response(200, {"broker_connected": self.publisher.connected,
                                   **self.fleet.summary()})

    def stream(self, call: Call) -> Response:
        """Server-sent events: the devices that change, the fleet's counts and the broker
        connection (``LiveStream``); ``server`` keeps the connection open."""
        return StreamResponse(200, b"", EVENT_STREAM, {"Cache-Control": "no-store"},
                              stream=LiveStream(self.fleet, lambda: self.publisher.connected))

    def install_device(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        return self._check("device", device_id, self.topics.device_install(device_id))

    def get_device(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        view = self.fleet.device(device_id)
        if view is None:
            raise HttpError(404, f"no state or availability known for device {device_id!r}")
        view["recent_events"] = self.fleet.recent_events(device_id)
        return json_response(200, view)

    def put_device_tag(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        wait_s = self._wait_param(call.query)
        tag, request_id = self._tag_body(call.request.body)
        topic = self.topics.device_tag(device_id)
        body: dict[str, Any] = {"request_id": request_id, "scope": "device", "target": device_id,
                                "tag": tag}
        warnings = []
        if self.fleet.device(device_id) is None:
            # A mistyped id would keep a retained tag for nobody; the tag is still set, for
            # a device that is not installed yet.
            body["warning"] = (f"device {device_id!r} has never reported (no state or "
                               "availability known): the tag is kept for it, but check "
                               "the device id")
            warnings.append(body["warning"])
        warnings += self._registry_check(tag, call.query, self.fleet.repositories(
            device_id=device_id), f"device {device_id}")
        if warnings:
            body["warnings"] = warnings
        if wait_s is None:
            self._publish_tag(topic, tag, request_id)
            return json_response(202, body)
        try:
            waiter = self.fleet.add_waiter(device_id, request_id, tag)
        except TooManyWaiters as exc:
            raise HttpError(503, f"too many waiting requests ({exc}); retry later",
                            {"Retry-After": "1"}) from None
        try:
            self._publish_tag(topic, tag, request_id)
            answer = waiter.wait(wait_s)
        finally:
            self.fleet.remove_waiter(waiter)
        body["state"] = (self.fleet.device(device_id) or {}).get("state")
        return self._wait_answer(body, answer, device_id, wait_s)

    def put_group_tag(self, call: Call) -> Response:
        group = _id(call.params["group"], "group")
        return self._put_scope("group", group, self.topics.group_tag(group), call)

    def put_fleet_tag(self, call: Call) -> Response:
        return self._put_scope("fleet", None, self.topics.fleet_tag, call)

    def delete_device_tag(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        return self._clear("device", device_id, self.topics.device_tag(device_id))

    def delete_group_tag(self, call: Call) -> Response:
        group = _id(call.params["group"], "group")
        return self._clear("group", group, self.topics.group_tag(group))

    def delete_fleet_tag(self, call: Call) -> Response:
        return self._clear("fleet", None, self.topics.fleet_tag)

    # -- the desired agent version (docs/SELF-UPDATE.md) ----------------------------
    def put_device_agent(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        return self._put_agent("device", device_id, self.topics.device_agent(device_id), call)

    def put_group_agent(self, call: Call) -> Response:
        group = _id(call.params["group"], "group")
        return self._put_agent("group", group, self.topics.group_agent(group), call)

    def put_fleet_agent(self, call: Call) -> Response:
        return self._put_agent("fleet", None, self.topics.fleet_agent, call)

    def delete_device_agent(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        return self._clear("device", device_id, self.topics.device_agent(device_id),
                           "agent version")

    def delete_group_agent(self, call: Call) -> Response:
        group = _id(call.params["group"], "group")
        return self._clear("group", group, self.topics.group_agent(group), "agent version")

    def delete_fleet_agent(self, call: Call) -> Response:
        return self._clear("fleet", None, self.topics.fleet_agent, "agent version")

    def _put_agent(self, scope: str, target: str | None, topic: str, call: Call) -> Response:
        tag, request_id = self._tag_body(call.request.body)
        self._publish(topic, desired_tag_payload(tag, request_id, self._issued_at()))
        log.info("published desired agent version %s on %s (request %s)", tag, topic,
                 request_id)
        return json_response(202, {"request_id": request_id, "scope": scope, "target": target,
                                   "tag": tag})

    def check_device(self, call: Call) -> Response:
        device_id = _id(call.params["id"], "device id")
        return self._check("device", device_id, self.topics.device_check(device_id))

    def check_fleet(self, call: Call) -> Response:
        return self._check("fleet", None, self.topics.fleet_check,
                           spread=_spread_param(call.query))

    # -- rollouts (edge_agent.rollout; docs/BRIDGE.md, "Rollouts") -------------------
    def _rollouts(self) -> RolloutController:
        if self.rollouts is None:
            raise HttpError(503, "rollouts are off in this bridge")
        return self.rollouts

    def list_rollouts(self, call: Call) -> Response:
        return self._rollout_call(lambda c: {"rollouts": c.list()}, 200)

    def get_rollout(self, call: Call) -> Response:
        rollout_id = _id(call.params["id"], "rollout id")
        return self._rollout_call(lambda c: c.get(rollout_id), 200)

    def create_rollout(self, call: Call) -> Response:
        body = call.request.body
        if len(body) > ROLLOUT_BODY_BYTES:
            raise HttpError(413, f"body larger than {ROLLOUT_BODY_BYTES} bytes")
        try:
            obj = safejson.loads_object(body, max_bytes=ROLLOUT_BODY_BYTES, max_depth=4)
        except safejson.UntrustedJson as exc:
            raise HttpError(400, f"body must be a UTF-8 JSON object (a rollout spec): "
                                 f"{exc}") from None
        return self._rollout_call(lambda c: c.create(obj), 201)

    def pause_rollout(self, call: Call) -> Response:
        return self._rollout_command(call, "pause")

    def resume_rollout(self, call: Call) -> Response:
        return self._rollout_command(call, "resume")

    def abort_rollout(self, call: Call) -> Response:
        return self._rollout_command(call, "abort")

    def _rollout_command(self, call: Call, name: str) -> Response:
        rollout_id = _id(call.params["id"], "rollout id")
        return self._rollout_call(lambda c: c.command(rollout_id, name), 200)

    def _rollout_call(self, work: Callable[[RolloutController], Any], status: int) -> Response:
        try:
            return json_response(status, work(self._rollouts()))
        except RolloutError as exc:
            headers = {"Retry-After": "5"} if exc.status == 503 else None  # noqa: PLR2004
            raise HttpError(exc.status, exc.message, headers) from None

    # -- helpers ------------------------------------------------------------------
    def _put_scope(self, scope: str, target: str | None, topic: str, call: Call) -> Response:
        if "wait" in call.query:
            raise HttpError(400, "?wait is only supported for a single device "
                                 "(PUT /api/v1/devices/{id}/tag)")
        spread = _spread_param(call.query)
        tag, request_id = self._tag_body(call.request.body)
        who = f"the devices of group {target}" if target else "the fleet's devices"
        warnings = self._registry_check(tag, call.query,
                                        self.fleet.repositories(group=target), who)
        self._publish_tag(topic, tag, request_id, spread)
        body: dict[str, Any] = {"request_id": request_id, "scope": scope, "target": target,
                                "tag": tag}
        if spread:
            body["spread"] = spread
        if warnings:
            body["warnings"] = warnings
        return json_response(202, body)

    def _clear(self, scope: str, target: str | None, topic: str, what: str = "tag") -> Response:
        self._publish(topic, b"")
        log.info("cleared the %s desired %s%s", scope, what, f" of {target}" if target else "")
        return json_response(200, {"scope": scope, "target": target, "cleared": True})

    def _check(self, scope: str, target: str | None, topic: str,
               spread: float | None = None) -> Response:
        request_id = self._new_request_id()
        self._publish(topic, command_payload(request_id, self._issued_at(), spread=spread),
                      retain=False)
        body: dict[str, Any] = {"request_id": request_id, "scope": scope, "target": target}
        if spread:
            body["spread"] = spread
        return json_response(202, body)

    def _registry_check(self, tag: str, query: Mapping[str, str], repositories: list[str],
                        who: str) -> list[str]:
        """Ask the registry whether ``tag`` exists for ``who`` (unless ``?force=true``):
        422 when it does not; the warnings when it could not be asked."""
        text = query.get("force", "false")
        if text not in FORCE_VALUES:
            raise HttpError(400, f"force must be true or false, got {text[:20]!r}")
        if FORCE_VALUES[text]:
            return []
        result = precheck(tag, repositories, self.registry, who=who)
        if result.missing:
            log.info("refused desired tag %s for %s: not in the registry", tag, who)
            raise HttpError(422, result.refusal(FORCE_HINT))
        return list(result.warnings)

    def _publish_tag(self, topic: str, tag: str, request_id: str,
                     spread: float | None = None) -> None:
        self._publish(topic, desired_tag_payload(tag, request_id, self._issued_at(), spread))
        log.info("published desired tag %s on %s (request %s)", tag, topic, request_id)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        try:
            self.publisher.publish(topic, payload, retain=retain)
        except BrokerUnavailable as exc:
            log.warning("publish to %s failed: %s", topic, exc)
            raise HttpError(503, str(exc), {"Retry-After": "5"}) from None

    def _issued_at(self) -> str:
        return format_utc(self._now())

    def _wait_param(self, query: Mapping[str, str]) -> float | None:
        text = query.get("wait")
        if text is None:
            return None
        if not WAIT_RE.fullmatch(text):
            raise HttpError(400, "wait must be seconds as digits with an optional fraction "
                                 f"(like 30 or 2.5), got {text[:20]!r}")
        value = float(text)
        if not 0 < value <= self.max_wait_s:
            raise HttpError(400, f"wait must be more than 0 and at most {self.max_wait_s:g} s")
        return value

    def _tag_body(self, body: bytes) -> tuple[str, str]:
        obj = _json_body(body)
        unknown = set(obj) - PUT_FIELDS
        if unknown:
            raise HttpError(400, f"unknown field(s): {', '.join(sorted(unknown))[:100]}")
        tag = obj.get("tag")
        if not isinstance(tag, str):
            raise HttpError(400, 'body needs "tag": a string (use DELETE to clear a tag)')
        try:
            validate_tag(tag)
        except TagError as exc:
            raise HttpError(400, str(exc)) from None
        if "request_id" not in obj:
            return tag, self._new_request_id()
        request_id = obj["request_id"]
        if not is_request_id(request_id):
            raise HttpError(400, f"request_id must match {REQUEST_ID_PATTERN[1:-1]}")
        return tag, request_id

    def _wait_answer(
        self, body: dict[str, Any], answer: Answer | None, device_id: str, wait_s: float
    ) -> Response:
        if answer is None:
            body["error"] = (f"device {device_id!r} did not answer within {wait_s:g} s; the "
                             "desired tag stays published and applies when the device sees it"
                             + _pending_error(body.get("state"), body["request_id"]))
            return json_response(504, body)
        if answer.ok:
            body["result"] = answer.reason
            return json_response(200, body)
        body["error"] = answer.reason
        body["event"] = answer.event
        return json_response(409, body)


def _list_params(query: Mapping[str, str]) -> tuple[DeviceFilter, str, bool, int, int]:
    """``GET /api/v1/devices``'s filter, sort field and order, offset and limit."""
    for name in ("q", "group", "tag"):
        if len(query.get(name, "")) > MAX_QUERY_CHARS:
            raise HttpError(400, f"{name} is longer than {MAX_QUERY_CHARS} characters")
    status = query.get("status", "")
    if status and status not in STATUSES:
        raise HttpError(400, f"status must be one of {', '.join(STATUSES)}")
    sort = query.get("sort", "id")
    field_name = sort.removeprefix("-")
    if field_name not in SORT_FIELDS:
        raise HttpError(400, f"sort must be one of {', '.join(SORT_FIELDS)}, with - in "
                             "front for descending order")
    numbers = {}
    for name, default, top in (("offset", 0, 10_000_000), ("limit", DEFAULT_PAGE, MAX_PAGE)):
        text = query.get(name, str(default))
        if not PAGE_RE.fullmatch(text) or int(text) > top:
            raise HttpError(400, f"{name} must be a whole number from 0 to {top}")
        numbers[name] = int(text)
    match = DeviceFilter(query.get("q", "").strip(), query.get("group", ""),
                         query.get("tag", ""), status)
    return match, field_name, sort.startswith("-"), numbers["offset"], numbers["limit"]


STREAM_INTERVAL_S = 0.5  # changes are sent at most this often, coalesced


class LiveStream:
    """The messages of one ``GET /api/v1/stream``, as text/event-stream frames.

    ``hello`` first (the fleet's counts, the broker connection), then ``devices``
    (the views of the devices that changed and the ids of those gone, with the counts)
    at most every ``STREAM_INTERVAL_S``, ``resync`` when too many changed to list them
    (the page fetches its view again), and ``broker`` when the bridge's broker
    connection comes or goes.
    """

    def __init__(self, fleet: Fleet, connected: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self._connected = connected
        self._clock = clock
        self._feed: ChangeFeed = fleet.watch()
        self._broker = connected()
        self._sent_at = 0.0

    def first(self) -> bytes:
        return _frame("hello", {"broker_connected": self._broker, **self.fleet.summary()})

    def poll(self, timeout_s: float) -> bytes:
        """What to send next, waiting up to ``timeout_s``; b"" when nothing."""
        out = b""
        connected = self._connected()
        if connected != self._broker:
            self._broker = connected
            out += _frame("broker", {"broker_connected": connected})
        if not self._feed.ready.wait(0 if out else timeout_s):
            return out
        wait = self._sent_at + STREAM_INTERVAL_S - self._clock()
        if wait > 0:
            time.sleep(wait)  # more changes gather meanwhile
        self._sent_at = self._clock()
        ids = self.fleet.drain(self._feed)
        summary = self.fleet.summary()
        if ids is None:
            return out + _frame("resync", {"summary": summary})
        views, gone = self.fleet.views_json(ids)
        body = (b'{"devices":[' + b",".join(views) + b'],"gone":'
                + json.dumps(gone).encode() + b',"summary":'
                + json.dumps(summary, separators=(",", ":")).encode() + b"}")
        return out + b"event: devices\ndata: " + body + b"\n\n"

    def close(self) -> None:
        self.fleet.unwatch(self._feed)


def _frame(name: str, data: Any) -> bytes:
    # JSON has no raw newline, so one data: line carries it
    return (f"event: {name}\ndata: " + json.dumps(data, separators=(",", ":"))
            + "\n\n").encode()


def _spread_param(query: Mapping[str, str]) -> float | None:
    """``?spread=<s>``: seconds over which the devices spread a fleet-wide change."""
    text = query.get("spread")
    if text is None:
        return None
    if not SPREAD_RE.fullmatch(text) or not 0 <= int(text) <= MAX_SPREAD_S:
        raise HttpError(400, f"spread must be whole seconds from 0 to {MAX_SPREAD_S}, "
                             f"got {text[:20]!r}")
    return int(text)


def _pending_error(state: Any, request_id: str) -> str:
    """The device's last error while it works on our request (it keeps retrying), or
    why it holds the update back."""
    if not isinstance(state, dict):
        return ""
    desired, update = state.get("desired"), state.get("update")
    if not isinstance(desired, dict) or desired.get("request_id") != request_id:
        return ""
    if isinstance(update, dict) and update.get("status") == UpdateStatus.DEFERRED:
        tag = desired.get("tag")
        return f" ({deferred_text(state, tag if isinstance(tag, str) else '?')})"
    if not isinstance(update, dict) or not isinstance(update.get("last_error"), str):
        return ""
    return f" (it is retrying after: {update['last_error'][:300]})"


def _decode_segment(segment: str) -> str:
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "path is not valid UTF-8 after percent-decoding") from None


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{"):
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _parse_query(text: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                          encoding="utf-8", errors="strict", max_num_fields=20)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "malformed query string") from None
    query: dict[str, str] = {}
    for key, value in pairs:
        if key in query:
            raise HttpError(400, f"query parameter {key[:20]!r} given twice")
        query[key] = value
    return query


def _id(value: str, what: str) -> str:
    if not ID_RE.fullmatch(value):
        raise HttpError(400, f"{what} must be 1-{MAX_ID_CHARS} letters, digits, _ . or -, "
                             "starting with a letter or digit")
    return value


def _json_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object: UTF-8 without a byte order mark, small and shallow."""
    if len(body) > MAX_BODY_BYTES:
        raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return safejson.loads_object(body, max_bytes=MAX_BODY_BYTES, max_depth=2)
    except safejson.UntrustedJson as exc:
        raise HttpError(400, 'body must be a UTF-8 JSON object like {"tag": "1.4.2"}: '
                             f"{exc}") from None
