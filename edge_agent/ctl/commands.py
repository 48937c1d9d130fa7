"""The subcommands of edge-ctl, one function each: ``devices``, ``set-tag``,
``clear-tag``, ``check``/``install`` and ``watch``.

Each takes the parsed arguments, the broker settings and the Printer, opens its own
``Session`` (subscribed before it publishes, so no answer is missed), and returns the
exit code; failures raise ``CtlError``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CtlError
from edge_agent.ctl.render import (
    CELL_CHARS,
    DeviceView,
    Printer,
    clock,
    describe_outcome,
    devices_table,
    event_details,
    percent,
    printable,
    status_text,
    superseded_text,
    text_at,
)
from edge_agent.ctl.session import Session, document, document_or_none
from edge_agent.ctl.waiting import report_outcome, wait_for_tag
from edge_agent.protocol import precedence
from edge_agent.protocol.errors import TagError
from edge_agent.protocol.events import CheckOutcome, EventName
from edge_agent.protocol.mqtt import Incoming
from edge_agent.protocol.safejson import UntrustedJson
from edge_agent.protocol.settings import MqttSettings
from edge_agent.protocol.state import Availability, UpdateStatus
from edge_agent.protocol.tags import (
    command_payload,
    desired_tag_payload,
    new_request_id,
    parse_tag_payload,
    validate_tag,
)
from edge_agent.protocol.timestamps import utc_now
from edge_agent.protocol.topics import Topics
from edge_agent.registry_probe import ProbeSettings, load_probe_settings, precheck

Command = Callable[[argparse.Namespace, MqttSettings, Printer], int]

AVAILABILITY = {Availability.ONLINE.encode(): True, Availability.OFFLINE.encode(): False}


def _target(args: argparse.Namespace, topics: Topics) -> tuple[str, str]:
    """(description, desired-tag topic) of --device / --group / --fleet."""
    if args.device:
        return f"device {args.device}", topics.device_tag(args.device)
    if args.group:
        return f"group {args.group}", topics.group_tag(args.group)
    return "the fleet", topics.fleet_tag


# -- devices ------------------------------------------------------------------------------
def cmd_devices(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    session = Session(settings, [topics.all_states, topics.all_availability,
                                 topics.fleet_tag, topics.group_tag("+")])
    try:
        devices = collect_devices(topics, session.retained())
    finally:
        session.close()
    wanted = set(args.device or ())
    shown = sorted((v for k, v in devices.items() if not wanted or k in wanted),
                   key=lambda v: v.device_id)
    text = devices_table(shown) if shown else (
        f"no devices have reported under {topics.prefix}/ (or {settings.username or 'this user'} "
        "may not read them: operators need the operator ACL)")
    printer.result([v.to_json() for v in shown], text)
    return EXIT_OK


def collect_devices(topics: Topics, messages: Sequence[Incoming]) -> dict[str, DeviceView]:
    """The fleet as the retained state and availability messages show it. The device's
    id comes from the topic (the broker's ACL vouches for it), never from the payload."""
    devices: dict[str, DeviceView] = {}
    fleet_tag: str | None = None
    group_tags: dict[str, str] = {}
    for message in messages:
        group = _group_of_tag(topics, message.topic)
        if message.topic == topics.fleet_tag or group is not None:
            try:
                tag = parse_tag_payload(message.payload).tag
            except TagError:
                continue  # the agents reject it too: it shadows nothing
            if group is None:
                fleet_tag = tag
            elif tag is not None:
                group_tags[group] = tag
            continue
        device_id = topics.device_of(message.topic)
        if device_id is None or not message.payload:
            continue
        view = devices.setdefault(device_id, DeviceView(device_id))
        if message.topic == topics.availability(device_id):
            view.online = AVAILABILITY.get(message.payload.strip())
        elif message.topic == topics.state(device_id):
            try:
                view.state, view.state_error = document(message), None
            except UntrustedJson as exc:
                view.state, view.state_error = None, f"state ignored: {exc}"
    for view in devices.values():
        view.shadows = precedence.shadowed(view.state, group_tags, fleet_tag)
    return devices


def _group_of_tag(topics: Topics, topic: str) -> str | None:
    """The group of a ``P/groups/<group>/tag`` topic, else None."""
    head = f"{topics.prefix}/groups/"
    if not topic.startswith(head) or not topic.endswith("/tag"):
        return None
    group = topic[len(head):-len("/tag")]
    return group if topics.group_tag(group) == topic and "/" not in group else None


# -- desired tags -------------------------------------------------------------------------
def cmd_set_tag(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    try:
        tag = validate_tag(args.tag)
    except TagError as exc:
        raise CtlError(f"invalid tag: {exc}", EXIT_USAGE) from None
    if args.wait and not args.device:
        raise CtlError("--wait needs --device (a group or the fleet has no single answer)",
                       EXIT_USAGE)
    topics = Topics(settings.topic_prefix)
    what, topic = _target(args, topics)
    request_id = args.request_id or new_request_id()
    payload = desired_tag_payload(tag, request_id, utc_now(), getattr(args, "spread", None))
    probe_settings = load_probe_settings(os.environ)
    check_registry = probe_settings.enabled and not args.force
    # the device's state (or every device's, for a group or the fleet): its repository
    subscriptions = [topics.all_states] if check_registry and not args.device else []
    if args.device:
        subscriptions = [topics.state(args.device), topics.availability(args.device)]
    if args.wait:
        subscriptions.append(topics.events(args.device))
    session = Session(settings, subscriptions)
    known: bool | None = None
    warnings: list[str] = []
    try:
        retained = session.retained() if subscriptions else []
        if args.device:
            # the old state and availability: not an answer, but proof the device exists
            known = bool(retained)
            if not known:
                printer.note(f"warning: {args.device} has never reported (no state or "
                             f"availability under {topics.prefix}/devices/{args.device}/): "
                             "the tag is kept for it, but check the device id")
        if check_registry:
            warnings = ask_registry(tag, args, retained, topics=topics,
                                    probe_settings=probe_settings, printer=printer)
        session.publish(topic, payload, retain=True)
        if not args.wait:
            result: dict[str, Any] = {"tag": tag, "topic": topic, "request_id": request_id}
            if known is not None:
                result["device_known"] = known
            if warnings:
                result["warnings"] = warnings
            printer.result(result,
                           f"desired tag of {what} set to {tag} (request {request_id})")
            return EXIT_OK
        printer.note(f"desired tag of {what} set to {tag}; waiting for the device "
                     f"(up to {args.timeout:g} s)")
        waited = wait_for_tag(session, args.device, tag, request_id, args.timeout, printer)
    finally:
        session.close()
    return report_outcome(args.device, tag, request_id, waited, args.timeout, printer)


def ask_registry(  # noqa: PLR0913 - what set-tag knows, keyword-only past the first
        tag: str, args: argparse.Namespace, retained: Sequence[Incoming], *,
        topics: Topics, probe_settings: ProbeSettings, printer: Printer) -> list[str]:
    """Ask the registry whether ``tag`` exists in the repositories of the devices that
    set-tag's scope reaches (their retained states say): a CtlError when it does not,
    the warnings (printed) when it could not be asked."""
    states = [document_or_none(m) for m in retained
              if m.topic == topics.state(topics.device_of(m.topic) or "")]
    if args.device:
        who = f"device {args.device}"
    else:
        who = f"the devices of group {args.group}" if args.group else "the fleet's devices"
    found = precheck(tag, precedence.repositories(states, args.group), probe_settings, who=who)
    if found.missing:
        raise CtlError(found.refusal("use --force"), EXIT_FAILED)
    for warning in found.warnings:
        printer.warn(warning)
    return list(found.warnings)


def cmd_clear_tag(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    what, topic = _target(args, topics)
    session = Session(settings, [])
    try:
        session.publish(topic, b"", retain=True)
    finally:
        session.close()
    printer.result({"topic": topic, "cleared": True}, f"desired tag of {what} cleared")
    return EXIT_OK


def cmd_set_agent_version(args: argparse.Namespace, settings: MqttSettings,
                          printer: Printer) -> int:
    """The desired agent version (docs/SELF-UPDATE.md): the desired-tag payload on the
    ``…/agent`` topic of the device, group or fleet."""
    if args.clear == (args.version is not None):
        raise CtlError("give a version, or --clear", EXIT_USAGE)
    topics = Topics(settings.topic_prefix)
    what, _ = _target(args, topics)
    if args.device:
        topic = topics.device_agent(args.device)
    elif args.group:
        topic = topics.group_agent(args.group)
    else:
        topic = topics.fleet_agent
    payload = b""
    request_id = None
    if not args.clear:
        try:
            version = validate_tag(args.version)
        except TagError as exc:
            raise CtlError(f"invalid version: {exc}", EXIT_USAGE) from None
        request_id = args.request_id or new_request_id()
        payload = desired_tag_payload(version, request_id, utc_now())
    session = Session(settings, [])
    try:
        session.publish(topic, payload, retain=True)
    finally:
        session.close()
    if args.clear:
        printer.result({"topic": topic, "cleared": True},
                       f"desired agent version of {what} cleared")
    else:
        printer.result({"version": args.version, "topic": topic, "request_id": request_id},
                       f"desired agent version of {what} set to {args.version} "
                       f"(request {request_id})")
    return EXIT_OK


# -- check and install --------------------------------------------------------------------
def cmd_request(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    """``check`` and ``install``: a command, answered on the device's reply topic (named
    by an MQTT 5 Response Topic, or under MQTT 3.1.1 by the payload's ``reply_to``)."""
    install = args.command == "install"
    topics = Topics(settings.topic_prefix)
    request_id = new_request_id()
    if args.device:
        topic = topics.device_install(args.device) if install else topics.device_check(
            args.device)
    else:
        topic = topics.fleet_check
    if args.wait and not args.device:
        raise CtlError("--wait needs --device", EXIT_USAGE)
    reply_topic = topics.reply(args.device, request_id) if args.wait else None
    v5 = settings.protocol == "5"
    # subscribed before the command goes out: the answer cannot come before we listen
    session = Session(settings, [reply_topic] if reply_topic else [])
    try:
        body = command_payload(request_id, utc_now(), force=getattr(args, "force", False),
                               spread=getattr(args, "spread", None),
                               reply_to=request_id if reply_topic and not v5 else None)
        if v5:
            session.publish(topic, body, retain=False,
                            response_topic=reply_topic, correlation=request_id.encode())
        else:
            session.publish(topic, body, retain=False)
        if reply_topic is None:
            printer.result({"topic": topic, "request_id": request_id},
                           f"{args.command} sent to {topic}")
            return EXIT_OK
        printer.note(f"{args.command} sent to {args.device}; waiting for its answer")
        for message in session.messages(args.timeout):
            answer = document_or_none(message)
            if answer is not None and message.topic == reply_topic and (
                    message.correlation == request_id.encode()
                    or (not v5 and answer.get("request_id") == request_id)):
                break
        else:
            raise CtlError(f"no answer from {args.device} within {args.timeout:g} s "
                           "(offline, or busy with an update?)", EXIT_TIMEOUT)
    finally:
        session.close()
    ok = answer.get("ok") is True and answer.get("outcome") not in (CheckOutcome.ROLLED_BACK,
                                                                    CheckOutcome.SKIPPED)
    if answer.get("error"):
        text = f"{args.device}: {args.command} failed: {printable(answer['error'])}"
    else:
        text = f"{args.device}: {describe_outcome(answer)}"
    printer.result(answer, text)
    return EXIT_OK if ok else EXIT_FAILED


# -- watch ----------------------------------------------------------------------------------
def cmd_watch(args: argparse.Namespace, settings: MqttSettings, printer: Printer) -> int:
    topics = Topics(settings.topic_prefix)
    if args.device:
        subscriptions = [topics.events(args.device), topics.availability(args.device),
                         topics.state(args.device)]
    else:
        subscriptions = [topics.all_events, topics.all_availability, topics.all_states]
    session = Session(settings, subscriptions)
    statuses: dict[str, str] = {}
    count = 0
    try:
        for message in session.retained():  # where everyone stands; not news
            device_id = topics.device_of(message.topic)
            body = document_or_none(message)
            if device_id and message.topic == topics.state(device_id) and body is not None:
                statuses[device_id] = text_at(body, "update", "status") or "-"
        printer.note(f"watching {args.device or 'every device'} under {topics.prefix}/ "
                     "(Ctrl-C to stop)")
        for message in session.messages(args.timeout):
            if watch_line(topics, message, statuses, printer):
                count += 1
                if args.count and count >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        session.close()
    return EXIT_OK


def watch_line(topics: Topics, message: Incoming, statuses: dict[str, str],  # noqa: PLR0911
               printer: Printer) -> bool:
    """Show one message; True when it was an event (what --count counts). The device's
    id comes from the topic (the broker's ACL vouches for it), never from the payload."""
    device_id = topics.device_of(message.topic) or "?"
    who = printable(device_id, CELL_CHARS)
    if message.topic == topics.availability(device_id):
        text = message.payload.decode(errors="replace").strip() or "(cleared)"
        printer.result({"type": "availability", "device_id": device_id, "availability": text},
                       f"{clock(None)}  {who}  is {printable(text, CELL_CHARS)}")
        return False
    is_state = message.topic == topics.state(device_id)
    try:
        body = document(message)
    except UntrustedJson as exc:
        kind = "state" if is_state else "event"
        printer.note_once((device_id, kind, str(exc)),
                          f"{clock(None)}  {who}  sent an unreadable {kind} (ignored): {exc}")
        return False
    if is_state:
        status = text_at(body, "update", "status") or "-"
        if statuses.get(device_id) == status:
            return False
        statuses[device_id] = status
        if status == UpdateStatus.PULLING:
            return False  # the progress events tell that story
        printer.result({"type": "status", "device_id": device_id, "status": status,
                        "state": body},
                       f"{clock(body.get('ts'))}  {who}  status {status_text(body)}")
        return False
    event = body.get("event")
    if event == EventName.UPDATE_STARTED:
        printer.new_pull(device_id)
    if event == EventName.PULL_PROGRESS and not printer.as_json:
        printer.progress(device_id, text_at(body, "tag") or "-",
                         percent(body.get("progress")) or 0.0)
        return True
    name = printable(text_at(body, "event") or "?", CELL_CHARS)
    if event == EventName.TAG_SUPERSEDED:
        details = f"{printable(text_at(body, 'tag') or '?', CELL_CHARS)} {superseded_text(body)}"
    else:
        details = event_details(body)
    request_id = body.get("request_id")
    request = f"  [request {printable(request_id, CELL_CHARS)}]" if request_id else ""
    printer.result({**body, "type": "event", "device_id": device_id},
                   f"{clock(body.get('ts'))}  {who}  {name}  {details}{request}")
    return True


COMMANDS: dict[str, Command] = {
    "devices": cmd_devices,
    "set-tag": cmd_set_tag,
    "clear-tag": cmd_clear_tag,
    "set-agent-version": cmd_set_agent_version,
    "check": cmd_request,
    "install": cmd_request,
    "watch": cmd_watch,
}
