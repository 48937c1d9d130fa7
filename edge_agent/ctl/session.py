"""edge-ctl's MQTT session: one connection of the shared ``protocol.mqtt.BrokerClient``,
subscribed before anything is published, whose messages queue up for the command.

A command reads what arrives with ``messages`` (live) or ``retained`` (where everyone
stands), and decodes a device's payload with ``document``: the bounded decoder, so no
payload can make edge-ctl fail. Every broker failure becomes a ``CtlError`` here, once:
unreachable, or no acknowledgement in time, exits 3; a refusal (the ACL) exits 1.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_TIMEOUT, CtlError
from edge_agent.protocol import safejson
from edge_agent.protocol.mqtt import (
    BrokerClient,
    BrokerUnavailable,
    Incoming,
    MqttConnectError,
    PublishRefused,
)
from edge_agent.protocol.safejson import UntrustedJson
from edge_agent.protocol.settings import MqttSettings
from edge_agent.protocol.topics import Topics

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
# Retained messages arrive right after the SUBACK; this much silence means "all here".
RETAINED_QUIET_S = 0.3
RETAINED_MAX_S = 3.0
# The largest device message edge-ctl decodes (the bridge's limit for a state; the shipped
# broker refuses packets over 64 KiB before they get here).
MAX_DEVICE_MESSAGE_BYTES = 256 * 1024
OPERATOR_ACL = "edge-ctl needs a user with the operator ACL (mosquitto/add-device --operator NAME)"
# A cluster node may refuse a subscription for a moment (NATS while its JetStream storage
# settles after another node died); the MQTT layer asks again after 1 s, 2 s and 4 s.
# A refusal that outlasts this is the user's ACL.
REFUSED_GRACE_S = 8.0


class Session:
    """One MQTT connection: subscribed to ``subscriptions`` (all acknowledged, or a
    CtlError) before the constructor returns; messages queue up in ``inbox``."""

    def __init__(self, settings: MqttSettings, subscriptions: Sequence[str]) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.inbox: queue.Queue[Incoming] = queue.Queue()
        self.broker = BrokerClient(
            settings, f"edge-ctl-{uuid.uuid4().hex[:12]}", subscriptions=subscriptions,
            on_message=self.inbox.put, publish_timeout_s=PUBLISH_TIMEOUT_S,
        )
        try:
            self.broker.start(wait_s=CONNECT_TIMEOUT_S)
        except MqttConnectError as exc:
            raise CtlError(f"cannot use the MQTT broker: {exc}", EXIT_TIMEOUT) from None
        if not subscriptions:
            return
        try:
            refused = self.broker.wait_subscribed(CONNECT_TIMEOUT_S)
        except MqttConnectError as exc:
            self.close()
            raise CtlError(str(exc), EXIT_TIMEOUT) from None
        deadline = time.monotonic() + REFUSED_GRACE_S
        refusals = self.broker.refusals if refused else {}
        while refusals and time.monotonic() < deadline:
            time.sleep(0.1)
            refusals = self.broker.refusals
        if refusals:
            self.close()
            listed = ", ".join(f"{topic} ({reason})" for topic, reason in refusals.items())
            raise CtlError(f"the broker refused the subscription to {listed} for "
                           f"{settings.username or 'this user'}; {OPERATOR_ACL}", EXIT_FAILED)

    def publish(self, topic: str, payload: bytes, *, retain: bool,
                response_topic: str | None = None, correlation: bytes | None = None) -> None:
        """QoS 1; returns once the broker has acknowledged it, raises CtlError otherwise.
        ``response_topic`` and ``correlation`` make it an MQTT 5 request."""
        properties = None
        if response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        try:
            self.broker.publish_and_wait(topic, payload, retain=retain, properties=properties)
        except BrokerUnavailable as exc:
            raise publish_error(exc) from None

    def messages(self, timeout_s: float | None) -> Iterator[Incoming]:
        """Messages as they arrive, until ``timeout_s`` (None: forever) has passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                yield self.inbox.get(timeout=1.0 if remaining is None else min(remaining, 1.0))
            except queue.Empty:
                continue

    def retained(self) -> list[Incoming]:
        """The retained messages of the subscriptions (everything until a short silence)."""
        found: list[Incoming] = []
        deadline = time.monotonic() + RETAINED_MAX_S
        while time.monotonic() < deadline:
            try:
                found.append(self.inbox.get(timeout=RETAINED_QUIET_S))
            except queue.Empty:
                break
        return found

    def close(self) -> None:
        self.broker.stop()


def publish_error(exc: BrokerUnavailable) -> CtlError:
    """A publish the broker did not take, as edge-ctl ends on it: refused (exit 1, with
    the operator ACL hint) or not acknowledged in time, or no connection (exit 3)."""
    if isinstance(exc, PublishRefused):
        return CtlError(f"{exc}; {OPERATOR_ACL}", EXIT_FAILED)
    return CtlError(str(exc), EXIT_TIMEOUT)


def document(message: Incoming) -> dict[str, Any]:
    """A device's payload as a JSON object, decoded with the bounded decoder; raises
    UntrustedJson saying why it is not one."""
    return safejson.loads_object(message.payload, max_bytes=MAX_DEVICE_MESSAGE_BYTES)


def document_or_none(message: Incoming) -> dict[str, Any] | None:
    """``document``, or None when the payload is not an acceptable JSON object."""
    try:
        return document(message)
    except UntrustedJson:
        return None
