"""The rollout's decisions (``plan.step``), pure: a simulated fleet answers the actions
as agents would (state document and events), with no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edge_agent.protocol.timestamps import format_utc
from edge_agent.rollout import plan
from edge_agent.rollout.plan import (
    Action,
    DesiredView,
    DeviceOutcome,
    DeviceView,
    RetainedTag,
    Rollout,
    RolloutState,
    Scope,
    View,
    WaveState,
)
from edge_agent.rollout.spec import parse_spec, resolve_devices, split_waves

DEVICES = [f"dev-{i:02d}" for i in range(12)]
T0 = 1_700_000_000.0


def state(device_id: str, running: str, request_id: str | None, status: str = "idle",
          groups: tuple[str, ...] = ("line-1",)) -> dict[str, Any]:
    return {"device_id": device_id, "groups": list(groups),
            "desired": {"tag": running, "source": "device", "request_id": request_id},
            "running": {"tag": running, "status": "running"},
            "fallback": {"active": False}, "update": {"status": status}}


@dataclass
class SimFleet:
    """Devices that answer their desired tag: ``good`` tags succeed, others roll back."""

    good: set[str] = field(default_factory=lambda: {"2.0"})
    offline: set[str] = field(default_factory=set)
    deferred: set[str] = field(default_factory=set)
    silent: set[str] = field(default_factory=set)  # never answer
    running: dict[str, str] = field(default_factory=lambda: dict.fromkeys(DEVICES, "1.0"))
    overrides: dict[str, RetainedTag] = field(default_factory=dict)
    groups: dict[str, RetainedTag] = field(default_factory=dict)
    fleet: RetainedTag | None = None
    working: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> tag, request
    states: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)  # device ids, in send order
    peak: int = 0

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if action.scope is Scope.DEVICE:
                assert action.target is not None
                if action.tag is None:
                    self.overrides.pop(action.target, None)
                else:
                    self.overrides[action.target] = RetainedTag(action.tag, action.request_id)
                    if action.request_id and action.request_id.endswith(f":{action.target}"):
                        self.sent.append(action.target)
                        self.working[action.target] = (action.tag, action.request_id)
            elif action.scope is Scope.GROUP:
                assert action.target is not None and action.tag is not None
                self.groups[action.target] = RetainedTag(action.tag, action.request_id)
            else:
                self.fleet = RetainedTag(action.tag, action.request_id) if action.tag else None

    def progress(self) -> None:
        """Every device at work moves one step: busy, then done."""
        self.peak = max(self.peak, len(self.working))
        for device_id, (tag, request_id) in list(self.working.items()):
            if device_id in self.silent:
                continue
            current = self.states.get(device_id, {})
            if device_id in self.deferred:
                self.states[device_id] = state(device_id, self.running[device_id], request_id,
                                               "deferred")
                continue
            if current.get("update", {}).get("status") != "pulling":
                self.states[device_id] = state(device_id, self.running[device_id], request_id,
                                               "pulling")
                self.events.setdefault(device_id, []).append(
                    {"event": "update_started", "request_id": request_id})
                continue
            del self.working[device_id]
            if tag in self.good:
                self.running[device_id] = tag
                name = "update_succeeded"
            else:
                name = "rolled_back"
            self.states[device_id] = state(device_id, self.running[device_id], request_id)
            self.events[device_id].append({"event": name, "request_id": request_id,
                                           "tag": tag, "reason": "exited"})

    def view(self) -> View:
        devices = {d: DeviceView(online=d not in self.offline,
                                 state=self.states.get(d, state(d, self.running[d], None)),
                                 events=tuple(self.events.get(d, ())))
                   for d in DEVICES}
        return View(devices, DesiredView(dict(self.overrides), dict(self.groups), self.fleet))


def make(**fields: Any) -> Rollout:
    spec = parse_spec({"tag": "2.0", "target": {"group": "line-1"}, **fields})
    known: dict[str, tuple[str, ...] | None] = {d: ("line-1",) for d in DEVICES}
    return plan.new_rollout("ro-1", spec, split_waves(spec, resolve_devices(spec, known)), T0)


def run(rollout: Rollout, fleet: SimFleet, ticks: int = 200, dt: float = 1.0) -> Rollout:
    now = T0
    for _ in range(ticks):
        rollout, actions = plan.step(rollout, fleet.view(), now)
        fleet.apply(actions)
        if not rollout.active and not fleet.working:
            break
        fleet.progress()
        now += dt
    return rollout


def outcomes(rollout: Rollout) -> dict[str, str]:
    return {d.device_id: str(d.outcome) for d in rollout.entries()}


def test_waves_1_25_100_all_succeed_within_the_cap_and_end_clean() -> None:
    fleet = SimFleet()
    rollout = run(make(waves=[1, "25%", "100%"], max_updating=3), fleet)
    assert rollout.state is RolloutState.SUCCEEDED, rollout.reason
    assert [len(w.devices) for w in rollout.waves] == [1, 2, 9]
    assert all(w.state is WaveState.PASSED for w in rollout.waves)
    assert set(outcomes(rollout).values()) == {"succeeded"}
    assert fleet.peak <= 3
    assert sorted(fleet.sent) == DEVICES  # each device sent once
    assert fleet.groups["line-1"].tag == "2.0"
    assert fleet.overrides == {}  # the desired state is the group tag alone


@given(st.integers(1, 12), st.lists(st.integers(1, 5), min_size=1, max_size=4))
@settings(max_examples=40)
def test_max_updating_is_never_exceeded(cap: int, waves: list[int]) -> None:
    assume(sum(waves[:-1]) < len(DEVICES))
    fleet = SimFleet()
    rollout = run(make(waves=waves, max_updating=cap), fleet)
    assert rollout.state is RolloutState.SUCCEEDED
    assert fleet.peak <= cap
    assert len(fleet.sent) == len(set(fleet.sent)) == 12


def test_a_bad_tag_halts_after_the_canary_and_revert_restores_the_override() -> None:
    fleet = SimFleet(good=set())
    fleet.overrides["dev-00"] = RetainedTag("0.9", "old-request")
    rollout = run(make(waves=[1, "25%", "100%"], max_updating=3, on_halt="revert"), fleet)
    assert rollout.state is RolloutState.HALTED
    assert rollout.reason is not None and "wave 0 halted" in rollout.reason
    assert "dev-00" in rollout.reason and "rolled_back" in rollout.reason
    assert fleet.sent == ["dev-00"]  # nobody outside the canary
    assert rollout.waves[0].devices[0].outcome is DeviceOutcome.REVERTED
    assert fleet.overrides == {"dev-00": RetainedTag("0.9", "old-request")}
    assert {d.outcome for w in rollout.waves[1:] for d in w.devices} == {DeviceOutcome.PENDING}


def test_stop_leaves_the_failed_override_and_reports_failed() -> None:
    fleet = SimFleet(good=set())
    rollout = run(make(waves=[1, "100%"]), fleet)
    assert rollout.state is RolloutState.HALTED
    assert rollout.waves[0].devices[0].outcome is DeviceOutcome.FAILED
    assert fleet.overrides["dev-00"].tag == "2.0"


def test_failure_threshold_lets_a_wave_pass_some_failures() -> None:
    fleet = SimFleet(silent={"dev-05"})
    rollout = run(make(waves=[1, "100%"], failure_threshold=0.2, success_threshold=0.9,
                       wave_timeout_s=30), fleet)
    assert rollout.state is RolloutState.SUCCEEDED, rollout.reason
    entry = next(d for d in rollout.entries() if d.device_id == "dev-05")
    assert entry.outcome is DeviceOutcome.FAILED
    assert entry.reason is not None and "wave timeout" in entry.reason
    assert "dev-05" not in fleet.overrides or fleet.overrides["dev-05"].tag != "2.0"


def test_a_silent_device_times_the_wave_out_and_halts() -> None:
    fleet = SimFleet(silent={"dev-00"})
    rollout = run(make(waves=[1, "100%"], wave_timeout_s=20), fleet)
    assert rollout.state is RolloutState.HALTED
    assert rollout.waves[0].state is WaveState.TIMED_OUT
    assert fleet.sent == ["dev-00"]
    assert "dev-00" not in fleet.overrides  # its override is withdrawn


def test_an_online_device_that_never_shows_the_request_is_sent_it_again() -> None:
    """The message did not reach it (seen on a NATS cluster: the node that took over
    never served the new retained tag). Online, its state showing another request, the device
    is sent the same message every RESEND_AFTER_S, never while offline, and no more once
    its state shows the request."""
    fleet = SimFleet(silent={"dev-00"})
    rollout = make(waves=[1, "100%"], wave_timeout_s=600)
    sends: list[tuple[float, Action]] = []
    now = T0
    for tick in range(150):
        if tick == 70:
            fleet.offline.add("dev-00")
        if tick == 110:
            fleet.offline.clear()
        if tick == 120:
            fleet.silent.clear()  # the last send got through
        if tick % 7 == 0:  # a restart keeps the schedule: it is in the record
            rollout = Rollout.from_json(rollout.to_json(), rollout.spec)
        rollout, actions = plan.step(rollout, fleet.view(), now)
        sends += [(now - T0, a) for a in actions if a.target == "dev-00" and a.tag]
        fleet.apply(actions)
        fleet.progress()
        now += 1
    assert [at for at, _ in sends] == [0, 30, 60, 110]  # back online: at once
    assert len({action for _, action in sends}) == 1  # the same message each time
    entry = rollout.waves[0].devices[0]
    assert entry.outcome is DeviceOutcome.SUCCEEDED
    assert entry.resent_at == T0 + 110
    assert rollout.state is RolloutState.SUCCEEDED
    assert entry.to_json()["resent_at"] == format_utc(T0 + 110)


@pytest.mark.parametrize(("policy", "state", "outcome"), [
    ("wait", RolloutState.SUCCEEDED, DeviceOutcome.SKIPPED),
    ("skip", RolloutState.SUCCEEDED, DeviceOutcome.SKIPPED),
    ("fail", RolloutState.HALTED, DeviceOutcome.FAILED),
])
def test_offline_devices_are_never_sent(policy: str, state: RolloutState,
                                        outcome: DeviceOutcome) -> None:
    fleet = SimFleet(offline={"dev-03"})
    rollout = run(make(waves=[1, "100%"], unreachable=policy, wave_timeout_s=60), fleet)
    assert rollout.state is state, rollout.reason
    assert "dev-03" not in fleet.sent
    entry = next(d for d in rollout.entries() if d.device_id == "dev-03")
    assert entry.outcome is outcome


def test_wait_sends_a_device_that_comes_back_in_time() -> None:
    fleet = SimFleet(offline={"dev-03"})
    rollout = make(waves=[1, "100%"], wave_timeout_s=600)
    now = T0
    for tick in range(60):
        if tick == 20:
            fleet.offline.clear()
        rollout, actions = plan.step(rollout, fleet.view(), now)
        fleet.apply(actions)
        fleet.progress()
        now += 1
    assert rollout.state is RolloutState.SUCCEEDED
    assert sorted(fleet.sent) == DEVICES


def test_a_deferred_device_keeps_its_slot() -> None:
    fleet = SimFleet(deferred={"dev-00"})
    rollout = make(waves=[["dev-00", "dev-01"], "100%"], max_updating=2, wave_timeout_s=600)
    now = T0
    for _ in range(30):
        rollout, actions = plan.step(rollout, fleet.view(), now)
        fleet.apply(actions)
        fleet.progress()
        now += 1
    entry = rollout.waves[0].devices[0]
    assert entry.outcome is DeviceOutcome.DEFERRED
    assert entry.reason is not None and entry.reason.startswith("deferred")
    assert sorted(fleet.sent) == ["dev-00", "dev-01"]  # one slot held, wave 0 not done
    fleet.deferred.clear()
    rollout = run(rollout, fleet)
    assert rollout.state is RolloutState.SUCCEEDED
    assert fleet.peak <= 2


def test_resume_after_a_restart_never_sends_twice() -> None:
    """The record is what the store keeps: a rollout rebuilt from its JSON at any tick
    goes on without sending a device again."""
    fleet = SimFleet()
    rollout = make(waves=[1, "25%", "100%"], max_updating=3)
    now = T0
    for tick in range(200):
        if tick % 3 == 0:  # "restart": only the written record survives
            rollout = Rollout.from_json(rollout.to_json(), rollout.spec)
        rollout, actions = plan.step(rollout, fleet.view(), now)
        fleet.apply(actions)
        if not rollout.active:
            break
        fleet.progress()
        now += 1
    assert rollout.state is RolloutState.SUCCEEDED
    assert sorted(fleet.sent) == DEVICES


def test_pause_stops_sending_and_resume_goes_on() -> None:
    fleet = SimFleet()
    rollout, actions = plan.step(make(waves=[1, "100%"], max_updating=3), fleet.view(), T0)
    fleet.apply(actions)
    rollout = plan.pause(rollout, T0 + 1)
    for i in range(10):
        fleet.progress()
        rollout, actions = plan.step(rollout, fleet.view(), T0 + 2 + i)
        assert actions == []
    assert fleet.sent == ["dev-00"]
    assert rollout.waves[0].devices[0].outcome is DeviceOutcome.SUCCEEDED  # still watched
    rollout = run(plan.resume(rollout, T0 + 20), fleet)
    assert rollout.state is RolloutState.SUCCEEDED
    with pytest.raises(plan.NotAllowed):
        plan.resume(rollout, T0 + 100)


def test_abort_with_revert_restores_the_wave() -> None:
    fleet = SimFleet()
    rollout, actions = plan.step(make(waves=[2, "100%"], on_halt="revert"), fleet.view(), T0)
    fleet.apply(actions)
    rollout, actions = plan.abort(rollout, fleet.view(), T0 + 1)
    fleet.apply(actions)
    assert rollout.state is RolloutState.ABORTED
    assert fleet.overrides == {}
    assert {d.outcome for d in rollout.waves[0].devices} == {DeviceOutcome.REVERTED}


def test_an_override_stays_where_another_group_s_tag_comes_first() -> None:
    fleet = SimFleet()
    fleet.groups["line-1"] = RetainedTag("1.0")
    fleet.fleet = RetainedTag("1.0")
    spec = parse_spec({"tag": "2.0", "target": {"fleet": True}, "waves": ["100%"],
                       "max_updating": 12})
    rollout = plan.new_rollout("ro-2", spec, [DEVICES], T0)
    rollout = run(rollout, fleet)
    assert rollout.state is RolloutState.SUCCEEDED
    assert fleet.fleet == RetainedTag("2.0", "ro-2:fleet")
    assert set(fleet.overrides) == set(DEVICES)  # line-1's tag 1.0 would win otherwise
    assert "group line-1's tag 1.0" in rollout.kept_overrides["dev-00"]
