"""The bridge's MQTT connection: publishes desired tags, feeds ``Fleet`` from device topics.

The connection itself is the shared ``edge_agent.agent.link.connect_client`` (TLS, auth,
reconnect with backoff, subscriptions remade at every connect). Writes check the
connection first and wait a bounded time for the broker's PUBACK, so a broker that
is gone turns into ``BrokerUnavailable`` (HTTP 503), never a hanging request.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import MQTTErrorCode

from edge_agent.agent.link import connect_client, disconnect_client
from edge_agent.protocol.settings import MqttSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0

MessageHandler = Callable[[str, bytes, bool], None]


class BrokerUnavailable(Exception):
    """The broker did not take a message: not connected, or no PUBACK in time."""


class MqttLink:
    """One MQTT client for the bridge; ``publish`` is safe from any thread."""

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        on_message: MessageHandler,
        *,
        client_id: str | None = None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self.subscriptions = tuple(subscriptions)
        self.publish_timeout_s = publish_timeout_s
        self.client_id = client_id or f"edge-bridge-{uuid.uuid4().hex[:12]}"
        self._on_message = on_message
        self._client: Client | None = None

    def start(self) -> None:
        """Connect in the background; the bridge serves (and answers 503) meanwhile."""
        log.info("MQTT: connecting to %s:%d as %s (topics under %s/)", self.settings.host,
                 self.settings.port, self.settings.username or "anonymous",
                 self.settings.topic_prefix)
        self._client = connect_client(self.settings, self.client_id,
                                      subscriptions=self.subscriptions,
                                      on_message=self._handle_message, wait_s=None)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            disconnect_client(client)

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish with QoS 1 and wait for the PUBACK; raise BrokerUnavailable otherwise."""
        client = self._client
        if client is None or not client.is_connected():
            raise BrokerUnavailable("not connected to the MQTT broker; nothing was published")
        try:
            info = client.publish(topic, payload, qos=1, retain=retain)
        except (ValueError, RuntimeError) as exc:  # e.g. a topic paho refuses
            raise BrokerUnavailable(f"MQTT publish failed: {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerUnavailable("too many messages wait for the MQTT broker; "
                                    "nothing was published")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # paho keeps it for the reconnect
            raise BrokerUnavailable("lost the MQTT broker while publishing; the message may "
                                    "still be delivered when the connection returns")
        try:
            info.wait_for_publish(self.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailable(f"MQTT publish failed: {exc}") from None
        if not info.is_published():
            raise BrokerUnavailable(
                f"the MQTT broker did not acknowledge within {self.publish_timeout_s:g} s; "
                "the message may still be delivered when the connection returns"
            )

    def resync(self, topics: Sequence[str]) -> bool:
        """Have the broker send the retained messages of ``topics`` again: subscribing
        anew delivers them. For after the broker may have dropped messages to us."""
        client = self._client
        if client is None or not client.is_connected():
            return False
        result, _ = client.subscribe([(topic, 1) for topic in topics])
        return result == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_message(self, client: Client, message: MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            return  # not a topic of ours
        self._on_message(topic, bytes(message.payload), bool(message.retain))
