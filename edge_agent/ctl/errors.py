"""How an edge-ctl command ends: its exit codes, and the error that carries one."""

from __future__ import annotations

from edge_agent.protocol.settings import EXIT_CONFIG

EXIT_OK = 0
# The device did not apply it (rolled back, rejected, superseded, failed, ...), or the
# broker refused what edge-ctl sent (the operator ACL).
EXIT_FAILED = 1
EXIT_USAGE = EXIT_CONFIG  # usage or configuration error, as for every program
EXIT_TIMEOUT = 3  # no answer in time, or the broker is unreachable
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class CtlError(Exception):
    """Ends the command with ``code`` and a one-line message on stderr."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code
