"""LOG_FORMAT=json: one object per line, carrying the request id of the update."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.logs import REQUEST_ID, JsonFormatter, RequestIdFilter
from edge_agent.protocol.messages import RemoteTagMessage
from edge_agent.protocol.state import Source
from tests.support.device import Device, publish


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_current_request_id(json_log: io.StringIO) -> None:
    log = logging.getLogger("edge_agent.test")
    token = REQUEST_ID.set("r-1")
    try:
        log.info("inside %s", "the update")
    finally:
        REQUEST_ID.reset(token)
    log.warning("after it")
    log.info("explicit", extra={"request_id": "r-2"})
    first, second, third = lines(json_log)
    assert (first["message"], first["request_id"], first["level"]) == ("inside the update", "r-1", "INFO")
    assert "request_id" not in second
    assert third["request_id"] == "r-2"


def test_every_line_of_an_update_names_its_request(
    json_log: io.StringIO, unique_repo: str, container_name: str, tmp_path: Path
) -> None:
    device = Device(repo=unique_repo, name=container_name, data_dir=tmp_path / "data")
    publish(device.repo, "2.0", "2.0")
    agent = device.agent()
    agent.handle(RemoteTagMessage(Source.DEVICE, b'{"tag": "2.0", "request_id": "req-42"}'))
    agent.check()

    records = lines(json_log)
    # a first install logs "installing <name>: <tag>", a change "updating <name>: a -> b"
    started = next(i for i, r in enumerate(records)
                   if r["message"].startswith(("updating", "installing")))
    done = next(i for i, r in enumerate(records) if "update_succeeded" in r["message"])
    assert started < done
    assert {r.get("request_id") for r in records[started:done + 1]} == {"req-42"}
