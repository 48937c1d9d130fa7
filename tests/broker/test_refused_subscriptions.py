"""A subscription the broker refuses in its SUBACK (protocol/mqtt.py): logged once, asked
for again with a backoff on the same connection, and taken as soon as the broker grants
it; the agent's link holds its view of the desired tags until every tag subscription is
granted. A real NATS cluster with the shipped nats/ users: a device may not read a group
it is not in, and NATS refuses that subscription in its SUBACK (Mosquitto 2.0's acl_file
grants every subscription and filters on delivery instead, so it cannot show this).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.agent.config import load_settings
from edge_agent.agent.link import AgentLink
from edge_agent.agent.loop import Message
from edge_agent.ctl.errors import CtlError
from edge_agent.ctl.session import REFUSED_GRACE_S, Session
from edge_agent.protocol.messages import RemoteReady, RemoteReset
from edge_agent.protocol.mqtt import BrokerClient
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.broker import MqttWatcher
from tests.support.nats_cluster import NatsCluster, nats_server

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(nats_server() is None,
                                 reason="nats-server is not installed (scripts/stack)")]

DEVICE = "dev-r"
REFUSED = "the broker refused the subscription to"


@pytest.fixture(scope="module")
def cluster() -> Iterator[NatsCluster]:
    with NatsCluster() as started:
        started.add_operator("ops")
        yield started


@pytest.fixture
def broker(cluster: NatsCluster) -> NatsCluster:
    """The device in group blue only; a test may add it to red."""
    cluster.add_device(DEVICE, ["blue"], password=cluster.passwords.get(DEVICE))
    return cluster


@pytest.fixture
def t(test_id: str) -> Topics:
    return Topics(f"t{test_id}")


def test_a_denied_subscription_is_asked_for_again_and_logged_once(
    broker: NatsCluster, t: Topics, caplog: pytest.LogCaptureFixture,
) -> None:
    acks: list[frozenset[str]] = []
    client = BrokerClient(broker.settings(DEVICE, nodes=[0]), subscriptions=[
        t.device_tag(DEVICE), t.group_tag("blue"), t.group_tag("red")],
        on_subscribed=lambda c: acks.append(c.refused_subscriptions))
    caplog.set_level(logging.DEBUG, logger="edge_agent")
    client.start(wait_s=10)
    try:
        refused = client.wait_subscribed(10)
        # NATS answers 0x80 (MQTT 3.1.1 has no reason codes) for a denied subscription
        assert refused == [f"{t.group_tag('red')} (Unspecified error)"]
        # the first answer, then the retries after 1 s and 2 s: refused each time
        wait_until(lambda: len(acks) >= 3, timeout=15, message="two retries")
        assert all(ack == {t.group_tag("red")} for ack in acks)
        warnings = [r for r in caplog.records
                    if r.levelno == logging.WARNING and REFUSED in r.getMessage()]
        assert len(warnings) == 1 and t.group_tag("red") in warnings[0].getMessage()
        assert client.connected  # the same connection all along
    finally:
        client.stop()


def test_a_subscription_is_taken_once_the_broker_grants_it(
    broker: NatsCluster, t: Topics, caplog: pytest.LogCaptureFixture,
) -> None:
    operator = MqttWatcher(broker.settings("ops", nodes=[1]), []).start()
    operator.publish(t.group_tag("red"), "3.0", retain=True)
    received: queue.Queue[bytes] = queue.Queue()
    client = BrokerClient(broker.settings(DEVICE, nodes=[0]), subscriptions=[t.group_tag("red")],
                          on_message=lambda m: received.put(m.payload))
    caplog.set_level(logging.INFO, logger="edge_agent")
    client.start(wait_s=10)
    try:
        assert client.wait_subscribed(10)
        # the operator adds the device to group red and reloads the broker (SIGHUP)
        broker.add_device(DEVICE, ["blue", "red"], password=broker.passwords[DEVICE])
        assert received.get(timeout=20) == b"3.0"  # the retained tag, on the retry
        assert client.refused_subscriptions == frozenset()
        assert any("the broker granted the subscription to" in r.getMessage()
                   for r in caplog.records)
    finally:
        client.stop()
        operator.close()


def test_edge_ctl_waits_out_a_passing_refusal_and_names_a_lasting_one(
    broker: NatsCluster, t: Topics,
) -> None:
    """edge-ctl logged in as a device may not read every device's state: refused, and
    said so once the refusal has outlasted REFUSED_GRACE_S. Made an operator within the
    grace (as a cluster node that settles), the same login goes on."""
    settings = broker.settings(DEVICE, prefix=t.prefix, nodes=[0])
    started = time.monotonic()
    with pytest.raises(CtlError, match=re.escape(f"refused the subscription to {t.all_states}")):
        Session(settings, [t.all_states])
    assert time.monotonic() - started >= REFUSED_GRACE_S
    grant = threading.Timer(2.0, broker.add_device, (DEVICE,),
                            {"operator": True, "password": broker.passwords[DEVICE]})
    grant.start()
    try:
        Session(settings, [t.all_states]).close()  # refused at first, then granted
    finally:
        grant.join()


def test_the_agent_waits_for_every_tag_subscription_before_its_view_is_complete(
    broker: NatsCluster, t: Topics, tmp_path: Path,
) -> None:
    """The device is in group red, but the broker's ACL does not say so yet: without its
    group's tag the retained replay is not the whole truth, so no RemoteReady until the
    operator fixes the ACL."""
    settings = load_settings({
        "CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path),
        "DEVICE_ID": DEVICE, "DEVICE_GROUPS": "blue,red",
        **broker.agent_env(DEVICE, t.prefix, nodes=[0]),
    })
    inbox: queue.Queue[Message] = queue.Queue()
    link = AgentLink(settings, inbox)
    link.start()
    taken: list[Message] = []

    def take() -> list[Message]:
        while not inbox.empty():
            taken.append(inbox.get_nowait())
        return taken
    try:
        wait_until(lambda: link.broker.refused_subscriptions
                   == {t.group_tag("red"), t.group_agent("red")},
                   timeout=15, message="group red refused")
        time.sleep(3.5)  # the retries after 1 s and 2 s: refused too
        assert any(isinstance(m, RemoteReset) for m in take())
        assert not any(isinstance(m, RemoteReady) for m in take())
        broker.add_device(DEVICE, ["blue", "red"], password=broker.passwords[DEVICE])
        wait_until(lambda: any(isinstance(m, RemoteReady) for m in take()),
                   timeout=20, message="RemoteReady once group red is granted")
        assert link.broker.refused_subscriptions == frozenset()
    finally:
        link.stop()
