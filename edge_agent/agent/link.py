"""The agent's MQTT link, and the connect helper that other MQTT programs share.

paho's network thread never does the agent's work: ``MqttLink`` turns every message
into a typed item in the agent's inbox and returns. Everything the agent says goes
out through ``MqttLink._publish``. The broker may be down at start or vanish at any
time; the link reconnects on its own (capped backoff) and nothing here ever blocks
or fails an update.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.agent.config import Settings
from edge_agent.agent.discovery import discovery_config
from edge_agent.agent.loop import (
    CheckRequest,
    Message,
    RemoteReady,
    RemoteReset,
    RemoteTagMessage,
    Reply,
)
from edge_agent.agent.reconcile import Source
from edge_agent.protocol.errors import ConfigError, EdgeAgentError
from edge_agent.protocol.safejson import UntrustedJson, loads_object
from edge_agent.protocol.settings import MqttSettings
from edge_agent.protocol.tags import is_request_id
from edge_agent.protocol.topics import MAX_TOPIC_BYTES, Topics

log = logging.getLogger(__name__)

ONLINE = "online"
OFFLINE = "offline"
KEEPALIVE_S = 30
RECONNECT_MIN_S = 1
# Every device loses the broker at the same moment when it restarts; a cap that
# differs per client keeps a fleet from reconnecting in lockstep.
RECONNECT_MAX_S = (10, 20)
# QoS 1 messages paho keeps while the broker is away (events of an update in flight).
MAX_QUEUED = 500
MAX_COMMAND_BYTES = 4096
MAX_REQUEST_ID_CHARS = 128
STOP_TIMEOUT_S = 2.0
# Distinct refused response topics remembered to warn about each once; past this many,
# further ones are logged at DEBUG only (a requester cannot grow the agent's memory).
MAX_REFUSED_REPLY_TOPICS = 100
# CONNACK reasons that retrying will not cure.
PERMANENT_REFUSALS = frozenset({
    "Bad user name or password", "Not authorized", "Client identifier not valid",
    "Banned", "Bad authentication method", "Unsupported protocol version",
})

MessageHandler = Callable[[Client, MQTTMessage], None]
ClientHook = Callable[[Client], None]


class MqttConnectError(EdgeAgentError):
    """The broker could not be reached, or refused the connection."""


# -- connecting -------------------------------------------------------------------
def connect_client(
    mqtt: MqttSettings,
    client_id: str,
    will: tuple[str, str] | None = None,
    *,
    subscriptions: Sequence[str] = (),
    on_message: MessageHandler | None = None,
    on_connect: ClientHook | None = None,
    on_subscribed: ClientHook | None = None,
    wait_s: float | None = 10.0,
) -> Client:
    """A paho client connected (or connecting) to the broker in ``mqtt``; stable API.

    - Protocol MQTT 5 or 3.1.1 (``mqtt.protocol``), clean session, keepalive 30 s;
      username/password; TLS with server verification (``mqtt.ca_file`` or the system
      CAs, hostname checked) and an optional client certificate.
    - ``will``: (topic, payload) published retained, QoS 1 by the broker if we vanish.
    - ``subscriptions`` (QoS 1) are (re)made at every connect, then ``on_connect`` is
      called; ``on_subscribed`` once the broker has acknowledged them (refusals are
      logged). ``on_message`` runs on paho's network thread: hand work off, never block.
    - Reconnects by itself with a backoff from 1 s to a cap of 10-20 s; every failure
      is logged once with its cause (TLS verification, refused, unreachable).
    - ``wait_s``: wait that long for the first connection and raise MqttConnectError
      with the reason if there is none (at once for bad credentials or an untrusted
      certificate); ``None`` returns at once and keeps trying in the background.

    Stop it with ``disconnect_client``. Bad TLS files raise ConfigError.
    """
    client = _new_client(mqtt, client_id)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    tracker = _Tracker(mqtt, tuple(subscriptions), on_connect, on_subscribed)
    client.on_connect = tracker.on_connect
    client.on_connect_fail = tracker.on_connect_fail
    client.on_disconnect = tracker.on_disconnect
    client.on_subscribe = tracker.on_subscribe
    client.on_publish = tracker.on_publish
    if on_message is not None:
        client.on_message = _guarded_message(on_message)
    properties = None
    if mqtt.protocol == "5":
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
    client.connect_async(mqtt.host, mqtt.port, keepalive=KEEPALIVE_S, clean_start=True,
                         properties=properties)
    client.loop_start()
    if wait_s is None:
        return client
    if not tracker.wait(wait_s):
        client.disconnect()
        client.loop_stop()
        raise MqttConnectError(tracker.error or
                               f"no answer from the broker at {mqtt.host}:{mqtt.port} "
                               f"within {wait_s:g} s")
    return client


def disconnect_client(
    client: Client, final: tuple[str, str] | None = None, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Publish ``final`` (topic, payload; retained, QoS 1) if connected, then disconnect
    and stop the network thread. Waits at most ``timeout_s`` for the broker's PUBACK."""
    tracker = _tracker_of(client)
    if tracker is not None:
        tracker.closing = True
    if final is not None and client.is_connected():
        try:
            info = client.publish(final[0], final[1], qos=1, retain=True)
            info.wait_for_publish(timeout_s)
        except (ValueError, RuntimeError) as exc:
            log.warning("could not publish %s before disconnecting: %s", final[0], exc)
    client.disconnect()
    client.loop_stop()


