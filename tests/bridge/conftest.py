"""Fixtures for the bridge's tests on the real broker (tests/support/broker.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bridge.support import add_simulator_user
from tests.support.broker import Broker


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """Mosquitto from the repository's config, with a ``bridge`` operator and a
    ``simulator`` user (an operator that may also write device telemetry)."""
    with Broker() as broker:
        broker.add_operator("bridge")
        add_simulator_user(broker)
        yield broker
