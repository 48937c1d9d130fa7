"""Timing how long an agent process takes to stop after SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass

from tests.support.agent_process import AgentProcess

ABORT_WAIT_S = 5.0  # for the stack dump to reach the log


@dataclass(frozen=True)
class Stopped:
    """How an agent process ended after SIGTERM: its exit code (None: it had to be
    killed) and the seconds from the signal to its exit (or to giving up)."""

    code: int | None
    seconds: float


def time_sigterm(agent: AgentProcess, give_up_s: float = 15.0) -> Stopped:
    """Send SIGTERM and wait up to ``give_up_s`` for the exit. After that, SIGABRT, so
    that the agent's log shows where each thread was (PYTHONFAULTHANDLER), then SIGKILL."""
    proc = agent.proc
    assert proc is not None and proc.poll() is None, "the agent is not running"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(give_up_s)
    except subprocess.TimeoutExpired:
        code = None
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(ABORT_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return Stopped(code, time.monotonic() - started)