def _new_client(mqtt: MqttSettings, client_id: str) -> Client:
    v5 = mqtt.protocol == "5"
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        clean_session=None if v5 else True,
    )
    if mqtt.username:
        client.username_pw_set(mqtt.username, mqtt.password)
    if mqtt.tls:
        client.tls_set_context(tls_context(mqtt))
    client.reconnect_delay_set(RECONNECT_MIN_S, random.randint(*RECONNECT_MAX_S))
    client.max_queued_messages_set(MAX_QUEUED)
    # A callback that raises must never end paho's network thread (and our link). paho's
    # own logger stays off: it reports a refused login as an ERROR at every retry, and
    # the callbacks here say what went wrong in words an operator can act on.
    client.suppress_exceptions = True
    return client


def tls_context(mqtt: MqttSettings) -> ssl.SSLContext:
    """Verify the broker (CA file or system CAs, host name); optional client certificate."""
    try:
        context = ssl.create_default_context(
            cafile=str(mqtt.ca_file) if mqtt.ca_file else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"MQTT_CA_FILE: {mqtt.ca_file} is not a usable CA bundle: {exc}") \
            from None
    if mqtt.cert_file is not None:
        try:
            context.load_cert_chain(str(mqtt.cert_file),
                                    str(mqtt.key_file) if mqtt.key_file else None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"MQTT_CERT_FILE/MQTT_KEY_FILE: cannot load the client "
                              f"certificate {mqtt.cert_file}: {exc}") from None
    elif mqtt.key_file is not None:
        raise ConfigError("MQTT_KEY_FILE: set MQTT_CERT_FILE too (a key needs its certificate)")
    return context


