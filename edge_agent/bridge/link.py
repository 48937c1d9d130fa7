"""The bridge's MQTT connection: publishes desired tags and commands, feeds ``Fleet``
from the device topics.

The connection is the shared ``protocol.mqtt.BrokerClient`` (TLS, auth, reconnect with
backoff, subscriptions remade at every connect). A write waits a bounded time for the
broker's PUBACK, so a broker that is gone becomes ``BrokerUnavailable`` (HTTP 503),
never a hanging request.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

from edge_agent.protocol.mqtt import PUBLISH_TIMEOUT_S, BrokerClient, Incoming
from edge_agent.protocol.settings import MqttSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]


class BridgeLink:
    """The bridge's one MQTT client; ``publish`` is safe from any thread."""

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
        self._on_message = on_message
        self.broker = BrokerClient(
            settings, client_id or f"edge-bridge-{uuid.uuid4().hex[:12]}",
            subscriptions=subscriptions, on_message=self._handle_message,
            publish_timeout_s=publish_timeout_s,
        )

    def start(self) -> None:
        """Connect in the background; the bridge serves (and answers 503) meanwhile."""
        log.info("MQTT: connecting to %s as %s (topics under %s/)", self.settings.where,
                 self.settings.username or "anonymous",
                 self.settings.topic_prefix)
        self.broker.start(wait_s=None)

    def stop(self) -> None:
        self.broker.stop()

    @property
    def connected(self) -> bool:
        return self.broker.connected

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """QoS 1, returning once the broker acknowledged it; raises BrokerUnavailable."""
        self.broker.publish_and_wait(topic, payload, retain=retain)

    def resync(self, topics: Sequence[str]) -> bool:
        """Have the broker send the retained messages of ``topics`` again."""
        return self.broker.resubscribe(topics)

    def _handle_message(self, message: Incoming) -> None:
        self._on_message(message.topic, message.payload, message.retained)
