"""hypothesis over every parser of untrusted input in the bridge: device messages
(``Fleet.handle``), request heads (``wire.parse_head``) and requests (``Api.handle``).
No sockets, no broker: the same code the real-stack tests drive, at thousands of inputs.
"""

from __future__ import annotations

import json
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from edge_agent.bridge.api import Api, Request
from edge_agent.bridge.fleet import Fleet
from edge_agent.bridge.wire import BadRequest, parse_head
from edge_agent.protocol.mqtt import BrokerUnavailable
from edge_agent.protocol.topics import Topics
from tests.bridge.support import schema_validator, state_document, strict_json

T = Topics("edge")
TOKEN = "fuzz-token-0123456789"
DEVICE = schema_validator("Device")
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- device data ---------------------------------------------------------------------
timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.builds(lambda y, off: f"{y:04d}-12-31T23:59:59{off}",
              st.integers(1, 9999), st.sampled_from(["Z", "+14:00", "-23:59", "+23:59", ""])),
    st.text(max_size=40),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**300),
                                                         max_value=10**300),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=50),
    st.sampled_from(["idle", "idle x-evil", "healthy", '"><img src=x>', "\ud800", "\x1b[2J",
                     "\u202e", "running", "sha256:" + "0" * 64]),
    timestamps,
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(max_size=10) | st.sampled_from(
        ["ts", "update", "running", "status", "health", "progress", "desired", "event",
         "request_id", "tag", "reason", "error", "fallback", "active"]), inner, max_size=6),
), max_leaves=30)


@st.composite
def agent_like(draw: st.DrawFn) -> dict[str, Any]:
    """An agent state document with some fields replaced by anything at all."""
    document: dict[str, Any] = state_document("dev", "1.0")
    for _ in range(draw(st.integers(0, 6))):
        path = draw(st.sampled_from([
            ("ts",), ("device_id",), ("update",), ("update", "status"),
            ("update", "progress"), ("update", "last_error"), ("running", "health"),
            ("running", "status"), ("running", "restart_count"), ("desired", "request_id"),
            ("fallback", "active"), ("update_percentage",), ("in_progress",), ("extra",)]))
        target = document
        for key in path[:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path[-1]] = draw(json_values)
    return document