def describe_connect_error(exc: BaseException | None, mqtt: MqttSettings) -> str:
    """One line an operator can act on, for a failed TCP/TLS connection attempt."""
    where = f"{mqtt.host}:{mqtt.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = mqtt.ca_file or "the system CA store"
        return (f"TLS: the certificate of the broker at {where} was not accepted "
                f"(certificate verify failed: {exc.verify_message}); check MQTT_CA_FILE "
                f"({ca}) and that MQTT_HOST matches the certificate")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused (broker down or wrong MQTT_PORT?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve MQTT_HOST {mqtt.host!r}: {exc.strerror}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"connection to {where} timed out"
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {exc.strerror or exc}"
    return f"cannot connect to {where}"


def _refusal_hint(reason: str) -> str:
    if reason in ("Bad user name or password", "Not authorized"):
        return " (check MQTT_USERNAME and MQTT_PASSWORD / MQTT_PASSWORD_FILE)"
    return ""


class _Tracker:
    """Connection bookkeeping and logging for one client (runs on paho's thread)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        subscriptions: tuple[str, ...],
        on_connect: ClientHook | None,
        on_subscribed: ClientHook | None,
    ) -> None:
        self.mqtt = mqtt
        self.subscriptions = subscriptions
        self.user_on_connect = on_connect
        self.user_on_subscribed = on_subscribed
        self.connected = threading.Event()
        self.gave_up = threading.Event()
        self.error: str | None = None
        self.closing = False
        self._logged: str | None = None
        self._ever_connected = False
        self._subscribe_mid: int | None = None
        self._refused_publishes = 0

    def wait(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.connected.is_set() and not self.gave_up.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.connected.wait(min(remaining, 0.05))
        return self.connected.is_set()

    def _failed(self, message: str, *, permanent: bool = False) -> None:
        self.error = message
        if message != self._logged:
            log.warning("MQTT: %s; retrying", message)
            self._logged = message
        else:
            log.debug("MQTT: %s (again)", message)
        if permanent:
            self.gave_up.set()

    def on_connect(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            name = str(reason)
            self._failed(f"the broker at {self.mqtt.host}:{self.mqtt.port} refused the "
                         f"connection: {name}{_refusal_hint(name)}",
                         permanent=name in PERMANENT_REFUSALS)
            return
        again = self._ever_connected
        self._ever_connected = True
        self._logged = None
        self.error = None
        log.info("MQTT: %s %s:%d (MQTT %s%s)", "reconnected to" if again else "connected to",
                 self.mqtt.host, self.mqtt.port, self.mqtt.protocol,
                 ", TLS" if self.mqtt.tls else "")
        if self.subscriptions:
            result, mid = client.subscribe([(topic, 1) for topic in self.subscriptions])
            self._subscribe_mid = mid if result == MQTTErrorCode.MQTT_ERR_SUCCESS else None
        if self.user_on_connect is not None:
            _call_hook(self.user_on_connect, client, "on_connect")
        self.connected.set()

    def on_connect_fail(self, client: Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` block, so the exception
        # it caught (and does not pass on) is the one being handled right now.
        exc = sys.exc_info()[1]
        self._failed(describe_connect_error(exc, self.mqtt),
                     permanent=isinstance(exc, ssl.SSLCertVerificationError))

    def on_disconnect(
        self, client: Client, userdata: Any, flags: DisconnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if self.closing or not was_connected:
            return
        name = str(reason)
        if name == "Session taken over":
            log.error("MQTT: another client connected with our client id (duplicate "
                      "DEVICE_ID?); reconnecting")
        else:
            log.warning("MQTT: lost the broker at %s:%d (%s); reconnecting",
                        self.mqtt.host, self.mqtt.port, name)

    def on_subscribe(
        self, client: Client, userdata: Any, mid: int, reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        for topic, reason in zip(self.subscriptions, reasons, strict=False):
            if reason.is_failure:
                log.warning("MQTT: the broker refused the subscription to %s (%s); "
                            "check the broker's ACL for this user", topic, reason)
        if self.user_on_subscribed is not None:
            _call_hook(self.user_on_subscribed, client, "on_subscribed")

    def on_publish(
        self, client: Client, userdata: Any, mid: int, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused_publishes += 1
            # Only MQTT 5 says so; a refusal usually means the ACL, and repeats every time.
            level = logging.WARNING if self._refused_publishes == 1 else logging.DEBUG
            log.log(level, "MQTT: the broker refused a publish (%s); check the broker's ACL",
                    reason)


def _tracker_of(client: Client) -> _Tracker | None:
    callback = client.on_connect
    owner = getattr(callback, "__self__", None)
    return owner if isinstance(owner, _Tracker) else None


def _call_hook(hook: ClientHook, client: Client, name: str) -> None:
    try:
        hook(client)
    except Exception:  # a hook must never end paho's network thread
        log.exception("MQTT: %s hook failed", name)


def _guarded_message(handler: MessageHandler) -> Callable[[Client, Any, MQTTMessage], None]:
    def on_message(client: Client, userdata: Any, message: MQTTMessage) -> None:
        try:
            handler(client, message)
        except Exception:  # a bad message must never end the network thread
            log.exception("MQTT: handling a message on %r failed", _topic_of(message))

    return on_message


# -- routing (pure) -----------------------------------------------------------------
def parse_request_id(payload: bytes) -> str | None:
    """The ``request_id`` of a command payload (JSON object), or None. Never raises:
    a command needs no payload at all (Home Assistant sends ``install``). An id that
    does not follow the request-id grammar is dropped, and the command still runs: it
    is answered without an id (with its Correlation Data under MQTT 5)."""
    if not payload or len(payload) > MAX_COMMAND_BYTES or not payload.lstrip().startswith(b"{"):
        return None
    try:
        body = loads_object(payload, max_bytes=MAX_COMMAND_BYTES)
    except UntrustedJson:
        return None
    request_id = body.get("request_id")
    return request_id if is_request_id(request_id) else None


def route(
    topics: Topics,
    device_id: str,
    groups: Sequence[str],
    topic: str,
    payload: bytes,
    *,
    retained: bool = False,
    reply: Reply | None = None,
) -> Message | None:
    """The inbox message for one MQTT message, or None when it is not for this agent."""
    if topic == topics.device_tag(device_id):
        return RemoteTagMessage(Source.DEVICE, payload, topic, retained=retained)
    if topic == topics.fleet_tag:
        return RemoteTagMessage(Source.FLEET, payload, topic, retained=retained)
    for group in groups:
        if topic == topics.group_tag(group):
            return RemoteTagMessage(Source.GROUP, payload, topic, group, retained=retained)
    install = topic == topics.device_install(device_id)
    if install or topic in (topics.device_check(device_id), topics.fleet_check):
        if retained:
            # A retained command would fire again at every reconnect.
            log.warning("ignored a retained command on %s; publish commands unretained",
                        topic)
            return None
        return CheckRequest(parse_request_id(payload), install=install, reply=reply)
    return None


def valid_response_topic(topic: object) -> bool:
    """A topic name one can publish to at all: no wildcards, no NUL, 1-65535 bytes.
    Where the agent may answer is narrower: ``Topics.is_reply_topic``."""
    if not isinstance(topic, str) or set(topic) & {"+", "#", "\x00"}:
        return False
    try:
        return 0 < len(topic.encode()) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:
        return False


# -- the agent's link -----------------------------------------------------------------
class MqttLink:
    """The agent on the broker: desired tags and commands in, state/events/replies out."""

    def __init__(self, settings: Settings, inbox: queue.Queue[Message]) -> None:
        if settings.mqtt is None:
            raise ValueError("MqttLink needs MQTT settings (MQTT_HOST)")
        self.mqtt = settings.mqtt
        self.device_id = settings.device_id
        self.groups = settings.device_groups
        self.topics = Topics(settings.mqtt.topic_prefix)
        self.client_id = f"edge-agent-{settings.device_id}"
        self._inbox = inbox
        self._availability = self.topics.availability(self.device_id)
        self._state_topic = self.topics.state(self.device_id)
        self._events_topic = self.topics.events(self.device_id)
        self._discovery = discovery_config(settings) if settings.ha_discovery else None
        self._client: Client | None = None
        self._refused_reply_topics: set[str] = set()
        if self.mqtt.tls:
            tls_context(self.mqtt)  # unreadable TLS files stop the agent at start

    @property
    def subscriptions(self) -> list[str]:
        t = self.topics
        return [
            t.device_tag(self.device_id),
            *(t.group_tag(group) for group in self.groups),
            t.fleet_tag,
            t.device_check(self.device_id),
            t.device_install(self.device_id),
            t.fleet_check,
        ]

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried, never waited for."""
        log.info("MQTT: connecting to %s:%d as %s (topics under %s/)", self.mqtt.host,
                 self.mqtt.port, self.mqtt.username or "anonymous", self.topics.prefix)
        self._client = connect_client(
            self.mqtt, self.client_id, will=(self._availability, OFFLINE),
            subscriptions=self.subscriptions, on_message=self._on_message,
            on_connect=self._on_connect, on_subscribed=self._on_subscribed, wait_s=None,
        )

    def stop(self) -> None:
        """Say ``offline`` ourselves (a clean stop fires no will), then disconnect."""
        client, self._client = self._client, None
        if client is not None:
            disconnect_client(client, final=(self._availability, OFFLINE))

    # -- agent -> broker (agent thread; paho's publish is thread-safe) ------------------
    def publish_state(self, document: dict[str, Any]) -> None:
        """State sink. While disconnected it is dropped: a stale retained state queued
        now would land after the fresh one published on reconnect."""
        if self.connected:
            self._publish(self._state_topic, _json(document), retain=True)

    def publish_event(self, event: dict[str, Any]) -> None:
        """Event sink. Progress is dropped while disconnected; the rest waits in paho's
        queue (bounded) so the outcome of an update still arrives after an outage."""
        if event.get("event") == "pull_progress" and not self.connected:
            return
        self._publish(self._events_topic, _json(event), retain=False)

    def _reply(self, topic: str, correlation: bytes | None, answer: dict[str, Any]) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            properties.CorrelationData = correlation
        self._publish(topic, _json(answer), retain=False, properties=properties)

    def _publish(
        self, topic: str, payload: bytes | str, *, retain: bool,
        properties: Properties | None = None, client: Client | None = None,
    ) -> None:
        """The one place the agent publishes: QoS 1; never raises. ``client`` is given by
        on_connect, which can run before ``start()`` has stored the client."""
        client = client or self._client
        if client is None:
            return
        try:
            info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except (ValueError, RuntimeError) as exc:
            log.warning("MQTT: cannot publish to %r: %s", topic, exc)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.debug("MQTT: publish to %s not queued (%s)", topic, info.rc)

    # -- broker -> agent (paho's network thread: enqueue and return) --------------------
    def _on_connect(self, client: Client) -> None:
        self._inbox.put(RemoteReset())  # before any retained tag of this session
        self._publish(self._availability, ONLINE, retain=True, client=client)
        if self._discovery is not None:
            topic, config = self._discovery
            self._publish(topic, _json(config), retain=True, client=client)

    def _on_subscribed(self, client: Client) -> None:
        self._inbox.put(RemoteReady())

    def _on_message(self, client: Client, message: MQTTMessage) -> None:
        reply = self._reply_for(message)
        routed = route(self.topics, self.device_id, self.groups, _topic_of(message),
                       bytes(message.payload), retained=bool(message.retain), reply=reply)
        if routed is None:
            log.debug("MQTT: ignored a message on %r", _topic_of(message))
            return
        self._inbox.put(routed)

    def _reply_for(self, message: MQTTMessage) -> Reply | None:
        properties = getattr(message, "properties", None)
        topic = getattr(properties, "ResponseTopic", None)
        if topic is None:
            return None
        if not (valid_response_topic(topic)
                and self.topics.is_reply_topic(self.device_id, topic)):
            # Its own state, availability or discovery topic would be overwritten by the
            # answer (the ACL lets the device write there): answer below reply/ only.
            self._refused_reply_topic(str(topic), _topic_of(message))
            return None
        correlation = getattr(properties, "CorrelationData", None)
        return functools.partial(self._reply, str(topic),
                                 bytes(correlation) if correlation is not None else None)

    def _refused_reply_topic(self, topic: str, command_topic: str) -> None:
        """Warn once per distinct topic: a requester repeats its mistake at every command."""
        if topic in self._refused_reply_topics:
            log.debug("MQTT: ignored the response topic %r again", topic)
            return
        if len(self._refused_reply_topics) >= MAX_REFUSED_REPLY_TOPICS:
            log.debug("MQTT: ignored the response topic %r on %s", topic, command_topic)
            return
        self._refused_reply_topics.add(topic)
        log.warning("MQTT: ignored the response topic %r of a command on %s: answers go "
                    "only below %s (the command runs, unanswered)", topic, command_topic,
                    self.topics.reply_root(self.device_id))


def _topic_of(message: MQTTMessage) -> str:
    """The topic as text; paho's ``topic`` raises on bytes that are not UTF-8."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return repr(message._topic)  # the raw bytes are all there is


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()
