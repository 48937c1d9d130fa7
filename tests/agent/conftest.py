"""Fixtures for the agent's tests on a real Mosquitto (tests/support/broker.py): a broker
per module with the operator ``OPERATOR``, a topic prefix per test, and that operator
watching everything under it. A module that needs another broker defines its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.broker import OPERATOR, Broker, MqttWatcher


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_operator(OPERATOR)
        yield started


@pytest.fixture
def prefix(test_id: str) -> str:
    return f"t{test_id}"


@pytest.fixture
def watcher(broker: Broker, prefix: str) -> Iterator[MqttWatcher]:
    """The operator, subscribed to everything under the test's prefix."""
    watching = MqttWatcher(broker.settings(OPERATOR, prefix=prefix), [f"{prefix}/#"]).start()
    yield watching
    watching.close()