def raw_json(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


payloads = st.one_of(
    st.binary(max_size=300),
    json_values.map(raw_json),
    agent_like().map(raw_json),
    st.builds(lambda doc, enc: json.dumps(doc).encode(enc), agent_like(),
              st.sampled_from(["utf-16", "utf-16-be", "utf-32", "utf-8-sig", "latin-1"])),
    st.builds(lambda n: b'{"update":' + b"[" * n + b"]" * n + b"}", st.integers(1, 20_000)),
    st.sampled_from([b'{"update": {"progress": 1e999}}', b'{"update_percentage": NaN}',
                     b'{"running": {"restart_count": 1' + b"0" * 5000 + b"}}",
                     b'{"ts": "9999-12-31T23:59:59-23:59"}', b"", b"online", b"offline",
                     b'{"event": "rolled_back", "request_id": "r1"}']),
)
messages = st.lists(st.tuples(
    st.sampled_from(["dev", "other", "x" * 64, "-bad", "a b"]),
    st.sampled_from(["state", "availability", "events", "state/x", "tag"]),
    payloads, st.booleans()), min_size=1, max_size=8)


def check_fleet(fleet: Fleet) -> list[dict[str, Any]]:
    """The list is strict JSON in the documented schema, and agrees with each device."""
    listing: list[dict[str, Any]] = strict_json(fleet.list_json())
    for device in listing:
        DEVICE(device)
        assert fleet.device(device["id"]) == device
    return listing


@FUZZ
@given(messages)
def test_no_device_message_breaks_the_fleet(batch: list[tuple[str, str, bytes, bool]]) -> None:
    fleet = Fleet(T)
    waiter = fleet.add_waiter("dev", "r1", "1.0")
    good = state_document("other", "2.0")
    fleet.handle(T.state("other"), json.dumps(good).encode(), True)
    for device, kind, payload, retained in batch:
        fleet.handle(f"edge/devices/{device}/{kind}", payload, retained)
    listing = check_fleet(fleet)
    for entry in listing:
        assert entry["id"] in ("dev", "other", "x" * 64)
    waiter.wait(0)  # whatever settled it, it is an Answer or None
    # a good state from every device replaces whatever it published before, entirely
    for device in ("dev", "other", "x" * 64):
        document = state_document(device, "3.0")
        fleet.handle(T.state(device), json.dumps(document).encode(), False)
        shown = fleet.device(device)
        assert shown is not None and shown["state"] == document
        assert shown["last_seen"] is not None
    check_fleet(fleet)


@FUZZ
@given(agent_like(), st.booleans())
def test_every_state_is_shown_in_the_schema(document: dict[str, Any], retained: bool) -> None:
    fleet = Fleet(T)
    fleet.handle(T.state("dev"), raw_json(document), retained)
    fleet.handle(T.events("dev"), raw_json({**document, "event": "rolled_back"}), retained)
    check_fleet(fleet)


# -- request heads ---------------------------------------------------------------------
header_names = st.sampled_from(["Host", "Content-Length", "content-length", "Transfer-Encoding",
                                "Authorization", "Expect", "Connection", "X-A", "Host ",
                                " Host", "Content-Length\x00", "Accept"])
header_values = st.one_of(
    st.sampled_from(["13", "0", "1_3", "+13", "-1", "0x1", "13, 13", " 13", "13 ", "chunked",
                     "100-continue", "close", "keep-alive", "\u0661", "1e1", ""]),
    st.text(max_size=20),
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD", "get", "G T", ""]))
    target = draw(st.sampled_from(["/api/v1/devices", "/api/v1/devices/a/tag?wait=1", "/",
                                   "*", "http://x/", "/a b", "/\xe9", ""]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 ", ""]))
    lines = [f"{method} {target} {version}"]
    lines += [f"{name}:{value}" for name, value in draw(st.lists(
        st.tuples(header_names, header_values), max_size=6))]
    separator = draw(st.sampled_from(["\r\n", "\n", "\r\n", "\r\n "]))
    return separator.join(lines).encode("utf-8", "surrogatepass")


@FUZZ
@given(st.one_of(st.binary(max_size=400), request_heads()))
def test_request_heads_parse_or_are_refused_never_anything_else(head: bytes) -> None:
    try:
        parsed = parse_head(head)
    except BadRequest as exc:
        assert 400 <= exc.status < 500 and exc.message
        return
    # what is accepted is unambiguous
    assert parsed.version in ("1.0", "1.1")
    assert parsed.target and parsed.target.isascii() and " " not in parsed.target
    assert "transfer-encoding" not in parsed.headers
    length = parsed.headers.get("content-length")
    assert length is None or (length.isascii() and length.isdigit())
    assert parsed.content_length == int(length or 0)
    assert head.count(b"\r\n") == head.count(b"\n")
    lowered = head.lower()
    assert lowered.count(b"\ncontent-length:") <= 1 and lowered.count(b"\nhost:") <= 1


# -- requests ------------------------------------------------------------------------------
class Recorder:
    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if not topic.startswith("edge/"):
            raise BrokerUnavailable("outside the prefix")
        self.published.append((topic, payload))


segments = st.one_of(st.sampled_from(["api", "v1", "devices", "groups", "fleet", "tag",
                                      "check", "dev1", "%2F", "%00", "..", "%FF", "a%20b"]),
                     st.text(max_size=8).map(lambda t: t.encode("utf-8", "surrogatepass")
                                             .decode("latin-1")))
queries = st.one_of(st.just(""), st.sampled_from(["?wait=1", "?wait=0.001", "?wait=1_0",
                                                   "?wait=nan", "?wait=1&wait=2", "?x=1",
                                                   "?wait", "?=", "?%ff=1", "?wait=1e1"]),
                    st.text(max_size=20).map(lambda t: "?" + t))
bodies = st.one_of(st.binary(max_size=200), json_values.map(raw_json),
                   st.fixed_dictionaries({"tag": st.text(max_size=10)},
                                         optional={"request_id": st.text(max_size=10)})
                   .map(lambda d: json.dumps(d).encode()))


@FUZZ
@given(st.sampled_from(["GET", "PUT", "DELETE", "POST", "HEAD", "PATCH", "QUERY"]),
       st.lists(segments, min_size=1, max_size=6), queries, bodies,
       st.sampled_from([f"Bearer {TOKEN}", "", "Bearer x", f"bearer  {TOKEN} "]))
def test_no_request_is_a_server_error(method: str, path: list[str], query: str, body: bytes,
                                      auth: str) -> None:
    recorder = Recorder()
    api = Api(TOKEN, T, Fleet(T), recorder, max_wait_s=0.01)
    target = "/" + "/".join(path) + query
    response = api.handle(Request(method, target, {"authorization": auth}, body))
    assert response.status < 500 or response.status == 504, (target, response.body)
    if response.content_type == "application/json":
        data = strict_json(response.body)
        assert response.status < 400 or isinstance(data["error"], str)
    if response.status >= 400 and response.status != 504:
        assert recorder.published == []
