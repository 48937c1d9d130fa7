"""Wires the agent to the outside world for ``edge-agent run``: the MQTT link (when
MQTT_HOST is set) and the Docker-events watcher feed the agent's inbox."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge_agent.agent.config import Settings
from edge_agent.agent.loop import Agent
from edge_agent.agent.watcher import ContainerWatcher
from edge_agent.protocol.errors import ConfigError

if TYPE_CHECKING:
    from edge_agent.agent.link import AgentLink

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
# With MQTT, the first check waits this long at most for the broker's retained desired
# tags (it runs as soon as they have settled); a broker that is down costs no more.
FIRST_CHECK_HOLD_S = 5.0


def run_agent(settings: Settings, install_signals: Callable[[Callable[[], None]], None]) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    agent = Agent(settings)
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
    watcher = ContainerWatcher(settings.container_name, agent.inbox)
    install_signals(agent.request_exit)
    watcher.start()
    if link is not None:
        link.start()
    try:
        agent.run()
    finally:
        watcher.stop()
        if link is not None:
            link.stop()
    return 0
