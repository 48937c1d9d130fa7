"""Wires the agent to the outside world for ``edge-agent run``: the MQTT link (when
MQTT_HOST is set) and the Docker-events watcher feed the agent's inbox."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.agent import deadline
from edge_agent.agent.config import Settings
from edge_agent.agent.loop import Agent
from edge_agent.agent.registry import in_container
from edge_agent.agent.selfupdate import SelfUpdate
from edge_agent.agent.watcher import ContainerWatcher
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import EXIT_CONFIG

if TYPE_CHECKING:
    from edge_agent.agent.link import AgentLink

log = logging.getLogger(__name__)

# With MQTT, the first check waits this long at most for the broker's retained desired
# tags (it runs as soon as they have settled); a broker that is down costs no more.
FIRST_CHECK_HOLD_S = 5.0
# Of the SIGTERM promise (deadline.STOP_PROMISE_S), what the goodbyes may use at most;
# the rest is for the step in progress (deadline.STOP_GRACE_S) and the interpreter's exit.
WATCHER_STOP_S = 0.2
GOODBYE_BY_S = deadline.STOP_PROMISE_S - 1.0


def run_agent(settings: Settings, install_signals: Callable[[Callable[[], None]], None]) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    agent = Agent(settings)
    if settings.device_id_is_hostname and in_container():
        # Docker names a container's host after its random id: a new id at every recreate
        # (an upgrade of the agent) makes a new device in the fleet, and the old one stays.
        log.warning("DEVICE_ID is not set: using the container's host name %r, which changes "
                    "when the container is recreated; set DEVICE_ID (or docker run --hostname)",
                    settings.device_id)
    link: AgentLink | None = None
    if settings.mqtt is not None:
        # imported only with MQTT_HOST: paho-mqtt costs ~1 MB of RSS (docs/BENCHMARKS.md)
        from edge_agent.agent.link import AgentLink  # noqa: PLC0415

        try:
            link = AgentLink(settings, agent.inbox)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EXIT_CONFIG
        agent.status.state_sinks.append(link.publish_state)
        agent.status.event_sinks.append(link.publish_event)
        agent.defer_first_check(FIRST_CHECK_HOLD_S)
    else:
        log.info("MQTT_HOST is not set: standalone (tag file and polling only)")
    selfupdate = SelfUpdate(settings, agent.status.agent, agent.status.event,
                            should_exit=lambda: agent.should_exit)
    agent.selfupdate = selfupdate
    if link is not None:
        selfupdate.pause_link = link.pause
        selfupdate.resume_link = link.start
    watcher = ContainerWatcher(settings.container_name, agent.inbox)
    install_signals(_stop_handler(agent))
    # Only the agent holding the management lock touches the app (docs/SELF-UPDATE.md);
    # a handover's candidate proves itself first.
    if not selfupdate.startup():
        selfupdate.close()
        return 0
    watcher.start()
    if link is not None:
        link.start()
    if selfupdate.announce is not None:
        name, fields = selfupdate.announce
        agent.status.event(name, **fields)
    try:
        agent.run()
    finally:
        selfupdate.close()
        watcher.stop(WATCHER_STOP_S)
        if link is not None:
            _say_goodbye(link)
    return 0


def _stop_handler(agent: Agent) -> Callable[[], None]:
    """What SIGTERM/SIGINT do. The handler runs in the loop's thread between two
    bytecodes, possibly while that thread holds the inbox's lock, so it only notes the
    request and sets an event; a small thread wakes the loop (``request_exit``)."""
    asked = threading.Event()

    def tell_agent() -> None:
        asked.wait()
        agent.request_exit()

    threading.Thread(target=tell_agent, name="stop-request", daemon=True).start()

    def on_signal() -> None:
        if deadline.stop_requested_at() is not None:
            return  # a second signal: already on the way out
        deadline.request_stop()
        asked.set()

    return on_signal


def _say_goodbye(link: AgentLink) -> None:
    """Publish "offline" and disconnect, but not past the SIGTERM promise: a stalled
    broker gets what time is left, then the will says offline for us."""
    stopped_at = deadline.stop_requested_at()
    left = GOODBYE_BY_S if stopped_at is None else stopped_at + GOODBYE_BY_S - time.monotonic()
    goodbye = threading.Thread(target=link.stop, name="mqtt-goodbye", daemon=True)
    goodbye.start()
    goodbye.join(max(left, 0.1))
    if goodbye.is_alive():
        log.warning("MQTT: the broker did not take the goodbye in time; leaving without it")
