"""What reaches a device over MQTT, as typed messages for the agent's inbox, and the
pure routing from (topic, payload) to those messages.

The agent's link (``edge_agent/agent/link.py``) and the fleet simulator both route
with ``route``, so a simulated device reads the wire exactly as a real one does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.protocol.safejson import UntrustedJson, loads_object
from edge_agent.protocol.state import Source
from edge_agent.protocol.tags import (
    REQUEST_ID_RULE,
    SPREAD_RULE,
    is_request_id,
    is_spread,
)
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 4096
# A refused ``reply_to`` is quoted in its log line up to this many characters.
SHOWN_REPLY_TO_CHARS = 40
REPLY_TO_RULE = f'"reply_to" must be a token {REQUEST_ID_RULE}'

# Answers a command (its MQTT 5 reply, or its reply_to topic), with the answer document.
Reply = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class CheckRequest:
    """Check the registry now; ``install`` also applies a pending update in notify mode;
    ``force`` applies it despite the maintenance window and the app's update lock (a
    device command only); ``spread`` (a fleet check only) delays the check by a random
    share of that many seconds."""

    request_id: str | None = None
    install: bool = False
    reply: Reply | None = None
    force: bool = False
    spread: float = 0.0
    fleet: bool = False
    # The MQTT 3.1.1 way to ask for an answer (no Response Topic there): the last level
    # of ``P/devices/<id>/reply/<reply_to>``; the link binds it to ``reply``.
    reply_to: str | None = None
    # Why a ``reply_to`` was refused (the command still runs, unanswered).
    reply_to_refused: str | None = None


@dataclass(frozen=True)
class CommandBody:
    """The optional JSON body of a command."""

    request_id: str | None = None
    force: bool = False
    spread: float = 0.0
    reply_to: str | None = None
    reply_to_refused: str | None = None


@dataclass(frozen=True)
class RemoteTagMessage:
    """A desired-tag message from MQTT: scope is device, group or fleet."""

    scope: Source
    payload: bytes
    topic: str = ""
    group: str | None = None
    # Retained (a replay after (re)connecting) or live (an operator publishing now).
    retained: bool = True


@dataclass(frozen=True)
class RemoteAgentMessage:
    """A desired agent version from MQTT (payload as a desired tag's): device, group or
    fleet scope, like ``RemoteTagMessage``."""

    scope: Source
    payload: bytes
    topic: str = ""
    group: str | None = None
    retained: bool = True


@dataclass(frozen=True)
class RemoteReset:
    """The MQTT session (re)started: forget the remote desired tags. The broker replays
    the retained ones; a tag cleared while we were away must not linger."""


@dataclass(frozen=True)
class RemoteReady:
    """The desired-tag subscriptions are acknowledged: publish a fresh state, and check
    once the retained tags that follow have settled."""


WireMessage = (CheckRequest | RemoteTagMessage | RemoteAgentMessage | RemoteReset
               | RemoteReady)


def parse_command(payload: bytes) -> CommandBody:
    """The fields of a command payload. Raises CommandRefused for a ``force`` that is
    not a boolean or a ``spread`` out of range: a command whose extent is unclear is not
    run. A missing, non-JSON or unparseable body is a plain command."""
    request_id = parse_request_id(payload)
    if request_id is None and not payload.lstrip().startswith(b"{"):
        return CommandBody()
    try:
        body = loads_object(payload, max_bytes=MAX_COMMAND_BYTES)
    except UntrustedJson:
        return CommandBody(request_id)
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise CommandRefused('"force" must be true or false')
    spread = body.get("spread", 0)
    if not is_spread(spread):
        raise CommandRefused(SPREAD_RULE)
    reply_to, refused = parse_reply_to(body)
    return CommandBody(request_id, force, float(spread), reply_to, refused)


def parse_reply_to(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(token, None) for a ``reply_to`` in the request-id grammar, (None, why) for any
    other value, (None, None) when absent. The grammar keeps the answer one topic level
    below the device's own ``reply/``: no separator, wildcard, control character or
    "..", so no value can aim it at another topic."""
    value = body.get("reply_to")
    if value is None:
        return None, None
    if is_request_id(value):
        return value, None
    if isinstance(value, str):
        shown = value if len(value) <= SHOWN_REPLY_TO_CHARS else (
            value[:SHOWN_REPLY_TO_CHARS] + "...")
        return None, f"{REPLY_TO_RULE}, got {shown!r}"
    return None, f"{REPLY_TO_RULE}, got a {type(value).__name__}"


class CommandRefused(ValueError):
    """A command payload with a field the agent will not guess about."""


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


def route(  # noqa: PLR0911, PLR0913 - a message and its context; one return per topic
    topics: Topics,
    device_id: str,
    groups: Sequence[str],
    topic: str,
    payload: bytes,
    *,
    retained: bool = False,
    reply: Reply | None = None,
) -> WireMessage | None:
    """The inbox message for one MQTT message, or None when it is not for this agent."""
    if topic == topics.device_tag(device_id):
        return RemoteTagMessage(Source.DEVICE, payload, topic, retained=retained)
    if topic == topics.fleet_tag:
        return RemoteTagMessage(Source.FLEET, payload, topic, retained=retained)
    for group in groups:
        if topic == topics.group_tag(group):
            return RemoteTagMessage(Source.GROUP, payload, topic, group, retained=retained)
    if topic == topics.device_agent(device_id):
        return RemoteAgentMessage(Source.DEVICE, payload, topic, retained=retained)
    if topic == topics.fleet_agent:
        return RemoteAgentMessage(Source.FLEET, payload, topic, retained=retained)
    for group in groups:
        if topic == topics.group_agent(group):
            return RemoteAgentMessage(Source.GROUP, payload, topic, group, retained=retained)
    install = topic == topics.device_install(device_id)
    if install or topic in (topics.device_check(device_id), topics.fleet_check):
        if retained:
            # A retained command would fire again at every reconnect.
            log.warning("ignored a retained command on %s; publish commands unretained",
                        topic)
            return None
        return _command(topic, payload, install=install, fleet=topic == topics.fleet_check,
                        reply=reply)
    return None


def _command(topic: str, payload: bytes, *, install: bool, fleet: bool,
             reply: Reply | None) -> CheckRequest | None:
    try:
        body = parse_command(payload)
    except CommandRefused as exc:
        log.warning("dropped a command on %s: %s", topic, exc)
        return None
    if fleet and body.force:
        # One operator overriding every device's window and app lock at once is far
        # more likely a slip than a plan: force addresses one device.
        log.warning("dropped a command on %s: force applies to one device's command, "
                    "not the fleet's", topic)
        return None
    return CheckRequest(body.request_id, install=install, reply=reply, force=body.force,
                        spread=body.spread if fleet else 0.0, fleet=fleet,
                        reply_to=body.reply_to, reply_to_refused=body.reply_to_refused)
