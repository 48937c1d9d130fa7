"""A fleet simulator: N simulated devices in one process, for the operator-side benches.

Each device speaks the device side of the contract (docs/PROTOCOL.md) with the project's
own protocol code, never a copy of it: ``Topics`` for every topic, ``messages.route``
to read the wire, ``tags.parse_tag_payload`` for desired tags, the agent's own
``remote.RemoteView`` for the desired tags across reconnects (an incomplete replay,
a stale one, a tag not confirmed yet), ``reconcile.resolve_desired`` for the device >
group > fleet precedence, and the agent's own ``status.Status`` (docker-free) to build
the state document and the events. What it does not have is Docker: an update is a
timer (``update_s``) that goes ``update_started`` -> ``pull_progress`` ->
``update_succeeded``, or, with probability ``failure_rate``, ``rolled_back`` (the
device then keeps its tag and skips that tag until another is desired, as the agent
skips a digest that failed).

Every device has its own MQTT connection: its own user name (the ACL's ``%u``), its
own will (``offline``, retained) and retained availability and state. 10,000 paho
clients with a network thread each would not fit on a small machine, so none has a
thread: one asyncio loop watches every socket and drives paho's external-loop API
(``loop_read``/``loop_write``/``loop_misc``). New connections are opened at a bounded
rate (``connect_rate`` per second): a blocking TCP connect must not stall the loop,
and a broker's listen backlog overflows when 10,000 SYNs arrive at once. A lost
connection is retried with the agent's own backoff (1 s doubling to a cap of
10-20 s, ``protocol.mqtt``).

A bench tool: it never stands in for a real agent in a test of agent behaviour.
Run: python -m bench.fleet_sim --devices 1000 --port 1883 --password secret
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import signal
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from paho.mqtt.client import Client, ConnectFlags, DisconnectFlags, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.agent.reconcile import RemoteTag, deciding_keys, resolve_desired
from edge_agent.agent.remote import RemoteView
from edge_agent.agent.status import RunningView, Status
from edge_agent.protocol.events import CheckOutcome, EventName
from edge_agent.protocol.messages import (
    CheckRequest,
    RemoteTagMessage,
    Reply,
    route,
)
from edge_agent.protocol.mqtt import KEEPALIVE_S, RECONNECT_MAX_S, RECONNECT_MIN_S
from edge_agent.protocol.state import Availability, Source, UpdateStatus
from edge_agent.protocol.tags import PayloadRejected, parse_tag_payload
from edge_agent.protocol.timestamps import utc_now
from edge_agent.protocol.topics import Topics

log = logging.getLogger(__name__)

# As the agent (agent/loop.py REMOTE_SETTLE_S): once the subscriptions are acknowledged,
# wait this long for the retained desired tags before the first check.
SETTLE_S = 0.3
# A burst of desired tags (group and fleet at once) is checked once.
DEBOUNCE_S = 0.05
# How often every client's keepalive is looked at (paho pings when it is due).
MISC_EVERY_S = 2.0
CONNECT_TIMEOUT_S = 2.0


def digest_of(tag: str) -> str:
    """The simulated registry digest of ``tag``: the same on every device."""
    return "sha256:" + hashlib.sha256(tag.encode()).hexdigest()


@dataclass
class SimConfig:
    """Where the devices connect and how they behave."""

    host: str
    port: int
    prefix: str
    password: str | None = None  # every device logs in as its id with this password
    image: str = "registry.example/fleet-sim/app"
    initial_tag: str = "1.0"
    update_s: float = 20.0
    failure_rate: float = 0.0
    connect_rate: float = 2000.0  # new connections opened per second
    protocol: str = "5"
    keepalive_s: int = KEEPALIVE_S
    seed: int | None = None


@dataclass
class Counters:
    """What the simulator has seen, for its status line and the benches."""

    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    updates_started: int = 0
    updates_succeeded: int = 0
    rolled_back: int = 0
    replies: int = 0
    updating: int = 0


class SimDevice:
    """One simulated device: its own MQTT connection, its own state."""

    def __init__(self, sim: FleetSim, device_id: str, groups: Sequence[str]) -> None:
        self.sim = sim
        self.device_id = device_id
        self.groups = tuple(groups)
        topics = sim.topics
        self.status = Status(device_id, sim.config.image, groups=self.groups)
        tag = sim.config.initial_tag
        self.status.running = RunningView(
            tag=tag, digest=digest_of(tag), container_id=uuid.uuid4().hex * 2,
            status="running", health="healthy", started_at=utc_now())
        self.status.desired = resolve_desired(device=None, groups=(), fleet=None,
                                              file_tag=None, image_tag=tag, fallback_tag=None)
        self.status.state_sinks.append(self._publish_state)
        self.status.event_sinks.append(self._publish_event)
        self.remote = RemoteView()
        self.failed_tags: set[str] = set()
        self.replies: list[tuple[CheckRequest, Reply]] = []
        self.updating = False
        self.recheck = False
        self.connected = False
        self.attempts = 0
        self.backoff_cap = random.randint(*RECONNECT_MAX_S)
        self._check_handle: asyncio.TimerHandle | None = None
        self._state_topic = topics.state(device_id)
        self._events_topic = topics.events(device_id)
        self._availability = topics.availability(device_id)
        self.subscriptions = [
            topics.device_tag(device_id), *(topics.group_tag(g) for g in self.groups),
            topics.fleet_tag, topics.device_check(device_id),
            topics.device_install(device_id), topics.fleet_check,
        ]
        self.client = self._new_client()
        self.started = False

    # -- the connection --------------------------------------------------------------
    def _new_client(self) -> Client:
        config = self.sim.config
        v5 = config.protocol == "5"
        client = Client(CallbackAPIVersion.VERSION2, client_id=f"edge-agent-{self.device_id}",
                        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                        clean_session=None if v5 else True)
        if config.password is not None:
            client.username_pw_set(self.device_id, config.password)
        client.will_set(self._availability, str(Availability.OFFLINE), qos=1, retain=True)
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.suppress_exceptions = True
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        loop = self.sim.loop
        client.on_socket_open = lambda _c, _u, sock: loop.add_reader(sock, self._read)
        client.on_socket_close = lambda _c, _u, sock: self._forget(sock)
        client.on_socket_register_write = lambda _c, _u, sock: loop.add_writer(sock, self._write)
        client.on_socket_unregister_write = lambda _c, _u, sock: self._unwatch_write(sock)
        return client

    def open(self) -> None:
        """One connection attempt (a blocking TCP connect, bounded by the connect rate)."""
        config = self.sim.config
        try:
            if not self.started:
                self.started = True
                properties = None
                if config.protocol == "5":
                    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    properties.SessionExpiryInterval = 0
                self.client.connect(config.host, config.port, keepalive=config.keepalive_s,
                                    clean_start=True, properties=properties)
            else:
                self.client.reconnect()
        except (OSError, ValueError) as exc:
            log.debug("%s: connect failed: %s", self.device_id, exc)
            self._retry_later()

    def _retry_later(self) -> None:
        if self.sim.stopping:
            return
        delay = min(self.backoff_cap, RECONNECT_MIN_S * 2 ** self.attempts)
        self.attempts += 1
        self.sim.loop.call_later(delay, self.sim.queue_connect, self)

    def _forget(self, sock: Any) -> None:
        self.sim.loop.remove_reader(sock)
        self.sim.loop.remove_writer(sock)

    def _unwatch_write(self, sock: Any) -> None:
        self.sim.loop.remove_writer(sock)

    def _read(self) -> None:
        self.client.loop_read()

    def _write(self) -> None:
        self.client.loop_write()

    def misc(self) -> None:
        if self.client.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS and \
                self.client.want_write():
            self.client.loop_write()

    def _on_connect(self, client: Client, _userdata: Any, _flags: ConnectFlags,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused the connection: %s", self.device_id, reason)
            return  # paho closes the socket: _on_disconnect retries
        self.connected = True
        self.attempts = 0
        self.sim.counters.connected += 1
        self.sim.counters.connects += 1
        self.remote.reset(self.sim.loop.time())  # as RemoteReset: the broker replays them
        client.publish(self._availability, str(Availability.ONLINE), qos=1, retain=True)
        client.subscribe([(topic, 1) for topic in self.subscriptions])

    def _on_subscribe(self, _client: Client, _userdata: Any, _mid: int,
                      _reasons: list[ReasonCode], _properties: Properties | None) -> None:
        # as RemoteReady: a fresh state now, a check once the retained tags have settled
        self.remote.ready(self.sim.loop.time())
        self.status.publish()
        self.schedule_check(SETTLE_S)

    def _on_disconnect(self, _client: Client, _userdata: Any, _flags: DisconnectFlags,
                       _reason: ReasonCode, _properties: Properties | None) -> None:
        if self.connected:
            self.connected = False
            self.sim.counters.connected -= 1
            self.sim.counters.disconnects += 1
        self._retry_later()

    def _on_message(self, _client: Client, _userdata: Any, message: MQTTMessage) -> None:
        routed = route(self.sim.topics, self.device_id, self.groups, message.topic,
                       bytes(message.payload), retained=bool(message.retain),
                       reply=self._reply_for(message))
        if isinstance(routed, RemoteTagMessage):
            self._on_tag(routed)
        elif isinstance(routed, CheckRequest):
            asked_v5 = getattr(getattr(message, "properties", None), "ResponseTopic", None)
            if asked_v5 is None and routed.reply_to is not None:  # MQTT 3.1.1's request
                topic = self.sim.topics.reply(self.device_id, routed.reply_to)
                routed = dataclasses.replace(
                    routed, reply=functools.partial(self._reply, topic, None))
            if routed.reply is not None:
                self.replies.append((routed, routed.reply))
            delay = random.random() * routed.spread if routed.fleet else 0.0
            self.schedule_check(delay)

    def _reply_for(self, message: MQTTMessage) -> Reply | None:
        properties = getattr(message, "properties", None)
        topic = getattr(properties, "ResponseTopic", None)
        if topic is None or not self.sim.topics.is_reply_topic(self.device_id, topic):
            return None
        correlation = getattr(properties, "CorrelationData", None)
        return functools.partial(self._reply, topic, correlation)

    def _reply(self, topic: str, correlation: bytes | None, answer: dict[str, Any]) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            properties.CorrelationData = correlation
        self.client.publish(topic, _json(answer), qos=1, retain=False, properties=properties)
        self.sim.counters.replies += 1

    def _on_tag(self, message: RemoteTagMessage) -> None:
        try:
            parsed = parse_tag_payload(message.payload)
        except PayloadRejected as exc:
            self.status.event(EventName.TAG_REJECTED, exc.request_id, topic=message.topic,
                              reason=str(exc))
            return
        key = (message.scope, message.group)
        if self.remote.stale(key, retained=message.retained):
            return
        self.remote.lay(key, None if parsed.tag is None
                        else RemoteTag(parsed.tag, parsed.request_id))
        self.schedule_check(DEBOUNCE_S)

    def _publish_state(self, document: dict[str, Any]) -> None:
        if self.connected:
            self.client.publish(self._state_topic, _json(document), qos=1, retain=True)

    def _publish_event(self, event: dict[str, Any]) -> None:
        if self.connected:
            self.client.publish(self._events_topic, _json(event), qos=1, retain=False)

    # -- the update machinery --------------------------------------------------------
    def schedule_check(self, delay: float) -> None:
        if self._check_handle is not None:
            self._check_handle.cancel()
        self._check_handle = self.sim.loop.call_later(delay, self.check)

    def check(self) -> None:
        """As the agent's check: resolve the desired tag, update when it differs."""
        self._check_handle = None
        if self.updating:
            self.recheck = True
            return
        status, remote, now = self.status, self.remote, self.sim.loop.time()
        last = remote.expire(now)
        if last is not None:
            self.schedule_check(last - now)
        status.desired = resolve_desired(
            device=remote.get((Source.DEVICE, None)),
            groups=[(g, remote.get((Source.GROUP, g))) for g in self.groups],
            fleet=remote.get((Source.FLEET, None)), file_tag=None,
            image_tag=self.sim.config.initial_tag, fallback_tag=None)
        status.last_check_at = utc_now()
        target = status.desired.tag if status.desired is not None else None
        if (target is not None and target != status.running.tag
                and remote.unconfirmed(deciding_keys(status.desired, self.groups), now)):
            self.schedule_check(1.0)  # as the agent: no change on an unconfirmed tag
            return
        if target is None or target == status.running.tag:
            self._answer(CheckOutcome.UNCHANGED)
            status.set_update(UpdateStatus.IDLE)
        elif target in self.failed_tags:
            self._answer(CheckOutcome.SKIPPED, target)
            status.set_update(UpdateStatus.IDLE)
        else:
            self._start_update(target)

    def _start_update(self, tag: str) -> None:
        status, loop, update_s = self.status, self.sim.loop, self.sim.config.update_s
        self.updating = True
        self.sim.counters.updates_started += 1
        self.sim.counters.updating += 1
        request_id = status.desired.request_id if status.desired is not None else None
        status.event(EventName.UPDATE_STARTED, from_tag=status.running.tag, to_tag=tag,
                     digest=digest_of(tag))
        status.last_error = None
        status.latest_version = tag
        status.set_update(UpdateStatus.PULLING, progress=0.0)
        loop.call_later(update_s * 0.4, self._progress, tag, 50.0)
        loop.call_later(update_s * 0.7, status.set_update, UpdateStatus.VERIFYING)
        loop.call_later(update_s, self._finish, tag, request_id)

    def _progress(self, tag: str, percent: float) -> None:
        self.status.progress = percent
        self.status.event(EventName.PULL_PROGRESS, tag=tag, progress=percent)
        self.status.publish()

    def _finish(self, tag: str, request_id: str | None) -> None:
        status = self.status
        self.updating = False
        self.sim.counters.updating -= 1
        digest = digest_of(tag)
        if self.sim.rng.random() < self.sim.config.failure_rate:
            self.sim.counters.rolled_back += 1
            reason = f"simulated failure: {tag} did not become healthy"
            self.failed_tags.add(tag)
            status.set_update(UpdateStatus.ROLLING_BACK)
            status.event(EventName.ROLLED_BACK, tag=tag, digest=digest, reason=reason,
                         restored=True, request_id=request_id)
            status.latest_version = status.running.tag
            status.set_update(UpdateStatus.IDLE, error=reason)
            self._answer(CheckOutcome.ROLLED_BACK, tag)
        else:
            self.sim.counters.updates_succeeded += 1
            container_id = uuid.uuid4().hex * 2
            status.running = RunningView(tag=tag, digest=digest, container_id=container_id,
                                         status="running", health="healthy",
                                         started_at=utc_now())
            status.last_success_at = utc_now()
            status.event(EventName.UPDATE_SUCCEEDED, tag=tag, digest=digest,
                         container_id=container_id, request_id=request_id)
            status.set_update(UpdateStatus.IDLE)
            self._answer(CheckOutcome.UPDATED, tag)
        if self.recheck:
            self.recheck = False
            self.schedule_check(0.0)

    def _answer(self, outcome: CheckOutcome, tag: str | None = None) -> None:
        replies, self.replies = self.replies, []
        shown = tag or self.status.running.tag
        for request, reply in replies:
            reply({"request_id": request.request_id, "ok": True, "outcome": str(outcome),
                   "tag": shown, "digest": digest_of(shown) if shown else None})

    def close(self) -> None:
        """A clean stop, as the agent's: ``offline`` said by the device itself."""
        if self.connected:
            self.client.publish(self._availability, str(Availability.OFFLINE), qos=1,
                                retain=True)
        self.client.disconnect()


