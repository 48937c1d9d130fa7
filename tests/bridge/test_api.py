"""Unit tests of routing, auth and validation (Api.handle; no sockets, no broker).

The publisher here only records what would be published; the real broker is in
test_bridge_broker.py and test_bridge_agents.py.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from edge_agent.bridge.api import Api, Request, Response
from edge_agent.bridge.fleet import Fleet
from edge_agent.protocol.mqtt import BrokerUnavailable
from edge_agent.protocol.state import DeferReason
from edge_agent.protocol.topics import ID_RE, Topics
from tests.support.documents import state

TOKEN = "s3cret-token-for-tests"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Recorder:
    """Stands in for BridgeLink: records publishes; ``fail`` makes them raise."""

    def __init__(self) -> None:
        self.connected = True
        self.fail: str | None = None
        self.published: list[tuple[str, bytes, bool]] = []
        self.on_publish: Any = None

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if self.fail:
            raise BrokerUnavailable(self.fail)
        self.published.append((topic, payload, retain))
        if self.on_publish:
            self.on_publish(topic, payload)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def fleet() -> Fleet:
    return Fleet(Topics("edge"))


@pytest.fixture
def api(recorder: Recorder, fleet: Fleet) -> Api:
    ids = iter(f"req{i}" for i in range(1000))
    return Api(TOKEN, Topics("edge"), fleet, recorder, max_wait_s=5,
               new_request_id=lambda: next(ids), now=lambda: 0.0)


def call(api: Api, method: str, target: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, Response]:
    raw = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    response = api.handle(Request(method, target, AUTH if headers is None else headers, raw))
    data = json.loads(response.body) if response.content_type == "application/json" else None
    return response.status, data, response


# -- auth -----------------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Bearer wrong"},
    {"authorization": TOKEN},
    {"authorization": f"Basic {TOKEN}"},
    {"authorization": f"Bearer {TOKEN}x"},
    {"authorization": "Bearer \udcff"},
])
def test_bad_token_is_401_and_nothing_is_published(
    api: Api, recorder: Recorder, headers: dict[str, str]
) -> None:
    status, data, response = call(api, "PUT", "/api/v1/devices/dev1/tag", {"tag": "2.0"}, headers)
    assert status == 401
    assert data == {"error": "missing or invalid bearer token"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert recorder.published == []


def test_auth_is_checked_before_the_route(api: Api) -> None:
    assert call(api, "GET", "/api/v1/nothing", headers={})[0] == 401
    assert call(api, "GET", "/api/v1/nothing")[0] == 404


def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    status, _, _ = call(api, "GET", "/api/v1/devices", headers={
        "authorization": f"bearer {TOKEN}"})
    assert status == 200


def test_healthz_openapi_and_page_need_no_token(api: Api, recorder: Recorder) -> None:
    status, data, _ = call(api, "GET", "/healthz", headers={})
    assert status == 200 and data["broker"] == "connected"
    recorder.connected = False
    status, data, _ = call(api, "GET", "/healthz", headers={})
    assert status == 503 and data["status"] == "unavailable"
    status, data, _ = call(api, "GET", "/openapi.json", headers={})
    assert status == 200 and data["openapi"].startswith("3.")
    assert data["components"]["parameters"]["wait"]["schema"]["maximum"] == 5
    status, _, response = call(api, "GET", "/", headers={})
    assert status == 200 and response.content_type.startswith("text/html")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]


# -- writes ---------------------------------------------------------------------------
def test_put_device_tag_publishes_retained_json(api: Api, recorder: Recorder) -> None:
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag", {"tag": "2.0"})
    assert status == 202
    warning = data.pop("warning")
    assert data.pop("warnings") == [warning]  # every warning is in the list
    assert data == {"request_id": "req0", "scope": "device", "target": "dev1", "tag": "2.0"}
    assert "device 'dev1' has never reported" in warning  # nothing has reported as dev1
    [(topic, payload, retain)] = recorder.published
    assert topic == "edge/devices/dev1/tag" and retain
    assert json.loads(payload) == {"tag": "2.0", "request_id": "req0",
                                   "issued_at": "1970-01-01T00:00:00.000Z"}


def test_client_request_id_is_used(api: Api, recorder: Recorder) -> None:
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag",
                           {"tag": "2.0", "request_id": "deploy-42"})
    assert status == 202 and data["request_id"] == "deploy-42"


def test_percent_encoded_ids_are_decoded(api: Api, recorder: Recorder) -> None:
    status, data, _ = call(api, "PUT", "/api/v1/devices/pi%2D4.lab_1/tag", {"tag": "1"})
    assert status == 202 and data["target"] == "pi-4.lab_1"
    assert recorder.published[0][0] == "edge/devices/pi-4.lab_1/tag"


@pytest.mark.parametrize("body", [
    {"tag": "bad tag"},
    {"tag": "-x"},
    {"tag": "x" * 129},
    {"tag": "1.0\n"},
    {"tag": "sha256:abc"},
    {"tag": ""},
    {"tag": None},
    {"tag": 2},
    {},
    {"tag": "1.0", "extra": 1},
    {"tag": "1.0", "request_id": None},
    {"tag": "1.0", "request_id": "has space"},
    {"tag": "1.0", "request_id": "x" * 129},
    [1],
    "1.0",
    b"",
    b"{",
    b"\xff",
    b"[" * 4000,
])
def test_invalid_body_is_400_and_nothing_is_published(
    api: Api, recorder: Recorder, body: Any
) -> None:
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag", body)
    assert status == 400, data
    assert isinstance(data["error"], str)
    assert recorder.published == []


def test_big_body_is_413(api: Api, recorder: Recorder) -> None:
    status, _, _ = call(api, "PUT", "/api/v1/fleet/tag", b" " * 5000)
    assert status == 413 and recorder.published == []


@pytest.mark.parametrize("device", ["a%2Fb", "%23", "a+b", "%2B", ".", "..", "%00", "a%0Ab",
                                    "b%C3%BCro", "a%20b", "-a", "x" * 65, "", "%FF"])
def test_invalid_device_id_is_400(api: Api, recorder: Recorder, device: str) -> None:
    status, _, _ = call(api, "PUT", f"/api/v1/devices/{device}/tag", {"tag": "1.0"})
    assert status == 400
    assert recorder.published == []


@pytest.mark.parametrize("wait", ["0", "-1", "abc", "nan", "inf", "6", "1e400", ""])
def test_invalid_wait_is_400(api: Api, recorder: Recorder, wait: str) -> None:
    status, _, _ = call(api, "PUT", f"/api/v1/devices/dev1/tag?wait={wait}", {"tag": "1.0"})
    assert status == 400
    assert recorder.published == []


def test_wait_given_twice_is_400(api: Api) -> None:
    assert call(api, "PUT", "/api/v1/devices/d/tag?wait=1&wait=2", {"tag": "1"})[0] == 400


def test_wait_on_group_or_fleet_is_400(api: Api, recorder: Recorder) -> None:
    assert call(api, "PUT", "/api/v1/groups/g/tag?wait=1", {"tag": "1"})[0] == 400
    assert call(api, "PUT", "/api/v1/fleet/tag?wait=1", {"tag": "1"})[0] == 400
    assert recorder.published == []


def test_group_fleet_delete_and_check_topics(api: Api, recorder: Recorder) -> None:
    assert call(api, "PUT", "/api/v1/groups/lab/tag", {"tag": "3"})[0] == 202
    assert call(api, "PUT", "/api/v1/fleet/tag", {"tag": "4"})[0] == 202
    assert call(api, "DELETE", "/api/v1/devices/d/tag")[1] == {
        "scope": "device", "target": "d", "cleared": True}
    assert call(api, "DELETE", "/api/v1/groups/lab/tag")[0] == 200
    assert call(api, "DELETE", "/api/v1/fleet/tag")[0] == 200
    assert call(api, "POST", "/api/v1/devices/d/check")[0] == 202
    assert call(api, "POST", "/api/v1/fleet/check")[0] == 202
    assert [(t, r) for t, _, r in recorder.published] == [
        ("edge/groups/lab/tag", True),
        ("edge/fleet/tag", True),
        ("edge/devices/d/tag", True),
        ("edge/groups/lab/tag", True),
        ("edge/fleet/tag", True),
        ("edge/devices/d/cmd/check", False),
        ("edge/fleet/cmd/check", False),
    ]
    assert [p for _, p, _ in recorder.published][2:5] == [b"", b"", b""]
    assert json.loads(recorder.published[5][1])["request_id"] == "req2"


def test_broker_down_is_503_for_writes_but_reads_work(api: Api, recorder: Recorder) -> None:
    recorder.fail = "not connected to the MQTT broker; nothing was published"
    recorder.connected = False
    for method, target in [("PUT", "/api/v1/devices/d/tag"), ("PUT", "/api/v1/fleet/tag"),
                           ("DELETE", "/api/v1/devices/d/tag"), ("POST", "/api/v1/fleet/check"),
                           ("PUT", "/api/v1/devices/d/tag?wait=1")]:
        status, data, response = call(api, method, target, {"tag": "1"} if method == "PUT" else None)
        assert status == 503, (method, target)
        assert "broker" in data["error"]
        assert response.headers["Retry-After"]
    status, data, _ = call(api, "GET", "/api/v1/devices")
    assert status == 200 and data == {"broker_connected": False, "devices": []}
    assert api.fleet.waiting == 0


# -- routing --------------------------------------------------------------------------
def test_unknown_route_404_and_wrong_method_405(api: Api) -> None:
    assert call(api, "GET", "/nope")[0] == 404
    assert call(api, "GET", "/api/v1/devices/d/tag/x")[0] == 404
    status, _, response = call(api, "POST", "/api/v1/devices/d/tag")
    assert status == 405 and response.headers["Allow"] == "DELETE, PUT"
    status, _, response = call(api, "PATCH", "/api/v1/devices")
    assert status == 405 and response.headers["Allow"] == "GET, HEAD"
    assert call(api, "POST", "/healthz")[0] == 405
    assert call(api, "DELETE", "/")[0] == 405


def test_every_json_answer_has_security_headers(api: Api) -> None:
    for target in ["/healthz", "/api/v1/devices", "/nope"]:
        _, _, response = call(api, "GET", target)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store" or target == "/openapi.json"


# -- reads ----------------------------------------------------------------------------
def test_list_and_get_device(api: Api, fleet: Fleet) -> None:
    fleet.handle("edge/devices/dev1/state", json.dumps(state()).encode(), True)
    fleet.handle("edge/devices/dev1/availability", b"online", True)
    status, data, _ = call(api, "GET", "/api/v1/devices")
    assert status == 200 and data["broker_connected"] is True
    [device] = data["devices"]
    assert device["id"] == "dev1" and device["online"] is True
    assert device["state"]["installed_version"] == "2.0"
    status, one, _ = call(api, "GET", "/api/v1/devices/dev1")
    assert status == 200 and one.pop("recent_events") == []  # the detail only
    assert one == device
    assert call(api, "GET", "/api/v1/devices/unknown")[0] == 404


# -- ?wait ----------------------------------------------------------------------------
def answer_with(recorder: Recorder, fleet: Fleet, make: Any) -> None:
    """When the tag is published, the 'device' answers from another thread."""
    def on_publish(topic: str, payload: bytes) -> None:
        request_id = json.loads(payload)["request_id"]
        for kind, body in make(request_id):
            threading.Timer(0.01, fleet.handle,
                            (f"edge/devices/dev1/{kind}", json.dumps(body).encode())).start()
    recorder.on_publish = on_publish


def test_wait_200_with_state(api: Api, recorder: Recorder, fleet: Fleet) -> None:
    answer_with(recorder, fleet, lambda rid: [
        ("state", state(desired={"request_id": rid}))])
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag?wait=5", {"tag": "2.0"})
    assert status == 200, data
    assert data["state"]["installed_version"] == "2.0" and data["request_id"] == "req0"
    assert fleet.waiting == 0


def test_wait_409_on_rollback(api: Api, recorder: Recorder, fleet: Fleet) -> None:
    answer_with(recorder, fleet, lambda rid: [
        ("events", {"event": "rolled_back", "request_id": rid, "reason": "unhealthy"})])
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag?wait=5", {"tag": "2.0"})
    assert status == 409
    assert data["error"] == "rolled_back: unhealthy" and data["event"] == "rolled_back"


def test_wait_504_when_nobody_answers(api: Api, recorder: Recorder, fleet: Fleet) -> None:
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag?wait=0.05", {"tag": "2.0"})
    assert status == 504
    assert "did not answer within 0.05 s" in data["error"] and data["state"] is None
    assert len(recorder.published) == 1
    assert fleet.waiting == 0


def test_id_pattern_matches_openapi(api: Api) -> None:
    _, doc, _ = call(api, "GET", "/openapi.json")
    for name in ("deviceId", "group"):
        assert doc["components"]["parameters"][name]["schema"]["pattern"] == ID_RE.pattern


def test_openapi_vocabularies_match_the_enums(api: Api) -> None:
    """A value the agents send and the document does not list would fail a client that
    validates against it (an update deferred for a reason added later, say)."""
    _, doc, _ = call(api, "GET", "/openapi.json")
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if path.endswith("deferred.properties.reason"):
                found.append(node["enum"])
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, path)
    walk(doc, "")
    assert found and all(enum == [str(r) for r in DeferReason] for enum in found), found


def test_wait_504_names_the_error_the_device_retries(
    api: Api, recorder: Recorder, fleet: Fleet
) -> None:
    answer_with(recorder, fleet, lambda rid: [
        ("state", state(desired={"request_id": rid}, installed_version="1.0",
                        update={"status": "error", "last_error": "registry unreachable"}))])
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag?wait=0.5", {"tag": "2.0"})
    assert status == 504
    assert data["error"].endswith("(it is retrying after: registry unreachable)")


def test_a_device_that_reported_gets_no_warning(api: Api, fleet: Fleet) -> None:
    fleet.handle("edge/devices/dev1/state", json.dumps(state()).encode(), True)
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev1/tag", {"tag": "2.0"})
    assert status == 202 and "warning" not in data
    status, data, _ = call(api, "PUT", "/api/v1/devices/dev2/tag", {"tag": "2.0"})
    assert status == 202 and "dev2" in data["warning"]


def test_spread_goes_into_group_and_fleet_payloads_and_bad_values_are_400(
    api: Api, recorder: Recorder,
) -> None:
    status, body, _ = call(api, "PUT", "/api/v1/fleet/tag?spread=600", {"tag": "4"})
    assert status == 202 and body["spread"] == 600
    assert call(api, "PUT", "/api/v1/groups/lab/tag?spread=0", {"tag": "4"})[0] == 202
    assert call(api, "POST", "/api/v1/fleet/check?spread=30")[0] == 202
    for bad in ("-1", "86401", "1.5", "1e3", "", "x"):
        assert call(api, "PUT", f"/api/v1/fleet/tag?spread={bad}", {"tag": "4"})[0] == 400
        assert call(api, "POST", f"/api/v1/fleet/check?spread={bad}")[0] == 400
    # a device addressed alone takes no spread
    assert call(api, "PUT", "/api/v1/devices/d/tag?spread=5", {"tag": "4"})[0] == 400
    payloads = [json.loads(p) for _, p, _ in recorder.published]
    assert payloads[0]["spread"] == 600 and "spread" not in payloads[1]
    assert payloads[2]["spread"] == 30 and len(payloads) == 3
