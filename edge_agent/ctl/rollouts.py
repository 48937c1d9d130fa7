"""``edge-ctl rollout start|list|show|pause|resume|abort``: the bridge's rollouts
(docs/ROLLOUTS.md), over its HTTP API (``bridge_client``) rather than MQTT: the rollout
controller lives in the bridge.

The spec is built from the options and sent as it is: the bridge validates it and its
refusal (400) is shown in its own words. ``--watch`` polls the rollout about once a
second and prints what changed, until it ends: exit 0 when it succeeded, 1 when it
halted or was aborted.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable
from typing import Any

from edge_agent.ctl.bridge_client import BridgeClient, BridgeSettings
from edge_agent.ctl.errors import EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CtlError
from edge_agent.ctl.render import Printer
from edge_agent.ctl.rollout_view import changes, final, rollout_text, rollouts_table
from edge_agent.rollout.spec import (
    DEFAULT_MAX_UPDATING,
    DEFAULT_WAVE_TIMEOUT_S,
    DEFAULT_WAVES,
    OnHalt,
    Unreachable,
)

RolloutCommand = Callable[[argparse.Namespace, BridgeClient, Printer], int]

POLL_INTERVAL_S = 1.0
WAVE_SIZE_RE = re.compile(r"^[0-9]{1,9}$")
WAVE_SHARE_RE = re.compile(r"^[0-9]{1,3}(\.[0-9]{1,6})?%$")
ACTIONS = ("pause", "resume", "abort")


def add_rollout_parser(commands: Any) -> None:
    """The ``rollout`` command and its subcommands, on edge-ctl's parser."""
    bridge = argparse.ArgumentParser(add_help=False)
    options = bridge.add_argument_group(
        "bridge options (rollouts are driven by edge-bridge, over HTTP)")
    options.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="machine-readable output (JSON; one object per line for "
                         "--watch)")
    # SUPPRESS: an option given before the action is not reset by the action's parser
    options.add_argument("--bridge-url", metavar="URL", default=argparse.SUPPRESS,
                         help="the bridge (BRIDGE_URL; default http://127.0.0.1:8080)")
    options.add_argument("--bridge-token-file", metavar="FILE", default=argparse.SUPPRESS,
                         help="file holding the bridge's token (BRIDGE_TOKEN_FILE; or "
                         "BRIDGE_TOKEN)")
    parents = [bridge]
    rollout = commands.add_parser(
        "rollout", parents=parents,
        help="staged rollouts driven by the bridge: start, list, show, pause, resume, abort",
        description="Roll a tag out in waves, with automatic halt (docs/ROLLOUTS.md).")
    sub = rollout.add_subparsers(dest="rollout_command", required=True, metavar="ACTION")

    start = sub.add_parser("start", parents=parents, help="start a rollout",
                           description="Start a rollout of a tag to a group, the fleet or "
                           "devices. Options not given take the bridge's defaults.")
    start.add_argument("--tag", required=True, help="the image tag to roll out")
    target = start.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", "-g", metavar="NAME", help="the devices of a group")
    target.add_argument("--fleet", action="store_true", help="every device the bridge knows")
    target.add_argument("--device", "-d", metavar="ID", action="append",
                        help="an explicit device (repeat the option for more)")
    start.add_argument("--canary", metavar="ID,ID", help="a first wave of exactly these devices")
    default_waves = ",".join(map(str, DEFAULT_WAVES)).replace("%", "%%")
    start.add_argument("--waves", metavar="LIST",
                       help="wave sizes: a number of devices or a cumulative N%% of the "
                       f"target, e.g. 1,25%%,100%% (default {default_waves})")
    start.add_argument("--max-updating", type=int, metavar="N",
                       help=f"devices updating at once, at most (default {DEFAULT_MAX_UPDATING})")
    start.add_argument("--success-threshold", type=float, metavar="SHARE",
                       help="share (0-1] of a wave's devices that must end on the tag "
                       "(default 1)")
    start.add_argument("--failure-threshold", type=float, metavar="SHARE",
                       help="share [0-1) of a wave's devices that may fail before it halts "
                       "(default 0: the first failure halts)")
    start.add_argument("--wave-timeout", type=float, metavar="S",
                       help=f"seconds per wave (default {DEFAULT_WAVE_TIMEOUT_S:g})")
    start.add_argument("--on-halt", choices=tuple(OnHalt),
                       help="stop, or also send the halted wave back to its previous tag "
                       f"(default {OnHalt.STOP})")
    start.add_argument("--unreachable", choices=tuple(Unreachable),
                       help="offline or deferred devices: wait for them (until the wave "
                       "timeout, then skip them), skip them, or count them as failed "
                       f"(default {Unreachable.WAIT})")
    start.add_argument("--watch", action="store_true", help="then show its progress live")

    sub.add_parser("list", parents=parents, help="the rollouts, newest first")
    show = sub.add_parser("show", parents=parents, help="one rollout: waves and devices")
    show.add_argument("id")
    show.add_argument("--watch", action="store_true",
                      help="show its progress live until it ends (exit 0 succeeded, "
                      "1 halted or aborted)")
    for action in ACTIONS:
        verb = sub.add_parser(action, parents=parents, help=f"{action} a rollout")
        verb.add_argument("id")


