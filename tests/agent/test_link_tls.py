"""TLS to the broker's TLS listener, with a CA made by the test (openssl): verified
connections work, an untrusted broker is refused with a clear error, and the agent
itself connects over TLS (and says why it cannot)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.mqtt import (
    MqttConnectError,
    connect_client,
    disconnect_client,
    tls_context,
)
from edge_agent.protocol.topics import Topics
from tests.support import REPO_ROOT, wait_until
from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, MqttWatcher, Pki, make_pki

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), "fleet")


@pytest.fixture(scope="module")
def broker(pki: Pki) -> Iterator[Broker]:
    with Broker(pki) as started:
        started.add_device("dev-tls")
        started.add_operator("ops")
        yield started


def test_verified_tls_round_trip_with_and_without_a_client_certificate(
    broker: Broker, pki: Pki, test_id: str,
) -> None:
    topics = Topics(f"t{test_id}")
    ops = MqttWatcher(broker.settings("ops", prefix=topics.prefix, tls=True),
                      [f"{topics.prefix}/#"]).start()
    cert, key = pki.issue("dev-tls-client")
    with_cert = replace(broker.settings("dev-tls", prefix=topics.prefix, tls=True),
                        cert_file=cert, key_file=key)
    device = connect_client(with_cert, "dev-tls", wait_s=10)
    try:
        assert ops.client is not None and ops.client.is_connected()
        device.publish(topics.state("dev-tls"), '{"over": "tls"}', qos=1).wait_for_publish(5)
        assert ops.wait_for(topics.state("dev-tls")).json() == {"over": "tls"}
    finally:
        disconnect_client(device)
        ops.close()


def test_a_broker_signed_by_another_ca_is_refused_clearly(
    broker: Broker, tmp_path: Path,
) -> None:
    other = make_pki(tmp_path, "other")
    settings = broker.settings("dev-tls", tls=True, ca_file=other.ca_cert)
    with pytest.raises(MqttConnectError) as refused:
        connect_client(settings, "dev-tls", wait_s=10)
    message = str(refused.value)
    assert "certificate verify failed" in message
    assert str(other.ca_cert) in message and "MQTT_CA_FILE" in message
    # no CA file: the system store does not know the test CA either
    with pytest.raises(MqttConnectError, match="the system CA store"):
        connect_client(replace(settings, ca_file=None), "dev-tls", wait_s=10)


def test_plaintext_client_on_the_tls_port_gets_no_session(broker: Broker) -> None:
    settings = replace(broker.settings("dev-tls"), port=broker.tls_port)
    with pytest.raises(MqttConnectError):
        connect_client(settings, "dev-plain", wait_s=3)


def test_unusable_tls_files_are_configuration_errors(broker: Broker, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    settings = broker.settings("dev-tls", tls=True, ca_file=junk)
    with pytest.raises(ConfigError, match="MQTT_CA_FILE"):
        tls_context(settings)
    # the agent refuses to start with exit code 2 and names the variable
    env = {"CONTAINER_IMAGE": "127.0.0.1:1/none/app:1.0", "DATA_DIR": str(tmp_path / "data"),
           "DEVICE_ID": "dev-tls", "MQTT_HOST": "127.0.0.1", "MQTT_TLS": "true",
           "MQTT_PORT": str(broker.tls_port), "MQTT_CA_FILE": str(junk), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "edge_agent"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "MQTT_CA_FILE" in done.stderr


def test_agent_connects_over_tls_and_logs_why_when_it_cannot(
    broker: Broker, pki: Pki, tmp_path: Path, test_id: str, unique_repo: str,
) -> None:
    """The agent's own link over TLS: ``online`` with the right CA; with the wrong one a
    log line that says what to fix, and the agent keeps running."""
    topics = Topics(f"t{test_id}")
    ops = MqttWatcher(broker.settings("ops", prefix=topics.prefix), [f"{topics.prefix}/#"]).start()
    other = make_pki(tmp_path / "other", "other")
    base = {
        # no image in this repository: the MQTT side is what this test is about
        "CONTAINER_IMAGE": f"{unique_repo}:1.0", "CONTAINER_NAME": f"edge-test-{test_id}",
        "DATA_DIR": str(tmp_path / "data"), "FALLBACK_TAG": "", "POLL_INTERVAL": "10",
        **broker.agent_env("dev-tls", topics.prefix, MQTT_TLS="true",
                           MQTT_PORT=str(broker.tls_port)),
        "DEVICE_ID": "dev-tls",
    }
    good = AgentProcess({**base, "MQTT_CA_FILE": str(pki.ca_cert)}, tmp_path / "good.log")
    bad = AgentProcess({**base, "MQTT_CA_FILE": str(other.ca_cert)}, tmp_path / "bad.log")
    try:
        mark = time.monotonic()
        good.start()
        ops.wait_for(topics.availability("dev-tls"), lambda m: m.text == "online", since=mark)
        assert good.stop() == 0
        bad.start()
        wait_until(lambda: "certificate verify failed" in bad.log(), timeout=20,
                   message="the TLS refusal in the agent's log")
        line = next(x for x in bad.log().splitlines() if "certificate verify failed" in x)
        assert "MQTT_CA_FILE" in line and str(other.ca_cert) in line
        assert bad.alive
    finally:
        for agent in (good, bad):
            if agent.alive:
                agent.stop(signal.SIGKILL)
        ops.close()


def test_tls_client_on_the_plaintext_port_is_told_so(broker: Broker) -> None:
    """A plaintext Mosquitto resets a ClientHello: the error says what that usually means."""
    settings = replace(broker.settings("dev-tls", tls=True), port=broker.port)
    with pytest.raises(MqttConnectError) as refused:
        connect_client(settings, "dev-tls", wait_s=5)
    assert "plaintext port" in str(refused.value), str(refused.value)
