"""The MQTT client layer shared by the agent, the bridge and edge-ctl.

``connect_client`` makes a paho client that connects (TLS, auth, MQTT 5 or 3.1.1),
reconnects by itself with a capped backoff, re-subscribes at every connect and says in
words why a connection failed. ``BrokerClient`` wraps one for the programs: typed
incoming messages, fire-and-forget publishes that never raise (the agent), publishes
that wait for the broker's PUBACK and report a refusal (the bridge, edge-ctl), and the
topics the broker refused to subscribe. paho's network thread runs the callbacks: they
only hand messages on, never block.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.protocol.errors import ConfigError, EdgeAgentError
from edge_agent.protocol.settings import BrokerAddress, MqttSettings

log = logging.getLogger(__name__)

# The operator side's keepalive (bridge, edge-ctl: wired links); the agent has its own
# setting, MQTT_KEEPALIVE, longer by default for cellular links (docs/BENCHMARKS.md).
KEEPALIVE_S = 30
RECONNECT_MIN_S = 1
# Every device loses the broker at the same moment when it restarts; a cap that
# differs per client keeps a fleet from reconnecting in lockstep.
RECONNECT_MAX_S = (10, 20)
# QoS 1 messages paho keeps while the broker is away (events of an update in flight).
MAX_QUEUED = 500
STOP_TIMEOUT_S = 2.0
PUBLISH_TIMEOUT_S = 5.0
# The shipped broker refuses packets over 64 KiB (mosquitto.conf) and drops the sender,
# and paho would resend the same message after every reconnect: a publish larger than
# this is refused here, before it can lock a client in that loop.
MAX_PAYLOAD_BYTES = 60 * 1024
# CONNACK reasons that retrying will not cure.
# A subscription the broker refuses in its SUBACK is asked for again on the same
# connection, waiting 1 s, 2 s, 4 s ... up to this cap. A refusal can pass (a clustered
# broker moving its storage after a node died, an ACL reloaded); one that stays (an ACL
# denial) costs one SUBSCRIBE every 5 min, about 40 KB a day with TCP/TLS overhead.
SUBSCRIBE_RETRY_MIN_S = 1.0
SUBSCRIBE_RETRY_MAX_S = 300.0
PERMANENT_REFUSALS = frozenset({
    "Bad user name or password", "Not authorized", "Client identifier not valid",
    "Banned", "Bad authentication method", "Unsupported protocol version",
})

MessageHandler = Callable[[Client, MQTTMessage], None]
ClientHook = Callable[[Client], None]


class MqttConnectError(EdgeAgentError):
    """The broker could not be reached, or refused the connection."""


class BrokerUnavailable(EdgeAgentError):
    """The broker did not take a message: not connected, refused, or no PUBACK in time."""


class PublishRefused(BrokerUnavailable):
    """The broker answered the publish with a failure (an MQTT 5 PUBACK reason code,
    usually its ACL): retrying will not help."""

    def __init__(self, message: str, topic: str, reason: str) -> None:
        super().__init__(message)
        self.topic = topic
        self.reason = reason


# -- connecting -------------------------------------------------------------------
def connect_client(  # noqa: PLR0913 - paho's options; all but three keyword-only
    mqtt: MqttSettings,
    client_id: str,
    will: tuple[str, str] | None = None,
    *,
    subscriptions: Sequence[str] = (),
    on_message: MessageHandler | None = None,
    on_connect: ClientHook | None = None,
    on_subscribed: ClientHook | None = None,
    wait_s: float | None = 10.0,
    keepalive_s: int = KEEPALIVE_S,
) -> Client:
    """A paho client connected (or connecting) to the broker in ``mqtt``; stable API.

    - Protocol MQTT 5 or 3.1.1 (``mqtt.protocol``), clean session, keepalive ``keepalive_s``;
      username/password; TLS with server verification (``mqtt.ca_file`` or the system
      CAs, hostname checked) and an optional client certificate.
    - ``will``: (topic, payload) published retained, QoS 1 by the broker if we vanish.
    - ``subscriptions`` (QoS 1) are (re)made at every connect, then ``on_connect`` is
      called; ``on_subscribed`` at every acknowledgement of them. A subscription the
      broker refuses is logged once and asked for again, with a backoff from 1 s to 5 min,
      until granted (``on_subscribed`` again then). ``on_message`` runs on paho's
      network thread: hand work off, never block.
    - Reconnects by itself with a backoff from 1 s to a cap of 10-20 s; every failure
      is logged once with its cause (TLS verification, refused, unreachable).
    - Several brokers (``mqtt.addresses``, MQTT_HOST as a list): the first attempt goes to
      the first, every later attempt (after a failure or a lost connection) to the next
      one, round the list, with the same backoff.
    - ``wait_s``: wait that long for the first connection and raise MqttConnectError
      with the reason if there is none (at once for bad credentials or an untrusted
      certificate); ``None`` returns at once and keeps trying in the background.

    Stop it with ``disconnect_client``. Bad TLS files raise ConfigError.
    """
    client = _new_client(mqtt, client_id)
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    tracker = _Tracker(mqtt, tuple(subscriptions), on_connect, on_subscribed)
    client.on_pre_connect = tracker.on_pre_connect
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
    first = mqtt.addresses[0]
    client.connect_async(first.host, first.port, keepalive=keepalive_s, clean_start=True,
                         properties=properties)
    client.loop_start()
    if wait_s is None:
        return client
    if not tracker.wait(wait_s):
        client.disconnect()
        client.loop_stop()
        raise MqttConnectError(tracker.error or
                               f"no answer from the broker at {mqtt.where} "
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
        tracker.cancel_retry()
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


def describe_connect_error(  # noqa: PLR0911 - one line per kind of failure
    exc: BaseException | None, mqtt: MqttSettings, address: BrokerAddress | None = None,
) -> str:
    """One line an operator can act on, for a failed TCP/TLS connection attempt to
    ``address`` (default: the first broker)."""
    address = address or mqtt.addresses[0]
    where = str(address)
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = mqtt.ca_file or "the system CA store"
        return (f"TLS: the certificate of the broker at {where} was not accepted "
                f"(certificate verify failed: {exc.verify_message}); check MQTT_CA_FILE "
                f"({ca}) and that MQTT_HOST matches the certificate")
    if mqtt.tls and isinstance(exc, ssl.SSLEOFError):
        return (f"TLS handshake with {where} broken off by the broker ({type(exc).__name__}): "
                "is that a plaintext port? TLS brokers usually listen on 8883")
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc.reason or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {where} refused (broker down or wrong MQTT_PORT?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve MQTT_HOST {address.host!r}: {exc.strerror}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"connection to {where} timed out"
    if mqtt.tls and isinstance(exc, ConnectionResetError | EOFError):
        # A plaintext broker drops a ClientHello it cannot read: the reset is the only sign.
        return (f"TLS handshake with {where} broken off by the broker ({type(exc).__name__}): "
                "is that a plaintext port? TLS brokers usually listen on 8883")
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
        # failures logged since the last connection: with several brokers the messages
        # alternate, and each is still said once
        self._logged: set[str] = set()
        self._attempts = 0
        self.address = mqtt.addresses[0]
        self._permanent: set[BrokerAddress] = set()
        self._ever_connected = False
        self._refused_publishes = 0
        # Set at every SUBACK of our subscriptions; ``refused_topics`` says what it refused.
        self.subscribed = threading.Event()
        self.refused_topics: list[str] = []
        # Subscriptions of this connection the broker refused (topic -> reason), the
        # SUBSCRIBE packets in flight (message id -> topics), the retry of the refused
        # ones, and the topics whose refusal was logged (once, until granted).
        self.refused: dict[str, str] = {}
        self._in_flight: dict[int, tuple[str, ...]] = {}
        self._retry: threading.Timer | None = None
        self._retry_delay_s = SUBSCRIBE_RETRY_MIN_S
        self._refusals: dict[str, int] = {}
        # Publishes the broker refused (MQTT 5 PUBACK reason codes), by message id, for
        # ``BrokerClient.publish_and_wait`` to report.
        self.refused_publishes: dict[int, str] = {}
        self.lock = threading.Lock()

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
        if message not in self._logged:
            log.warning("MQTT: %s; retrying", message)
            self._logged.add(message)
        else:
            log.debug("MQTT: %s (again)", message)
        if permanent:
            self._permanent.add(self.address)
            if self._permanent.issuperset(self.mqtt.addresses):
                self.gave_up.set()

    def on_pre_connect(self, client: Client, userdata: Any) -> None:
        """Before every attempt: the first goes to the first broker, each later one
        (after a failure or a loss) to the next in the list."""
        addresses = self.mqtt.addresses
        self.address = addresses[self._attempts % len(addresses)]
        self._attempts += 1
        # paho's host/port setters refuse while it is connecting; this is the moment
        # between two attempts, when it reads them next for the new socket.
        client._host, client._port = self.address.host, self.address.port

    def on_connect(
        self, client: Client, userdata: Any, flags: ConnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            name = str(reason)
            self._failed(f"the broker at {self.address} refused the "
                         f"connection: {name}{_refusal_hint(name)}",
                         permanent=name in PERMANENT_REFUSALS)
            return
        again = self._ever_connected
        self._ever_connected = True
        self._logged.clear()
        self._permanent.clear()
        self.error = None
        log.info("MQTT: %s %s (MQTT %s%s)", "reconnected to" if again else "connected to",
                 self.address, self.mqtt.protocol,
                 ", TLS" if self.mqtt.tls else "")
        self.cancel_retry()
        with self.lock:
            self.refused.clear()
            self._in_flight.clear()
            self._retry_delay_s = SUBSCRIBE_RETRY_MIN_S
        if self.subscriptions:
            self._subscribe(client, self.subscriptions)
        if self.user_on_connect is not None:
            _call_hook(self.user_on_connect, client, "on_connect")
        self.connected.set()

    def on_connect_fail(self, client: Client, userdata: Any) -> None:
        # paho calls this from inside its ``except OSError`` block, so the exception
        # it caught (and does not pass on) is the one being handled right now.
        exc = sys.exc_info()[1]
        self._failed(describe_connect_error(exc, self.mqtt, self.address),
                     permanent=isinstance(exc, ssl.SSLCertVerificationError))

    def on_disconnect(
        self, client: Client, userdata: Any, flags: DisconnectFlags, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.cancel_retry()
        if self.closing or not was_connected:
            return
        name = str(reason)
        if name == "Session taken over":
            log.error("MQTT: another client connected with our client id (duplicate "
                      "DEVICE_ID?); reconnecting")
        else:
            log.warning("MQTT: lost the broker at %s (%s); reconnecting", self.address, name)

    def _subscribe(self, client: Client, topics: Sequence[str]) -> None:
        # Under the lock: the SUBACK (network thread) may come before ``subscribe``
        # returns when a retry (timer thread) sends it.
        with self.lock:
            result, mid = client.subscribe([(topic, 1) for topic in topics])
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._in_flight[mid] = tuple(topics)

    def on_subscribe(
        self, client: Client, userdata: Any, mid: int, reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self.lock:
            topics = self._in_flight.pop(mid, None)
            if topics is None:  # not ours (``BrokerClient.resubscribe``) or stale
                return
            for topic, reason in zip(topics, reasons, strict=False):
                if reason.is_failure:
                    self.refused[topic] = str(reason)
                else:
                    self.refused.pop(topic, None)
            refused = dict(self.refused)
        for topic, reason in zip(topics, reasons, strict=False):
            self._log_subscription(topic, reason)
        self.refused_topics = [f"{topic} ({reason})" for topic, reason in refused.items()]
        if refused:
            self._schedule_retry(client, tuple(refused))
        self.subscribed.set()
        if self.user_on_subscribed is not None:
            _call_hook(self.user_on_subscribed, client, "on_subscribed")

    def _log_subscription(self, topic: str, reason: ReasonCode) -> None:
        """A refusal once per topic (until granted), and its end."""
        refusals = self._refusals.get(topic, 0)
        if reason.is_failure:
            self._refusals[topic] = refusals + 1
            if refusals == 0:
                log.warning("MQTT: the broker refused the subscription to %s (%s); asking "
                            "again, at least every %.0f s; check the broker's ACL for this "
                            "user", topic, reason, SUBSCRIBE_RETRY_MAX_S)
            else:
                log.debug("MQTT: the broker refused the subscription to %s again (%s)",
                          topic, reason)
        elif refusals:
            del self._refusals[topic]
            log.info("MQTT: the broker granted the subscription to %s after %d refusal(s)",
                     topic, refusals)

    def _schedule_retry(self, client: Client, topics: tuple[str, ...]) -> None:
        with self.lock:
            if self._retry is not None or self.closing:
                return
            delay = self._retry_delay_s
            self._retry_delay_s = min(delay * 2, SUBSCRIBE_RETRY_MAX_S)
            self._retry = threading.Timer(delay, self._resubscribe_refused, (client,))
            self._retry.daemon = True
            self._retry.start()

    def _resubscribe_refused(self, client: Client) -> None:
        with self.lock:
            self._retry = None
            topics = tuple(self.refused)
        if topics and self.connected.is_set() and not self.closing:
            log.debug("MQTT: asking again for %s", ", ".join(topics))
            self._subscribe(client, topics)

    def cancel_retry(self) -> None:
        with self.lock:
            retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()

    def on_publish(
        self, client: Client, userdata: Any, mid: int, reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            with self.lock:
                self.refused_publishes[mid] = str(reason)
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


def _topic_of(message: MQTTMessage) -> str:
    """The topic as text, for logs; paho's ``topic`` raises on bytes that are not UTF-8."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return repr(message._topic)  # the raw bytes are all there is


