"""The rollout spec: strict validation naming the field, waves resolved. Pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.rollout.spec import (
    OnHalt,
    Percent,
    SpecError,
    TargetKind,
    Unreachable,
    parse_spec,
    resolve_devices,
    split_waves,
)

DEVICES = [f"dev-{i:02d}" for i in range(12)]
KNOWN: dict[str, tuple[str, ...] | None] = {d: ("line-1",) for d in DEVICES}


def spec_with(**fields: Any) -> dict[str, Any]:
    return {"tag": "2.0", "target": {"group": "line-1"}, **fields}


def test_a_full_spec_and_the_defaults() -> None:
    spec = parse_spec(spec_with(waves=[1, "25%", "100%"], max_updating=3, on_halt="revert",
                                unreachable="skip", failure_threshold=0.5,
                                success_threshold=0.9, wave_timeout_s=60))
    assert spec.waves == (1, Percent(25.0), Percent(100.0))
    assert (spec.max_updating, spec.on_halt, spec.unreachable) == (3, OnHalt.REVERT,
                                                                   Unreachable.SKIP)
    default = parse_spec(spec_with())
    assert default.waves == (1, Percent(100.0))
    assert (default.max_updating, default.success_threshold, default.failure_threshold,
            default.wave_timeout_s, default.on_halt, default.unreachable) == (
        5, 1.0, 0.0, 1800.0, OnHalt.STOP, Unreachable.WAIT)
    assert parse_spec({"tag": "1", "target": {"fleet": True}}).target.kind is TargetKind.FLEET


def test_canary_25_100_over_12_devices_is_1_2_9() -> None:
    spec = parse_spec(spec_with(waves=[1, "25%", "100%"]))
    waves = split_waves(spec, resolve_devices(spec, KNOWN))
    assert [len(w) for w in waves] == [1, 2, 9]
    assert sorted(d for w in waves for d in w) == DEVICES


def test_explicit_canary_and_a_final_wave_for_the_rest() -> None:
    spec = parse_spec(spec_with(waves=[["dev-07"], 3]))
    waves = split_waves(spec, resolve_devices(spec, KNOWN))
    assert waves[0] == ["dev-07"]
    assert [len(w) for w in waves] == [1, 3, 8]
    assert "dev-07" not in waves[1] + waves[2]


@pytest.mark.parametrize(("fields", "field"), [
    ({"tag": "bad tag"}, "tag"),
    ({"tag": 3}, "tag"),
    ({"target": {"group": "line-1"}}, "tag"),
    ({"color": "red"}, "body"),
    ({"target": {}}, "target"),
    ({"target": {"group": "a", "fleet": True}}, "target"),
    ({"target": {"fleet": False}}, "target.fleet"),
    ({"target": {"devices": []}}, "target.devices"),
    ({"target": {"devices": ["a/b"]}}, "target.devices"),
    ({"target": {"devices": ["dev-01", "dev-01"]}}, "target.devices"),
    ({"waves": []}, "waves"),
    ({"waves": [0]}, "waves[0]"),
    ({"waves": [1, "0%"]}, "waves[1]"),
    ({"waves": ["101%"]}, "waves[0]"),
    ({"waves": ["1e2%"]}, "waves[0]"),
    ({"waves": [True]}, "waves[0]"),
    ({"waves": [["dev-01"], ["dev-01"]]}, "waves[1]"),
    ({"max_updating": 0}, "max_updating"),
    ({"max_updating": 1.5}, "max_updating"),
    ({"success_threshold": 0}, "success_threshold"),
    ({"success_threshold": 1.5}, "success_threshold"),
    ({"failure_threshold": 1}, "failure_threshold"),
    ({"failure_threshold": -0.1}, "failure_threshold"),
    ({"wave_timeout_s": 0}, "wave_timeout_s"),
    ({"wave_timeout_s": "60"}, "wave_timeout_s"),
    ({"on_halt": "explode"}, "on_halt"),
    ({"unreachable": None}, "unreachable"),
])
def test_a_bad_spec_is_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    body = {**spec_with(), **fields}
    if "tag" not in fields and field == "tag":
        body.pop("tag")
    with pytest.raises(SpecError) as caught:
        parse_spec(body)
    assert str(caught.value).startswith(f"{field}:"), caught.value


@pytest.mark.parametrize(("fields", "field"), [
    ({"target": {"devices": ["dev-01", "nobody"]}}, "target.devices"),
    ({"waves": [["nobody"]]}, "waves"),
    ({"target": {"group": "line-2"}}, "target"),
    ({"waves": [6, "25%"]}, "waves[1]"),  # 25% of 12 is 3: reached already
    ({"waves": [12, 1]}, "waves[1]"),  # nobody left
])
def test_a_spec_that_does_not_fit_the_fleet_is_refused(fields: dict[str, Any],
                                                         field: str) -> None:
    with pytest.raises(SpecError) as caught:
        spec = parse_spec({**spec_with(), **fields})
        split_waves(spec, resolve_devices(spec, KNOWN))
    assert str(caught.value).startswith(f"{field}:"), caught.value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=20), inner,
                                                                max_size=5),
    max_leaves=30,
)
SPECISH = st.fixed_dictionaries({}, optional={
    "tag": st.sampled_from(["2.0", "", "x y", 7]) | JSON,
    "target": st.sampled_from([{"group": "line-1"}, {"fleet": True},
                               {"devices": ["dev-01"]}]) | JSON,
    "waves": st.lists(st.integers(-2, 14) | st.sampled_from(["25%", "100%", "0%", "x%"])
                      | st.lists(st.sampled_from(DEVICES), max_size=3), max_size=4) | JSON,
    "max_updating": JSON, "success_threshold": JSON, "failure_threshold": JSON,
    "wave_timeout_s": JSON, "on_halt": JSON, "unreachable": JSON,
})


@given(st.one_of(JSON, SPECISH))
def test_any_json_is_a_spec_or_a_spec_error(body: Any) -> None:
    try:
        spec = parse_spec(body)
        waves = split_waves(spec, resolve_devices(spec, KNOWN))
    except SpecError as exc:
        assert str(exc).split(":", 1)[0]  # names a field
        return
    assert all(waves) and len({d for w in waves for d in w}) == sum(len(w) for w in waves)
