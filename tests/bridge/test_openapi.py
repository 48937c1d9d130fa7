"""The shipped OpenAPI document matches the implementation (routes, patterns, auth)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from edge_agent.bridge.api import ROUTES, openapi_document
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import REQUEST_ID_RE, validate_tag
from edge_agent.protocol.topics import ID_PATTERN

DOC = openapi_document(42.0)
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def test_every_route_is_documented_and_nothing_else() -> None:
    routes = {(r.method, "/" + "/".join(r.pattern)) for r in ROUTES}
    assert operations(DOC) == routes | {("GET", "/")}


def test_api_operations_need_the_token_and_document_401() -> None:
    assert DOC["security"] == [{"bearer": []}]
    for path, item in DOC["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            if path.startswith("/api/"):
                assert "security" not in operation, (method, path)
                assert "401" in operation["responses"], (method, path)
            elif path == "/metrics":  # the API token, or the read-only metrics token
                assert operation["security"] == [{"bearer": []}, {"metricsBearer": []}]
                assert "401" in operation["responses"]
            else:
                assert operation["security"] == [], (method, path)


def test_patterns_are_the_code_s() -> None:
    params = DOC["components"]["parameters"]
    assert params["deviceId"]["schema"]["pattern"] == ID_PATTERN
    assert params["group"]["schema"]["pattern"] == ID_PATTERN
    assert params["wait"]["schema"]["maximum"] == 42.0
    body = DOC["components"]["schemas"]["TagBody"]["properties"]
    assert body["request_id"]["pattern"] == REQUEST_ID_RE.pattern


@pytest.mark.parametrize("tag", [
    "1.4.2", "latest", "_x", "A" * 128, "A" * 129, "-x", ".x", "a b", "", "v1\n", "1.0:2",
    "sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha256:" + "a" * 63, "ü",
])
def test_documented_tag_pattern_agrees_with_validate_tag(tag: str) -> None:
    pattern = DOC["components"]["schemas"]["TagBody"]["properties"]["tag"]["pattern"]
    try:
        validate_tag(tag)
        valid = True
    except TagError:
        valid = False
    assert bool(re.fullmatch(pattern, tag)) == valid
