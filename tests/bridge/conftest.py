"""Fixtures for the bridge's tests on the real broker (tests/support/broker.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edge_agent.bridge.server import Bridge
from tests.bridge.support import ApiClient, add_simulator_user, running_bridge, unique_prefix
from tests.support.broker import Broker, MqttWatcher


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """Mosquitto from the repository's config, with a ``bridge`` operator and a
    ``simulator`` user (an operator that may also write device telemetry)."""
    with Broker() as broker:
        broker.add_operator("bridge")
        add_simulator_user(broker)
        yield broker


# A bridge of its own on the module's broker, under a prefix of its own, with an HTTP
# client and an operator watching every topic under that prefix.
@pytest.fixture
def prefix() -> str:
    return unique_prefix()


@pytest.fixture
def bridge(broker: Broker, prefix: str) -> Iterator[Bridge]:
    with running_bridge(broker, prefix, max_wait_s=30) as bridge:
        yield bridge


@pytest.fixture
def api(bridge: Bridge) -> Iterator[ApiClient]:
    with ApiClient(bridge.url) as client:
        yield client


@pytest.fixture
def watcher(broker: Broker, prefix: str) -> Iterator[MqttWatcher]:
    watcher = MqttWatcher(broker.settings("bridge", prefix=prefix), [f"{prefix}/#"]).start()
    yield watcher
    watcher.close()
