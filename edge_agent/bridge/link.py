"""The bridge's MQTT connection: publishes desired tags, feeds ``Fleet`` from device topics.

paho's network thread (``loop_start``) reconnects on its own; writes check the
connection first and wait a bounded time for the broker's PUBACK, so a broker that
is gone turns into ``BrokerUnavailable`` (HTTP 503), never a hanging request.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.config import MqttSettings

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
KEEPALIVE_S = 30
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30

MessageHandler = Callable[[str, bytes, bool], None]


class BrokerUnavailable(Exception):
    """The broker did not take a message: not connected, or no PUBACK in time."""


class MqttLink:
    """One paho client: subscriptions are (re)made at every connect."""

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
        self._on_message = on_message
        self._connected = threading.Event()
        self._v5 = settings.protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edge-bridge-{uuid.uuid4().hex[:12]}",
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        self.client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_message = self._handle_message

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background; the bridge serves (and answers 503) meanwhile."""
        log.info("connecting to MQTT broker %s:%d%s", self.settings.host, self.settings.port,
                 " (TLS)" if self.settings.tls else "")
        self.client.connect_async(self.settings.host, self.settings.port, KEEPALIVE_S,
                                  clean_start=True)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # -- publishing ---------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish with QoS 1 and wait for the PUBACK; raise BrokerUnavailable otherwise."""
        if not self.connected:
            raise BrokerUnavailable("not connected to the MQTT broker; nothing was published")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerUnavailable(f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(self.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailable(f"MQTT publish failed: {exc}") from None
        if not info.is_published():
            raise BrokerUnavailable(
                f"the MQTT broker did not acknowledge within {self.publish_timeout_s:g} s; "
                "the message may still be delivered when the connection returns"
            )

    # -- paho callbacks (network thread) ------------------------------------------
    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker refused the connection: %s", reason_code)
            return
        log.info("connected to MQTT broker %s:%d", self.settings.host, self.settings.port)
        client.subscribe([(topic, 1) for topic in self.subscriptions])
        self._connected.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set():
            log.warning("disconnected from MQTT broker: %s; reconnecting", reason_code)
        self._connected.clear()

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(msg.topic, msg.payload, bool(msg.retain))
        except Exception:
            # a bug in one message must not kill paho's network thread
            log.exception("failed to handle a message on %s", msg.topic)
