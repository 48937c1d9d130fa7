"""docs/PROTOCOL.md owns the contract: every value of the wire's enumerations, every
topic and every HTTP route of the code is in it, so a change to the contract in code
that the page does not follow fails here."""

from __future__ import annotations

import enum
import json
import re
import subprocess

import pytest

from edge_agent.protocol.answers import Outcome
from edge_agent.protocol.events import CheckOutcome, EventName, FailureCode
from edge_agent.protocol.state import Availability, Source, UpdateStatus
from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT

DOC = (REPO_ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
OPENAPI = REPO_ROOT / "edge_agent" / "bridge" / "openapi.json"
# How a file would cite the starting contract that once lived beside the repository
# (spelled in parts, so that this file does not cite it itself)
STARTING_CONTRACT = "|".join(("SPEC" + " section", "SPEC" + r"\.md", r"\.\./" + "shared"))
ENUMS: list[type[enum.StrEnum]] = [EventName, CheckOutcome, Outcome, UpdateStatus, Source,
                                   Availability, FailureCode]


def in_backticks(text: str) -> bool:
    return f"`{text}`" in DOC


@pytest.mark.parametrize("wire_enum", ENUMS, ids=lambda e: e.__name__)
def test_every_value_of_the_wire_enumerations_is_documented(
    wire_enum: type[enum.StrEnum],
) -> None:
    values = [str(member) for member in wire_enum]
    assert values
    assert [v for v in values if not in_backticks(v)] == []


def test_every_topic_is_documented() -> None:
    topics = Topics("P")
    shown = [topics.fleet_tag, topics.group_tag("<group>"), topics.device_tag("<id>"),
             topics.fleet_check, topics.device_check("<id>"), topics.device_install("<id>"),
             topics.availability("<id>"), topics.state("<id>"), topics.events("<id>"),
             topics.reply("<id>", "<token>")]
    assert [t for t in shown if t not in DOC] == []


def test_every_http_route_is_documented() -> None:
    paths = json.loads(OPENAPI.read_text(encoding="utf-8"))["paths"]
    routes = [re.sub(r"\{(\w+)\}", r"<\1>", path) for path in paths]
    assert len(routes) >= 8
    assert [r for r in routes if r not in DOC] == []


def test_nothing_points_outside_the_repository() -> None:
    """The repository's docs own the contract: no file cites the starting contract that
    lived outside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert len(tracked) > 50
    citing = [name for name in tracked
              if (REPO_ROOT / name).is_file()
              and re.search(STARTING_CONTRACT,
                            (REPO_ROOT / name).read_text(encoding="utf-8", errors="replace"))]
    assert citing == []
