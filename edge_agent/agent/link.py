"""The agent on the broker: desired tags and commands in; availability, state, events
and replies out.

paho's network thread never does the agent's work: ``AgentLink`` turns every message
into a typed message in the agent's inbox (``protocol.messages.route``) and returns.
The broker may be down at start or vanish at any time; the connection (``protocol.mqtt``)
reconnects on its own and nothing here ever blocks or fails an update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import queue
import time
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent.config import Settings
from edge_agent.agent.discovery import discovery_config
from edge_agent.agent.heartbeat import StateGate
from edge_agent.agent.loop import Message
from edge_agent.protocol.events import EventName
from edge_agent.protocol.messages import (
    CheckRequest,
    RemoteReady,
    RemoteReset,
    Reply,
    route,
)
from edge_agent.protocol.mqtt import BrokerClient, Incoming, tls_context
from edge_agent.protocol.state import Availability
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)

# Distinct refused response topics (and reply_to values) remembered to warn about each
# once; past this many, further ones are logged at DEBUG only (a requester cannot grow
# the agent's memory).
MAX_REFUSED_REPLY_TOPICS = 100


class AgentLink:
    """One device's MQTT connection, feeding the agent's inbox."""

    def __init__(self, settings: Settings, inbox: queue.Queue[Message]) -> None:
        if settings.mqtt is None:
            raise ValueError("AgentLink needs MQTT settings (MQTT_HOST)")
        self.mqtt = settings.mqtt
        self.device_id = settings.device_id
        self.groups = settings.device_groups
        self.topics = Topics(settings.mqtt.topic_prefix)
        self._inbox = inbox
        self._availability = self.topics.availability(self.device_id)
        self._state_topic = self.topics.state(self.device_id)
        self._events_topic = self.topics.events(self.device_id)
        self._discovery = discovery_config(settings) if settings.ha_discovery else None
        self._refused_reply_topics: set[str] = set()
        self._state_gate = StateGate(settings.heartbeat_interval_s)
        if self.mqtt.tls:
            tls_context(self.mqtt)  # unreadable TLS files stop the agent at start
        self.broker = BrokerClient(
            self.mqtt, f"edge-agent-{settings.device_id}",
            will=(self._availability, Availability.OFFLINE),
            subscriptions=self.subscriptions, on_message=self._on_message,
            on_connect=self._on_connect, on_subscribed=self._on_subscribed,
            keepalive_s=settings.mqtt_keepalive_s,
        )

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
            t.device_agent(self.device_id),
            *(t.group_agent(group) for group in self.groups),
            t.fleet_agent,
        ]

    @property
    def tag_subscriptions(self) -> frozenset[str]:
        """The desired tag and agent version topics: the view of the retained ones is
        complete only once the broker has granted all of them."""
        t = self.topics
        return frozenset({
            t.device_tag(self.device_id), *(t.group_tag(group) for group in self.groups),
            t.fleet_tag, t.device_agent(self.device_id),
            *(t.group_agent(group) for group in self.groups), t.fleet_agent,
        })

    @property
    def connected(self) -> bool:
        return self.broker.connected

    def start(self) -> None:
        """Connect in the background; a broker that is down is retried, never waited for."""
        log.info("MQTT: connecting to %s as %s (topics under %s/)", self.mqtt.where,
                 self.mqtt.username or "anonymous", self.topics.prefix)
        self.broker.start(wait_s=None)

    def stop(self) -> None:
        """Say ``offline`` ourselves (a clean stop fires no will), then disconnect."""
        self.broker.stop(final=(self._availability, Availability.OFFLINE))

    def pause(self) -> None:
        """Disconnect cleanly without saying ``offline`` (no will either): another agent
        of this device (a handover's candidate, docs/SELF-UPDATE.md) takes the client id
        over. ``start()`` connects again."""
        self.broker.stop(final=None)

    # -- agent -> broker (agent thread; paho's publish is thread-safe) ------------------
    def publish_state(self, document: dict[str, Any]) -> None:
        """State sink: a change is sent at once, an unchanged state only every
        HEARTBEAT_INTERVAL (``heartbeat.StateGate``). While disconnected it is dropped: a
        stale retained state queued now would land after the fresh one published on
        reconnect."""
        now = time.monotonic()
        if self.connected and self._state_gate.due(document, now):
            self.broker.publish(self._state_topic, _json(document), retain=True)
            self._state_gate.sent(document, now)

    def publish_event(self, event: dict[str, Any]) -> None:
        """Event sink. Progress is dropped while disconnected; the rest waits in paho's
        queue (bounded) so the outcome of an update still arrives after an outage."""
        if event.get("event") == EventName.PULL_PROGRESS and not self.connected:
            return
        self.broker.publish(self._events_topic, _json(event), retain=False)

    def _reply(self, topic: str, correlation: bytes | None, answer: dict[str, Any]) -> None:
        properties = None
        if correlation is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.CorrelationData = correlation
        self.broker.publish(topic, _json(answer), retain=False, properties=properties)

    # -- broker -> agent (paho's network thread: enqueue and return) --------------------
    def _on_connect(self, broker: BrokerClient) -> None:
        self._state_gate.reset()
        self._inbox.put(RemoteReset())  # before any retained tag of this session
        broker.publish(self._availability, Availability.ONLINE, retain=True)
        if self._discovery is not None:
            topic, config = self._discovery
            broker.publish(topic, _json(config), retain=True)

    def _on_subscribed(self, broker: BrokerClient) -> None:
        # Without, say, the device's own tag the group tag would look like the desired
        # one: the agent keeps its last complete view until the broker grants every tag
        # subscription (``protocol.mqtt`` asks again for the refused ones).
        if not broker.refused_subscriptions & self.tag_subscriptions:
            self._inbox.put(RemoteReady())

    def _on_message(self, message: Incoming) -> None:
        reply = self._reply_for(message)
        routed = route(self.topics, self.device_id, self.groups, message.topic,
                       message.payload, retained=message.retained, reply=reply)
        if routed is None:
            log.debug("MQTT: ignored a message on %r", message.topic)
            return
        if isinstance(routed, CheckRequest) and message.response_topic is None:
            routed = self._reply_to(routed, message.topic)
        self._inbox.put(routed)

    def _reply_to(self, request: CheckRequest, command_topic: str) -> CheckRequest:
        """The MQTT 3.1.1 request: answered on ``reply/<reply_to>`` of this device (the
        token's grammar keeps it one level below there). A Response Topic, when the
        command has one, wins: it is the MQTT 5 way."""
        if request.reply_to is not None:
            topic = self.topics.reply(self.device_id, request.reply_to)
            return dataclasses.replace(request, reply=functools.partial(self._reply, topic, None))
        refused = request.reply_to_refused
        if refused is not None:
            if self._first_refusal(refused):
                log.warning("MQTT: ignored the reply_to of a command on %s: %s (the command "
                            "runs, unanswered)", command_topic, refused)
            else:
                log.debug("MQTT: ignored the reply_to of a command on %s again: %s",
                          command_topic, refused)
        return request

    def _reply_for(self, message: Incoming) -> Reply | None:
        topic = message.response_topic
        if topic is None:
            return None
        if not self.topics.is_reply_topic(self.device_id, topic):
            # Its own state, availability or discovery topic would be overwritten by the
            # answer (the ACL lets the device write there): answer below reply/ only.
            if self._first_refusal(topic):
                log.warning("MQTT: ignored the response topic %r of a command on %s: answers "
                            "go only below %s (the command runs, unanswered)", topic,
                            message.topic, self.topics.reply_root(self.device_id))
            else:
                log.debug("MQTT: ignored the response topic %r on %s again", topic,
                          message.topic)
            return None
        return functools.partial(self._reply, topic, message.correlation)

    def _first_refusal(self, refused: str) -> bool:
        """True the first time a refused value (response topic, reply_to) is seen: a
        requester repeats its mistake at every command, and is warned once."""
        if refused in self._refused_reply_topics or (
                len(self._refused_reply_topics) >= MAX_REFUSED_REPLY_TOPICS):
            return False
        self._refused_reply_topics.add(refused)
        return True


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()
