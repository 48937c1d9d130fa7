"""Fixtures of the edge-ctl tests: one real Mosquitto (the shipped configuration and
ACL) per test module, with the operator ``ops``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.broker import Broker

OPERATOR = "ops"


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_operator(OPERATOR)
        yield started
