"""``edge-ctl``: the operator's command line for a fleet, over MQTT (docs/PROTOCOL.md).

    edge-ctl devices                           table of the fleet
    edge-ctl set-tag 2.0 --device dev1 --wait  set a desired tag, wait for the device
    edge-ctl set-tag 2.0 --group lab           ... or for a group, or --fleet
    edge-ctl clear-tag --device dev1           remove an override
    edge-ctl set-agent-version 0.2 --group lab the agent version (docs/SELF-UPDATE.md)
    edge-ctl check --device dev1 --wait        ask for a registry check now
    edge-ctl install --device dev1 --wait      apply a pending update (UPDATE_MODE=notify)
    edge-ctl watch                             live events, with pull progress
    edge-ctl rollout start --tag 2.0 --group lab --waves 1,25%,100% --watch
                                               a staged rollout, driven by the bridge
    edge-ctl rollout list|show ID|pause ID|resume ID|abort ID

The broker is configured like the agent's (MQTT_HOST, MQTT_PORT, MQTT_USERNAME,
MQTT_PASSWORD(_FILE), MQTT_TLS, MQTT_CA_FILE, ..., MQTT_TOPIC_PREFIX); options override
them. The user needs the operator ACL (``mosquitto/add-device --operator NAME``).
``rollout`` talks HTTP to the bridge instead: BRIDGE_URL and BRIDGE_TOKEN(_FILE)
(``bridge_client.py``).
Human output by default, ``--json`` for scripts. This module is the entry point: the
argument parser, the settings and ``main``, which turns every error into its exit code
(``errors.py``) and one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from edge_agent import __version__
from edge_agent.ctl.bridge_client import load_bridge_settings
from edge_agent.ctl.commands import COMMANDS
from edge_agent.ctl.errors import EXIT_INTERRUPTED, EXIT_USAGE, CtlError
from edge_agent.ctl.render import Printer
from edge_agent.ctl.rollouts import add_rollout_parser, run_rollout
from edge_agent.protocol.errors import ConfigError
from edge_agent.protocol.settings import MqttSettings, load_mqtt_settings
from edge_agent.protocol.tags import MAX_SPREAD_S, REQUEST_ID_RULE, is_request_id
from edge_agent.protocol.topics import ID_PATTERN, ID_RE

DEFAULT_WAIT_S = 300.0


def _set_agent_version_parser(commands: Any, common: argparse.ArgumentParser
                              ) -> argparse.ArgumentParser:
    """``set-agent-version`` (docs/SELF-UPDATE.md); its scope is added by the caller."""
    set_agent: argparse.ArgumentParser = commands.add_parser(
        "set-agent-version", parents=[common],
        help="set the desired agent version (agent image tag) of a device, a group or the "
        "fleet; --clear removes it")
    set_agent.add_argument("version", nargs="?", help="the agent image's tag")
    set_agent.add_argument("--clear", action="store_true", help="remove the desired version")
    set_agent.add_argument("--request-id", help="request id to send (default: a random one)")
    return set_agent


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one block per subcommand
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group(
        "common options (the broker options override the MQTT_* environment)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output (JSON; one object per line for watch)")
    group.add_argument("-H", "--host", default=argparse.SUPPRESS,
                       help="broker host, or host[:port],... tried in turn (MQTT_HOST; "
                            "default localhost)")
    group.add_argument("-p", "--port", default=argparse.SUPPRESS, help="broker port (MQTT_PORT)")
    group.add_argument("-u", "--username", default=argparse.SUPPRESS,
                       help="user with the operator ACL (MQTT_USERNAME)")
    group.add_argument("--password-file", default=argparse.SUPPRESS,
                       help="file holding the password (MQTT_PASSWORD_FILE)")
    group.add_argument("--prefix", default=argparse.SUPPRESS,
                       help="topic prefix (MQTT_TOPIC_PREFIX; default edge)")

    parser = argparse.ArgumentParser(
        prog="edge-ctl", parents=[common],
        description="Operate an edge-agent fleet over MQTT: list devices, set desired tags, "
        "send checks, watch updates; roll tags out in waves through the bridge (rollout).",
        epilog="The broker connection uses the agent's MQTT_* variables (see edge-agent "
        "--help). Exit codes: 0 done, 1 not applied (rolled back, rejected, superseded, "
        "failed) or refused by the broker, a rollout halted or aborted, 2 usage (a "
        "rollout spec the bridge refused), 3 no answer in time or broker/bridge unreachable.",
    )
    parser.add_argument("--version", action="version", version=f"edge-ctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = commands.add_parser("devices", parents=[common],
                                  help="table of the fleet: online, running/desired tag, status")
    devices.add_argument("device", nargs="*", help="only these devices")

    def scope(sub: argparse.ArgumentParser, *, groups: bool = True) -> None:
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("--device", "-d", metavar="ID")
        if groups:
            target.add_argument("--group", "-g", metavar="NAME")
        target.add_argument("--fleet", action="store_true")

    def waiting(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--wait", action="store_true", help=what)
        sub.add_argument("--timeout", type=float, default=DEFAULT_WAIT_S, metavar="S",
                         help=f"how long --wait waits (default {DEFAULT_WAIT_S:g} s)")

    def force_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--force", action="store_true",
                         help="(with --device) apply a pending update now, outside the "
                         "device's maintenance window and despite its app's update lock")

    def spread_option(sub: argparse.ArgumentParser, what: str) -> None:
        sub.add_argument("--spread", type=int, metavar="S", help=what)

    set_tag = commands.add_parser(
        "set-tag", parents=[common], help="set the desired tag of a device, a group or the fleet")
    set_tag.add_argument("tag", help="image tag, or sha256:<digest>")
    scope(set_tag)
    waiting(set_tag, "(with --device) return once the device runs it; exit 1 with the reason "
            "if it rolled back, refused it or another desired tag replaced it")
    set_tag.add_argument("--request-id", help="request id to send (default: a random one)")
    spread_option(set_tag, "(with --group or --fleet) each device applies the tag after a "
                  "random delay of up to S seconds (0 to 86400)")
    set_tag.add_argument("--force", action="store_true",
                         help="publish without asking the registry whether the tag exists "
                         "(by default a tag the registry does not have is refused; "
                         "REGISTRY_CHECK=false turns the question off)")

    clear_tag = commands.add_parser("clear-tag", parents=[common],
                                    help="remove the desired tag of a device, group or fleet")
    scope(clear_tag)

    scope(_set_agent_version_parser(commands, common))

    check = commands.add_parser("check", parents=[common],
                                help="ask a device (or the fleet) to check the registry now")
    scope(check, groups=False)
    waiting(check, "(with --device) wait for the device's answer")
    force_option(check)
    spread_option(check, "(with --fleet) each device checks after a random delay of up to "
                  "S seconds (0 to 86400)")

    install = commands.add_parser(
        "install", parents=[common], help="apply a pending update (UPDATE_MODE=notify)")
    install.add_argument("--device", "-d", metavar="ID", required=True)
    install.set_defaults(fleet=False)
    waiting(install, "wait for the device's answer (the update's outcome)")
    force_option(install)

    watch = commands.add_parser("watch", parents=[common],
                                help="live view of events and status changes, with pull progress")
    watch.add_argument("--device", "-d", metavar="ID", help="only this device")
    watch.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N events")
    add_rollout_parser(commands)
    return parser


def check_ids(args: argparse.Namespace) -> None:
    """Device ids and group names are one topic level: no wildcards, no separators.
    A request id follows the one request-id grammar."""
    for option in ("device", "group"):
        values = getattr(args, option, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not ID_RE.fullmatch(value):
                raise CtlError(f"--{option} {value!r} must match {ID_PATTERN}", EXIT_USAGE)
    spread = getattr(args, "spread", None)
    if spread is not None:
        if not 0 <= spread <= MAX_SPREAD_S:
            raise CtlError(f"--spread must be 0 to {MAX_SPREAD_S} seconds", EXIT_USAGE)
        if getattr(args, "device", None):
            raise CtlError("--spread is for --group or --fleet (a device acts at once)",
                           EXIT_USAGE)
    # check/install --force overrides one device's window and lock (set-tag --force only
    # skips the registry question, for any scope)
    if (args.command in ("check", "install") and getattr(args, "force", False)
            and not getattr(args, "device", None)):
        raise CtlError("--force needs --device (it overrides one device's window and lock)",
                       EXIT_USAGE)
    request_id = getattr(args, "request_id", None)
    if request_id is not None and not is_request_id(request_id):
        raise CtlError(f"--request-id must match {REQUEST_ID_RULE}", EXIT_USAGE)


def mqtt_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> MqttSettings:
    """The MQTT_* settings, with the command line's broker options over them."""
    env = dict(environ)
    overrides = {"host": "MQTT_HOST", "port": "MQTT_PORT", "username": "MQTT_USERNAME",
                 "password_file": "MQTT_PASSWORD_FILE", "prefix": "MQTT_TOPIC_PREFIX"}
    for option, variable in overrides.items():
        value = getattr(args, option, None)
        if value is not None:
            env[variable] = str(value)
    if getattr(args, "password_file", None):
        env.pop("MQTT_PASSWORD", None)
    if not env.get("MQTT_HOST", "").strip():
        env["MQTT_HOST"] = "localhost"
    return load_mqtt_settings(env)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # a terminal or pipe that cannot show a device's characters gets escapes, not a crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    logging.basicConfig(level=logging.WARNING, format="edge-ctl: %(message)s")
    # The MQTT layer logs retries and refusals at WARNING for the long-running programs;
    # for a one-shot tool the final error says it, once.
    logging.getLogger("edge_agent.protocol.mqtt").setLevel(logging.ERROR)
    printer = Printer(bool(getattr(args, "json", False)))
    try:
        check_ids(args)
        if args.command == "rollout":
            return run_rollout(args, load_bridge_settings(
                os.environ, getattr(args, "bridge_url", None),
                getattr(args, "bridge_token_file", None)), printer)
        settings = mqtt_settings(args, os.environ)
        return COMMANDS[args.command](args, settings, printer)
    except ConfigError as exc:
        print(f"edge-ctl: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CtlError as exc:
        print(f"edge-ctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
