"""``edge-bridge``: the HTTP-to-MQTT bridge's entry point. The only bridge module that prints."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from edge_agent import __version__
from edge_agent.bridge.settings import BRIDGE_SETTINGS, SHORT_TOKEN_CHARS, load_bridge_settings
from edge_agent.logs import setup_logging
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import EXIT_CONFIG

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    rows = "\n".join(f"  {name:<22} {meaning}" + (f"\n  {'':<22} default: {default}"
                                                    if default else "")
                     for name, default, meaning in BRIDGE_SETTINGS)
    return argparse.ArgumentParser(
        prog="edge-bridge",
        description="HTTP-to-MQTT bridge: set desired tags over HTTP, see the fleet at /.",
        epilog="settings (environment variables):\n" + rows,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"edge-bridge {__version__}")
    parser.parse_args(argv)
    try:
        settings = load_bridge_settings()
    except ConfigError as exc:
        print(f"edge-bridge: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level, settings.log_format)
    if len(settings.token) < SHORT_TOKEN_CHARS:
        log.warning("BRIDGE_TOKEN is shorter than %d characters; use a long random token",
                    SHORT_TOKEN_CHARS)
    from edge_agent.bridge.server import Bridge  # noqa: PLC0415 - keeps --help fast

    try:
        bridge = Bridge(settings)
    except OSError as exc:
        print(f"edge-bridge: cannot listen on {settings.host}:{settings.port}: {exc.strerror}",
              file=sys.stderr)
        return 1
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    bridge.start()
    # the actual port, for BRIDGE_PORT=0 (tests and scripts read this line)
    print(f"edge-bridge listening on {bridge.url}", flush=True)
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    bridge.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
