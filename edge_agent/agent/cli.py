"""Command line: ``edge-agent [run|status|healthcheck]``. The only module that prints."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.agent.config import Setting, describe_settings, load_file_settings, load_settings
from edge_agent.files import StorageError, read_regular_file
from edge_agent.logs import setup_logging
from edge_agent.protocol import safejson
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import EXIT_CONFIG

if TYPE_CHECKING:
    import argparse

STATUS_MAX_BYTES = 1 << 20


def _row(setting: Setting) -> str:
    return f"  {setting.name:<20} {setting.help}\n  {'':<20} default: {setting.default}"


def build_parser() -> argparse.ArgumentParser:
    import argparse  # noqa: PLC0415 - see main()

    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Keeps one Docker container at the image tag the fleet wants.",
        epilog="settings (environment variables; they win over CONFIG_FILE):\n"
        + describe_settings(_row),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "command", nargs="?", default="run", choices=("run", "status", "healthcheck"),
        help="run the agent (default); print its last state; exit 0 if its loop is alive",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    # The plain `run` needs no parser: argparse stays unimported, ~0.4 MB less RSS for the
    # long-running agent (docs/BENCHMARKS.md).
    command = "run" if arguments in ([], ["run"]) else build_parser().parse_args(arguments).command
    try:
        if command in ("status", "healthcheck"):
            # They read a file: only where it is (and how old it may be) matters, not
            # CONTAINER_IMAGE or MQTT (`docker exec edge-agent edge-agent status` works too).
            data_dir, telemetry_interval_s = load_file_settings()
            if command == "status":
                return _status(data_dir)
            return _healthcheck(data_dir, telemetry_interval_s)
        settings = load_settings()
        if settings.trusted_keys:
            # the keys are read at start: a missing or wrong one is a configuration error
            from edge_agent.agent.trust import load_trusted_keys  # noqa: PLC0415 - only with keys

            load_trusted_keys(settings.trusted_keys)
    except ConfigError as exc:
        print(f"edge-agent: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    from edge_agent.agent.runtime import run_agent  # noqa: PLC0415 - keeps --help fast

    return run_agent(settings, install_signals=_install_signals)


def _install_signals(request_exit: Callable[[], None]) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        request_exit()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _read_status(path: Path) -> dict[str, Any]:
    """status.json as the agent wrote it: a regular file (no link, FIFO or device), of
    bounded size, holding a JSON object. StorageError or UntrustedJson otherwise."""
    data = read_regular_file(path, max_bytes=STATUS_MAX_BYTES)
    if data is None:
        raise StorageError(f"{path} does not exist")
    return safejson.loads_object(data, max_bytes=STATUS_MAX_BYTES)


def _status(data_dir: Path) -> int:
    path = data_dir / "status.json"
    try:
        document = _read_status(path)
    except (StorageError, safejson.UntrustedJson) as exc:
        print(f"edge-agent: no state yet at {path}: {exc}", file=sys.stderr)
        return 1
    # Re-encoded, not echoed: escapes stay escaped, so the file cannot drive the terminal.
    print(json.dumps(document, indent=1))
    return 0


# Update steps during which the app may be down for a moment (the swap of containers).
UPDATING = ("checking", "pulling", "installing", "verifying", "rolling_back")


def _healthcheck(data_dir: Path, telemetry_interval_s: float) -> int:
    """Healthy when the agent does its job: its loop published its state recently (it does
    every TELEMETRY_INTERVAL), the registry has answered it since it started, and the app
    runs (or an update is under way). docs/OPERATIONS.md says the same."""
    path = data_dir / "status.json"
    try:
        document = _read_status(path)
        published = datetime.fromisoformat(str(document["ts"]).replace("Z", "+00:00"))
        status = str(document["update"]["status"])
        app = str(document["running"]["status"])
        answered = document.get("registry_answered_at")
        error = document["update"].get("last_error")
    except (StorageError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"unhealthy: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    age = time.time() - published.timestamp()
    limit = 2 * telemetry_interval_s + 30
    if age > limit:
        print(f"unhealthy: last state is {age:.0f} s old (limit {limit:.0f} s)", file=sys.stderr)
        return 1
    shown_error = ("none" if error is None
                   else error if isinstance(error, str) and error.isprintable() else "see the log")
    if not answered:
        print(f"unhealthy: the registry has not answered since the agent started "
              f"(last error: {shown_error[:200]})", file=sys.stderr)
        return 1
    if app != "running" and status not in UPDATING:
        shown_app = app if app.isidentifier() else repr(app)
        print(f"unhealthy: the app container is {shown_app[:40]}, not running "
              f"(last error: {shown_error[:200]})", file=sys.stderr)
        return 1
    shown = status if status.isidentifier() else repr(status)  # no escapes from a planted file
    print(f"healthy: state {age:.0f} s old, update {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
