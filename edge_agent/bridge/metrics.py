"""``GET /metrics``: the fleet in the Prometheus text format, read from ``Fleet`` at scrape
time (docs/PROMETHEUS.md lists the metrics).

Needs the official ``prometheus-client`` (the ``bridge`` extra); nothing imports this
module but the bridge's ``/metrics`` route, and only when it is first asked for, so the
bridge runs without the library (``/metrics`` then says what to install) and the agent
never loads it. Nothing is updated per MQTT message: the collector turns one
``Fleet.snapshot()`` into metric families when Prometheus scrapes. Every label value
comes from device data already checked by ``protocol.device_data`` (ids and tags match
their patterns, text is bounded), and the number of series is bounded by the fleet's
device limit times the fixed lists of statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from edge_agent.bridge.fleet import DeviceSnapshot, Fleet
from edge_agent.protocol.events import EventName, FailureCode
from edge_agent.protocol.state import HEALTH_STATUSES, UpdateStatus
from edge_agent.protocol.timestamps import parse_utc

log = logging.getLogger(__name__)

UPDATE_STATUSES = tuple(str(status) for status in UpdateStatus)
FAILURE_CODES = tuple(str(code) for code in FailureCode)
HEALTHS = tuple(sorted(HEALTH_STATUSES))
INFO_LABELS = ("running_tag", "desired_tag", "desired_source", "installed_version",
               "agent_version")


def _object(state: dict[str, Any], key: str) -> dict[str, Any]:
    value = state.get(key)
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class _Families:
    """The metric families of one scrape, filled device by device."""

    def __init__(self) -> None:
        d = ("device",)
        self.online = GaugeMetricFamily(
            "edge_agent_device_online", "1 when the device's availability is online, 0 when "
            "offline (absent while unknown)", labels=d)
        self.info = InfoMetricFamily(
            "edge_agent_device", "The device's running and desired tag (value always 1)",
            labels=d)
        self.update_status = GaugeMetricFamily(
            "edge_agent_device_update_status", "1 for the device's current update status, "
            "0 for the others", labels=(*d, "status"))
        self.error_code = GaugeMetricFamily(
            "edge_agent_device_update_error_code", "1 for the code of the device's last error "
            "(update.error_code: insufficient_space, signature_invalid), 0 for the others",
            labels=(*d, "code"))
        self.progress = GaugeMetricFamily(
            "edge_agent_device_update_progress_percent", "Pull progress of the update under "
            "way", labels=d)
        self.health = GaugeMetricFamily(
            "edge_agent_device_health", "1 for the container's current health (none: no "
            "HEALTHCHECK), 0 for the others", labels=(*d, "health"))
        self.running = GaugeMetricFamily(
            "edge_agent_device_container_running", "1 when the app container is running",
            labels=d)
        self.fallback = GaugeMetricFamily(
            "edge_agent_device_fallback_active", "1 while the device runs its fallback tag",
            labels=d)
        self.last_check = GaugeMetricFamily(
            "edge_agent_device_last_check_timestamp_seconds", "When the device last checked "
            "the registry", labels=d)
        self.last_success = GaugeMetricFamily(
            "edge_agent_device_last_success_timestamp_seconds", "When the device last "
            "completed a check or update without error", labels=d)
        self.last_seen = GaugeMetricFamily(
            "edge_agent_device_last_seen_timestamp_seconds", "When the bridge last heard "
            "from the device", labels=d)
        self.restarts = GaugeMetricFamily(
            "edge_agent_device_restart_count", "Docker's restart count of the current app "
            "container (starts at 0 for each new container)", labels=d)

    def add(self, device: DeviceSnapshot) -> None:
        labels = [device.device_id]
        if device.availability is not None:
            self.online.add_metric(labels, 1.0 if device.availability == "online" else 0.0)
        if device.last_seen is not None:
            self.last_seen.add_metric(labels, device.last_seen)
        state = device.state
        if state is None:
            return
        desired, running = _object(state, "desired"), _object(state, "running")
        fallback, update = _object(state, "fallback"), _object(state, "update")
        self.info.add_metric(labels, {
            "running_tag": _text(running.get("tag")),
            "desired_tag": _text(desired.get("tag")),
            "desired_source": _text(desired.get("source")),
            "installed_version": _text(state.get("installed_version")),
            "agent_version": _text(state.get("agent_version")),
        })
        status = update.get("status")
        if status in UPDATE_STATUSES:
            for name in UPDATE_STATUSES:
                self.update_status.add_metric([*labels, name], 1.0 if name == status else 0.0)
        self._add_error_code(labels, update.get("error_code"))
        progress = update.get("progress")
        if isinstance(progress, int | float) and not isinstance(progress, bool):
            self.progress.add_metric(labels, float(progress))
        if running:
            health = running.get("health") or "none"
            for name in HEALTHS:
                self.health.add_metric([*labels, name], 1.0 if name == health else 0.0)
            self.running.add_metric(labels, 1.0 if running.get("status") == "running" else 0.0)
            restarts = running.get("restart_count")
            if isinstance(restarts, int) and not isinstance(restarts, bool):
                self.restarts.add_metric(labels, float(restarts))
        if isinstance(fallback.get("active"), bool):
            self.fallback.add_metric(labels, 1.0 if fallback["active"] else 0.0)
        for family, key in ((self.last_check, "last_check_at"),
                            (self.last_success, "last_success_at")):
            epoch = parse_utc(update.get(key))
            if epoch is not None:
                family.add_metric(labels, epoch)

    def _add_error_code(self, labels: list[str], code: Any) -> None:
        for name in FAILURE_CODES:
            self.error_code.add_metric([*labels, name], 1.0 if name == code else 0.0)

    def all(self) -> list[Metric]:
        return [self.online, self.info, self.update_status, self.error_code, self.progress,
                self.health, self.running, self.fallback, self.last_check, self.last_success,
                self.last_seen, self.restarts]


class FleetCollector(Collector):
    """Reads the fleet when Prometheus scrapes; one device's data never breaks a scrape."""

    def __init__(self, fleet: Fleet, connected: Callable[[], bool]) -> None:
        self.fleet = fleet
        self.connected = connected
        self._complained: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        snapshot = self.fleet.snapshot()
        families = _Families()
        for device in snapshot.devices:
            try:
                families.add(device)
            except (TypeError, ValueError, OverflowError) as exc:
                # device data is checked on arrival, so this is a bug; the device's other
                # series may be partial, the others' are whole
                if device.device_id not in self._complained:
                    self._complained.add(device.device_id)
                    log.error("cannot show device %s in /metrics: %s", device.device_id, exc)
        yield from families.all()
        yield GaugeMetricFamily("edge_agent_devices", "Devices the bridge knows",
                                value=len(snapshot.devices))
        events = CounterMetricFamily(
            "edge_agent_events", "Device events the bridge received since it started, by "
            "event name", labels=("event",))
        for name, count in snapshot.events.items():
            events.add_metric([name], count)
        yield events
        yield CounterMetricFamily(
            "edge_agent_rollbacks", "Updates rolled back by a device since the bridge "
            "started (rolled_back events)",
            value=snapshot.events.get(str(EventName.ROLLED_BACK), 0))
        yield GaugeMetricFamily("edge_agent_bridge_broker_connected",
                                "1 while the bridge is connected to the MQTT broker",
                                value=1.0 if self.connected() else 0.0)
        yield GaugeMetricFamily("edge_agent_bridge_throttled_devices",
                                "Devices over their message budget (their events are dropped)",
                                value=snapshot.throttled)


class FleetMetrics:
    """The exposition of one fleet: ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, fleet: Fleet, connected: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(fleet, connected))

    def render(self) -> bytes:
        return generate_latest(self.registry)