@dataclass
class FleetSim:
    """N simulated devices on one asyncio loop (run it with ``run`` or ``start``)."""

    config: SimConfig
    device_ids: Sequence[str]
    groups_of: Callable[[str], Sequence[str]] = lambda _device: ()
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    counters: Counters = field(default_factory=Counters)
    devices: dict[str, SimDevice] = field(default_factory=dict)
    stopping: bool = False
    _pending: deque[SimDevice] = field(default_factory=deque)
    _thread: threading.Thread | None = None
    _done: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.topics = Topics(self.config.prefix)
        self.rng = random.Random(self.config.seed)

    def queue_connect(self, device: SimDevice) -> None:
        if not self.stopping:
            self._pending.append(device)

    async def _connector(self) -> None:
        """Open queued connections at ``connect_rate`` per second."""
        tick = 0.01
        per_tick = max(1, round(self.config.connect_rate * tick))
        while not self.stopping:
            for _ in range(min(per_tick, len(self._pending))):
                self._pending.popleft().open()
            await asyncio.sleep(tick)

    async def _misc(self) -> None:
        """Keepalive pings: every client's ``loop_misc``, spread over MISC_EVERY_S."""
        while not self.stopping:
            devices = list(self.devices.values())
            chunk = max(1, len(devices) // 20)
            for start in range(0, len(devices), chunk):
                for device in devices[start:start + chunk]:
                    device.misc()
                await asyncio.sleep(MISC_EVERY_S / 20)

    async def main(self, ready: threading.Event | None = None) -> None:
        self._done = asyncio.Event()
        for device_id in self.device_ids:
            device = SimDevice(self, device_id, self.groups_of(device_id))
            self.devices[device_id] = device
            self._pending.append(device)
        tasks = [asyncio.ensure_future(self._connector()), asyncio.ensure_future(self._misc())]
        if ready is not None:
            ready.set()
        await self._done.wait()
        self.stopping = True
        for device in self.devices.values():
            device.close()
        await asyncio.sleep(0.5)  # let the offline messages and DISCONNECTs go out
        for device in self.devices.values():
            device.client.loop_write()
        for task in tasks:
            task.cancel()

    def run(self) -> None:
        """Run in this thread until ``stop``."""
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.main())

    def start(self) -> FleetSim:
        """Run in a background thread (for tests); ``stop`` ends it."""
        ready = threading.Event()

        def target() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.main(ready))

        self._thread = threading.Thread(target=target, name="fleet-sim", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def request_stop(self) -> None:
        """End ``main`` (on the simulator's loop)."""
        if self._done is not None:
            self._done.set()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.request_stop)
        if self._thread is not None:
            self._thread.join(30)
            self.loop.close()

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the simulator's loop (the devices are not thread-safe)."""
        self.loop.call_soon_threadsafe(fn)

    def online(self) -> int:
        return self.counters.connected


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()