# -- building the spec ----------------------------------------------------------------------
def parse_waves(text: str) -> list[Any]:
    """``1,25%,100%`` -> ``[1, "25%", "100%"]``; sizes and shares are judged by the bridge."""
    waves: list[Any] = []
    for item in (part.strip() for part in text.split(",")):
        if WAVE_SIZE_RE.fullmatch(item):
            waves.append(int(item))
        elif WAVE_SHARE_RE.fullmatch(item):
            waves.append(item)
        else:
            raise CtlError(f"--waves: {item!r} is neither a number of devices nor N%",
                           EXIT_USAGE)
    return waves


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The rollout spec (docs/PROTOCOL.md) of ``rollout start``'s options."""
    spec: dict[str, Any] = {"tag": args.tag}
    if args.group:
        spec["target"] = {"group": args.group}
    elif args.fleet:
        spec["target"] = {"fleet": True}
    else:
        spec["target"] = {"devices": list(args.device)}
    waves: list[Any] = []
    if args.canary:
        waves.append([device.strip() for device in args.canary.split(",")])
    if args.waves:
        waves += parse_waves(args.waves)
    if waves:
        spec["waves"] = waves
    numbers = {"max_updating": args.max_updating, "success_threshold": args.success_threshold,
               "failure_threshold": args.failure_threshold, "wave_timeout_s": args.wave_timeout}
    for field, value in numbers.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise CtlError(f"--{field.removesuffix('_s').replace('_', '-')}: not a number",
                           EXIT_USAGE)
        spec[field] = value
    if args.on_halt:
        spec["on_halt"] = args.on_halt
    if args.unreachable:
        spec["unreachable"] = args.unreachable
    return spec


# -- the subcommands ------------------------------------------------------------------------
def cmd_start(args: argparse.Namespace, client: BridgeClient, printer: Printer) -> int:
    rollout = client.start_rollout(build_spec(args))
    if args.watch:
        printer.note(f"started rollout {rollout.get('id')}")
        return watch(client, rollout, printer)
    printer.result(rollout, rollout_text(rollout))
    return EXIT_OK


def cmd_list(args: argparse.Namespace, client: BridgeClient, printer: Printer) -> int:
    rollouts = client.list_rollouts()
    printer.result({"rollouts": rollouts},
                   rollouts_table(rollouts) if rollouts else "no rollouts")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, client: BridgeClient, printer: Printer) -> int:
    rollout = client.rollout(args.id)
    if args.watch:
        return watch(client, rollout, printer)
    printer.result(rollout, rollout_text(rollout))
    return EXIT_OK


def cmd_action(args: argparse.Namespace, client: BridgeClient, printer: Printer) -> int:
    rollout = client.action(args.id, args.rollout_command)
    printer.result(rollout, f"rollout {args.id}: {rollout.get('state')}")
    return EXIT_OK


def watch(client: BridgeClient, rollout: dict[str, Any], printer: Printer,
          interval_s: float = POLL_INTERVAL_S) -> int:
    """Print what changes, poll after poll, until the rollout ends; its exit code. A
    bridge that stops answering (restarted, say) is waited for, and said once."""
    rollout_id = str(rollout.get("id"))
    previous: dict[str, Any] | None = None
    current = rollout
    while True:
        for change in changes(previous, current):
            printer.result(change.obj, change.text)
        ended = final(current)
        if ended is not None:
            code, text = ended
            printer.result({"type": "end", "id": rollout_id, "state": current.get("state"),
                            "reason": current.get("reason"), "exit_code": code}, text)
            return code
        previous = current
        time.sleep(interval_s)
        try:
            current = client.rollout(rollout_id)
        except CtlError as exc:
            if exc.code != EXIT_TIMEOUT:
                raise
            printer.note_once(("bridge", str(exc)), f"{exc}; still trying")
            current = previous


ROLLOUT_COMMANDS: dict[str, RolloutCommand] = {
    "start": cmd_start,
    "list": cmd_list,
    "show": cmd_show,
    **dict.fromkeys(ACTIONS, cmd_action),
}


def run_rollout(args: argparse.Namespace, settings: BridgeSettings, printer: Printer) -> int:
    return ROLLOUT_COMMANDS[args.rollout_command](args, BridgeClient(settings), printer)
