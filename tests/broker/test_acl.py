"""The shipped ACL (mosquitto/acl plus users made with mosquitto/add-device): a device
reads only its own, its groups' and the fleet's desired topics and writes only its own
telemetry; an operator may write desired tags. Each denial has a positive control, so
a broker that let everything through (or nothing) fails the test."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from edge_agent.agent.discovery import discovery_topic
from edge_agent.protocol.mqtt import MqttConnectError, connect_client, disconnect_client
from edge_agent.protocol.topics import Topics
from tests.support import wait_until
from tests.support.broker import ADD_DEVICE, Broker, MqttWatcher, text_is

QUIET_S = 1.0  # how long "nothing arrives" is watched after a positive control arrived


pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    with Broker() as started:
        started.add_device("dev-a", ["blue"])
        started.add_device("dev-b", ["green"])
        started.add_operator("ops")
        yield started


@pytest.fixture
def t(test_id: str) -> Topics:
    """Topics under a prefix of this test's own."""
    return Topics(f"t{test_id}")


def watcher(broker: Broker, user: str, topics: list[str], t: Topics) -> MqttWatcher:
    return MqttWatcher(broker.settings(user, prefix=t.prefix), topics).start()


def test_device_reads_only_its_own_group_and_fleet_desired_topics(
    broker: Broker, t: Topics,
) -> None:
    ops = watcher(broker, "ops", [], t)
    a = watcher(broker, "dev-a", [f"{t.prefix}/#", t.device_tag("dev-b"), t.group_tag("green"),
                                  t.device_tag("dev-a"), t.group_tag("blue"), t.fleet_tag,
                                  t.state("dev-b"), t.all_states, t.device_check("dev-b")], t)
    b = watcher(broker, "dev-b", [], t)
    try:
        ops.publish(t.device_tag("dev-b"), "9.9", retain=True)
        ops.publish(t.group_tag("green"), "9.9", retain=True)
        ops.publish(t.device_check("dev-b"), "")
        b.publish(t.state("dev-b"), '{"secret": true}', retain=True)
        b.publish(t.events("dev-b"), '{"event": "x"}')
        # positive controls, published last: once they are in, the rest had its chance
        ops.publish(t.device_tag("dev-a"), "1.0", retain=True)
        ops.publish(t.group_tag("blue"), "1.1", retain=True)
        ops.publish(t.fleet_tag, "1.2", retain=True)
        for topic in (t.device_tag("dev-a"), t.group_tag("blue"), t.fleet_tag):
            a.wait_for(topic, timeout=10)
        time.sleep(QUIET_S)
        seen = {m.topic for m in a.messages}
        assert seen == {t.device_tag("dev-a"), t.group_tag("blue"), t.fleet_tag}, seen
    finally:
        for client in (ops, a, b):
            client.close()


def test_device_cannot_write_another_devices_topics_or_desired_tags(
    broker: Broker, t: Topics,
) -> None:
    ops = watcher(broker, "ops", [f"{t.prefix}/#"], t)
    a = watcher(broker, "dev-a", [], t)
    try:
        forged = [t.device_tag("dev-b"), t.fleet_tag, t.group_tag("blue"),
                  t.device_install("dev-b"), t.availability("dev-b"), t.state("dev-b"),
                  t.events("dev-b"), t.reply("dev-b", "x"), t.device_tag("dev-a")]
        for topic in forged:
            a.publish(topic, "forged", retain=topic.endswith(("/tag", "/state")))
        # positive control: its own telemetry goes through
        own = [t.availability("dev-a"), t.state("dev-a"), t.events("dev-a"),
               t.reply("dev-a", "x")]
        for topic in own:
            a.publish(topic, "mine")
        for topic in own:
            ops.wait_for(topic, timeout=10)
        time.sleep(QUIET_S)
        assert [m.topic for m in ops.messages if m.text == "forged"] == []
    finally:
        ops.close()
        a.close()


def test_operator_sets_desired_tags_and_reads_all_telemetry(broker: Broker, t: Topics) -> None:
    ops = watcher(broker, "ops", [f"{t.prefix}/#"], t)
    b = watcher(broker, "dev-b", [t.device_tag("dev-b"), t.group_tag("green"), t.fleet_tag], t)
    try:
        ops.publish(t.device_tag("dev-b"), "2.0", retain=True)
        ops.publish(t.group_tag("green"), "2.1", retain=True)
        ops.publish(t.fleet_tag, "2.2", retain=True)
        for topic, tag in ((t.device_tag("dev-b"), "2.0"), (t.group_tag("green"), "2.1"),
                           (t.fleet_tag, "2.2")):
            b.wait_for(topic, text_is(tag), timeout=10)
        b.publish(t.state("dev-b"), "{}")
        ops.wait_for(t.state("dev-b"), timeout=10)
    finally:
        ops.close()
        b.close()


def test_no_anonymous_access_and_a_wrong_password_is_refused_clearly(broker: Broker) -> None:
    with pytest.raises(MqttConnectError, match="refused the connection: Not authorized"):
        connect_client(broker.settings(None), "anonymous", wait_s=10)
    with pytest.raises(MqttConnectError, match="check MQTT_USERNAME and MQTT_PASSWORD"):
        connect_client(broker.settings("dev-a", password="wrong"), "wrong", wait_s=10)


def test_add_device_again_replaces_the_users_groups(broker: Broker, t: Topics) -> None:
    broker.add_device("dev-c", ["blue"])
    broker.add_device("dev-c", ["green"])  # moved to another group
    acl = (broker.config_dir / "acl").read_text()
    assert acl.splitlines().count("user dev-c") == 1
    ops = watcher(broker, "ops", [], t)
    c = watcher(broker, "dev-c", [t.group_tag("blue"), t.group_tag("green")], t)
    try:
        ops.publish(t.group_tag("blue"), "3.0", retain=True)
        ops.publish(t.group_tag("green"), "3.1", retain=True)
        c.wait_for(t.group_tag("green"), timeout=10)
        time.sleep(QUIET_S)
        assert [m.topic for m in c.messages] == [t.group_tag("green")]
    finally:
        ops.close()
        c.close()


def test_dotted_device_ids_may_publish_home_assistant_discovery(
    broker: Broker, t: Topics,
) -> None:
    broker.add_device("dev.d")
    ha = watcher(broker, "ops", ["homeassistant/update/#"], t)
    d = watcher(broker, "dev.d", [], t)
    try:
        d.publish(discovery_topic("other"), "forged")
        d.publish(discovery_topic("dev.d"), "{}")  # homeassistant/update/dev_d/app/config
        ha.wait_for(discovery_topic("dev.d"), timeout=10)
        time.sleep(QUIET_S)
        assert [m.topic for m in ha.messages] == [discovery_topic("dev.d")]
    finally:
        ha.close()
        d.close()


def test_a_removed_device_can_no_longer_log_in(broker: Broker) -> None:
    broker.add_device("dev-gone")
    subprocess.run([str(ADD_DEVICE), "--config-dir", str(broker.config_dir), "--remove",
                    "dev-gone"], check=True, capture_output=True)
    broker.reload()
    assert "dev-gone" not in (broker.config_dir / "acl").read_text()
    wait_until(lambda: _refused(broker, "dev-gone"), timeout=10, message="the login refused")


def _refused(broker: Broker, user: str) -> bool:
    try:
        client = connect_client(broker.settings(user), f"gone-{user}", wait_s=5)
    except MqttConnectError:
        return True
    disconnect_client(client)
    return False
