"""Wires the agent to the outside world for ``edge-agent run``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.agent import Agent
from edge_agent.config import Settings

log = logging.getLogger(__name__)


def run_agent(settings: Settings, install_signals: Callable[[Callable[[], None]], None]) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    agent = Agent(settings)
    install_signals(agent.request_exit)
    agent.run()
    return 0