def _guarded_message(handler: MessageHandler) -> Callable[[Client, Any, MQTTMessage], None]:
    def on_message(client: Client, userdata: Any, message: MQTTMessage) -> None:
        try:
            handler(client, message)
        except Exception:  # a bad message must never end the network thread
            log.exception("MQTT: handling a message on %r failed", _topic_of(message))

    return on_message




# -- one connection, for a program ---------------------------------------------------
@dataclass(frozen=True)
class Incoming:
    """One message from the broker, as the programs see it."""

    topic: str
    payload: bytes
    retained: bool
    # MQTT 5 request/response properties (None under 3.1.1 or when absent)
    response_topic: str | None = None
    correlation: bytes | None = None


IncomingHandler = Callable[[Incoming], None]


def incoming(message: MQTTMessage) -> Incoming | None:
    """The typed form of a paho message; None when its topic is not UTF-8 (no topic of
    ours is)."""
    try:
        topic = message.topic
    except UnicodeDecodeError:
        return None
    properties = getattr(message, "properties", None)
    response_topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    return Incoming(
        topic, bytes(message.payload), bool(message.retain),
        response_topic if isinstance(response_topic, str) else None,
        bytes(correlation) if correlation is not None else None,
    )


class BrokerClient:
    """One MQTT connection of a program: typed messages in, QoS 1 publishes out.

    ``on_message`` and ``on_connect`` run on paho's network thread: enqueue and return.
    """

    def __init__(  # noqa: PLR0913 - connect_client's options; all keyword-only
        self,
        settings: MqttSettings,
        client_id: str | None = None,
        *,
        will: tuple[str, str] | None = None,
        subscriptions: Sequence[str] = (),
        on_message: IncomingHandler | None = None,
        on_connect: Callable[[BrokerClient], None] | None = None,
        on_subscribed: Callable[[BrokerClient], None] | None = None,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
        keepalive_s: int = KEEPALIVE_S,
    ) -> None:
        self.settings = settings
        self.keepalive_s = keepalive_s
        self.client_id = client_id or f"edge-{uuid.uuid4().hex[:12]}"
        self.will = will
        self.subscriptions = tuple(subscriptions)
        self.publish_timeout_s = publish_timeout_s
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_subscribed = on_subscribed
        self._client: Client | None = None
        self._oversized: set[str] = set()  # topics an oversized publish was refused for

    def start(self, wait_s: float | None = None) -> None:
        """Connect; with ``wait_s``, wait that long for the first connection (raises
        MqttConnectError saying why), else keep trying in the background."""
        self._client = connect_client(
            self.settings, self.client_id, self.will, subscriptions=self.subscriptions,
            on_message=self._handle if self._on_message is not None else None,
            on_connect=self._connected if self._on_connect is not None else None,
            on_subscribed=self._subscribed if self._on_subscribed is not None else None,
            wait_s=wait_s, keepalive_s=self.keepalive_s,
        )

    def stop(self, final: tuple[str, str] | None = None) -> None:
        """Publish ``final`` (retained) if connected, then disconnect."""
        client, self._client = self._client, None
        if client is not None:
            disconnect_client(client, final)

    @property
    def connected(self) -> bool:
        client = self._client
        return client is not None and client.is_connected()

    def wait_subscribed(self, timeout_s: float) -> list[str]:
        """Wait for the broker to acknowledge the subscriptions; the refused ones (with
        the reason). Raises MqttConnectError when no acknowledgement comes in time."""
        tracker = self._tracker()
        if tracker is None or not tracker.subscribed.wait(timeout_s):
            raise MqttConnectError("the broker did not acknowledge the subscriptions "
                                   f"within {timeout_s:g} s")
        return list(tracker.refused_topics)

    @property
    def refused_subscriptions(self) -> frozenset[str]:
        """Topics of our subscriptions the broker refuses on this connection (asked for
        again with a backoff until granted)."""
        return frozenset(self.refusals)

    @property
    def refusals(self) -> dict[str, str]:
        """The refused topics with the broker's reason for each."""
        tracker = self._tracker()
        if tracker is None:
            return {}
        with tracker.lock:
            return dict(tracker.refused)

    def publish(self, topic: str, payload: bytes | str, *, retain: bool,
                properties: Properties | None = None) -> None:
        """QoS 1, queued by paho while the broker is away (bounded); never raises."""
        client = self._client
        if client is None:
            return
        if len(payload) > MAX_PAYLOAD_BYTES:
            level = logging.DEBUG if topic in self._oversized else logging.WARNING
            self._oversized.add(topic)
            log.log(level, "MQTT: not publishing %d bytes to %s (limit %d)", len(payload),
                    topic, MAX_PAYLOAD_BYTES)
            return
        try:
            info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except (ValueError, RuntimeError) as exc:
            log.warning("MQTT: cannot publish to %r: %s", topic, exc)
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.debug("MQTT: publish to %s not queued (%s)", topic, info.rc)

    def publish_and_wait(self, topic: str, payload: bytes | str, *, retain: bool,
                         properties: Properties | None = None) -> None:
        """QoS 1, returning once the broker has acknowledged it. Raises BrokerUnavailable
        when not connected, when the broker refuses it, or without a PUBACK in time."""
        client = self._client
        if client is None or not client.is_connected():
            raise BrokerUnavailable("not connected to the MQTT broker; nothing was published")
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise BrokerUnavailable(f"{len(payload)} bytes is more than the {MAX_PAYLOAD_BYTES} "
                                    "an MQTT message may have; nothing was published")
        try:
            info = client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except (ValueError, RuntimeError) as exc:  # e.g. a topic paho refuses
            raise BrokerUnavailable(f"MQTT publish to {topic} failed: {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise BrokerUnavailable("too many messages wait for the MQTT broker; "
                                    "nothing was published")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # paho keeps it for the reconnect
            raise BrokerUnavailable("lost the MQTT broker while publishing; the message may "
                                    "still be delivered when the connection returns")
        try:
            info.wait_for_publish(self.publish_timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailable(f"MQTT publish to {topic} failed: {exc}") from None
        if not info.is_published():
            raise BrokerUnavailable(
                f"the MQTT broker did not acknowledge the message to {topic} within "
                f"{self.publish_timeout_s:g} s; it may still be delivered when the "
                "connection returns"
            )
        tracker = self._tracker()
        if tracker is not None:
            with tracker.lock:
                refused = tracker.refused_publishes.pop(info.mid, None)
            if refused is not None:
                user = self.settings.username or "this user"
                raise PublishRefused(f"the broker refused the message to {topic} "
                                     f"({refused}); check the broker's ACL for {user}",
                                     topic, refused)

    def resubscribe(self, topics: Sequence[str]) -> bool:
        """Subscribe to ``topics`` again, which makes the broker send their retained
        messages anew (after it may have dropped some to us); False when not connected."""
        client = self._client
        if client is None or not client.is_connected():
            return False
        result, _ = client.subscribe([(topic, 1) for topic in topics])
        return result == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _tracker(self) -> _Tracker | None:
        return _tracker_of(self._client) if self._client is not None else None

    def _handle(self, client: Client, message: MQTTMessage) -> None:
        typed = incoming(message)
        if typed is None:
            log.debug("MQTT: ignored a message whose topic is not UTF-8")
            return
        assert self._on_message is not None
        self._on_message(typed)

    def _connected(self, client: Client) -> None:
        # paho may deliver CONNACK before ``start`` has stored the client
        self._client = client
        assert self._on_connect is not None
        self._on_connect(self)

    def _subscribed(self, client: Client) -> None:
        assert self._on_subscribed is not None
        self._on_subscribed(self)