def device_ids(name_prefix: str, count: int) -> list[str]:
    """``<prefix>00000`` ... : the bench's device ids (and broker user names)."""
    width = max(5, len(str(count - 1)))
    return [f"{name_prefix}{i:0{width}d}" for i in range(count)]


def group_rule(groups: int) -> Callable[[str], Sequence[str]]:
    """Device ``...N`` is in group ``g<N mod groups>`` (no groups when 0)."""
    def groups_of(device_id: str) -> Sequence[str]:
        if groups <= 0:
            return ()
        digits = device_id[len(device_id.rstrip("0123456789")):]
        return (f"g{int(digits or 0) % groups}",)
    return groups_of


def _status_line(sim: FleetSim, total: int) -> str:
    c = sim.counters
    return (f"fleet-sim: online={c.connected}/{total} connects={c.connects} "
            f"disconnects={c.disconnects} updating={c.updating} "
            f"succeeded={c.updates_succeeded} rolled_back={c.rolled_back} replies={c.replies}")


async def _report(sim: FleetSim, total: int, every_s: float) -> None:
    last = ""
    while not sim.stopping:
        line = _status_line(sim, total)
        if line != last:
            print(line, flush=True)
            last = line
        await asyncio.sleep(every_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--prefix", default="edge", help="MQTT_TOPIC_PREFIX")
    parser.add_argument("--name-prefix", default="sim-", help="device ids: <this>00000...")
    parser.add_argument("--groups", type=int, default=0,
                        help="device N is in group g<N mod this> (0: no groups)")
    parser.add_argument("--password", default=os.environ.get("FLEET_SIM_PASSWORD"),
                        help="every device logs in as its id with this password "
                        "(default $FLEET_SIM_PASSWORD; none: anonymous)")
    parser.add_argument("--image", default=SimConfig.image)
    parser.add_argument("--tag", default="1.0", help="the tag every device starts on")
    parser.add_argument("--update-s", type=float, default=20.0,
                        help="simulated duration of one update")
    parser.add_argument("--failure-rate", type=float, default=0.0,
                        help="share of updates that roll back (0-1)")
    parser.add_argument("--connect-rate", type=float, default=2000.0,
                        help="new connections per second")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--status-every", type=float, default=1.0,
                        help="seconds between status lines on stdout (printed on change)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    config = SimConfig(host=args.host, port=args.port, prefix=args.prefix,
                       password=args.password, image=args.image, initial_tag=args.tag,
                       update_s=args.update_s, failure_rate=args.failure_rate,
                       connect_rate=args.connect_rate, protocol=args.protocol, seed=args.seed)
    sim = FleetSim(config, device_ids(args.name_prefix, args.devices), group_rule(args.groups))
    asyncio.set_event_loop(sim.loop)

    async def run() -> None:
        reporter = asyncio.ensure_future(_report(sim, args.devices, args.status_every))
        await sim.main()
        reporter.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        sim.loop.add_signal_handler(sig, sim.request_stop)
    sim.loop.run_until_complete(run())
    print(_status_line(sim, args.devices), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
