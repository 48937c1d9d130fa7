"""The rollout spec (``POST /api/v1/rollouts``): strict validation of an untrusted JSON
object, then the devices resolved and split into waves. Pure: no I/O.

Every refusal is a ``SpecError`` whose message starts with the field it is about, so an
operator knows what to fix; nothing else is ever raised for any JSON value.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_agent.protocol.errors import TagError
from edge_agent.protocol.tags import validate_tag
from edge_agent.protocol.topics import ID_RE

MAX_DEVICES = 10_000
MAX_WAVES = 100
PERCENT_RE = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?")
MAX_WAVE_TIMEOUT_S = 7 * 24 * 3600.0
DEFAULT_WAVES: tuple[int | str, ...] = (1, "100%")
DEFAULT_MAX_UPDATING = 5
DEFAULT_WAVE_TIMEOUT_S = 1800.0
SPEC_FIELDS = frozenset({"tag", "target", "waves", "max_updating", "success_threshold",
                         "failure_threshold", "wave_timeout_s", "on_halt", "unreachable"})


class SpecError(ValueError):
    """A rollout spec that is refused; the message names the field."""


class OnHalt(enum.StrEnum):
    """What a halt does besides stopping: ``revert`` gives the halted wave's devices
    their previous device override back (or none)."""

    STOP = "stop"
    REVERT = "revert"


class Unreachable(enum.StrEnum):
    """What a wave does with an offline or deferred device."""

    WAIT = "wait"  # until the wave timeout, then skip it
    SKIP = "skip"
    FAIL = "fail"


class TargetKind(enum.StrEnum):
    GROUP = "group"
    FLEET = "fleet"
    DEVICES = "devices"


@dataclass(frozen=True)
class Target:
    kind: TargetKind
    group: str | None = None
    devices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind is TargetKind.GROUP:
            return {"group": self.group}
        if self.kind is TargetKind.FLEET:
            return {"fleet": True}
        return {"devices": list(self.devices)}


# A wave: a number of devices, a cumulative share in percent, or explicit device ids.
@dataclass(frozen=True)
class Percent:
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}%"


Wave = int | Percent | tuple[str, ...]
E = TypeVar("E", bound=enum.StrEnum)


@dataclass(frozen=True)
class RolloutSpec:
    """A validated spec; ``devices``/``waves`` are resolved by ``split_waves``."""

    tag: str
    target: Target
    waves: tuple[Wave, ...] = (1, Percent(100.0))
    max_updating: int = DEFAULT_MAX_UPDATING
    success_threshold: float = 1.0
    failure_threshold: float = 0.0
    wave_timeout_s: float = DEFAULT_WAVE_TIMEOUT_S
    on_halt: OnHalt = OnHalt.STOP
    unreachable: Unreachable = Unreachable.WAIT

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag, "target": self.target.to_json(),
            "waves": [list(w) if isinstance(w, tuple) else (str(w) if isinstance(w, Percent)
                                                             else w) for w in self.waves],
            "max_updating": self.max_updating,
            "success_threshold": self.success_threshold,
            "failure_threshold": self.failure_threshold,
            "wave_timeout_s": self.wave_timeout_s,
            "on_halt": str(self.on_halt), "unreachable": str(self.unreachable),
        }


def parse_spec(obj: Any) -> RolloutSpec:
    """The spec in a decoded JSON body; SpecError naming the field for anything wrong."""
    if not isinstance(obj, dict):
        raise SpecError("body: must be a JSON object")
    unknown = sorted(str(k)[:40] for k in set(obj) - SPEC_FIELDS)
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(SPEC_FIELDS))})")
    if "tag" not in obj:
        raise SpecError("tag: required")
    tag = obj["tag"]
    if not isinstance(tag, str):
        raise SpecError("tag: must be a string")
    try:
        validate_tag(tag)
    except TagError as exc:
        raise SpecError(f"tag: {exc}") from None
    return RolloutSpec(
        tag=tag,
        target=_target(obj.get("target")),
        waves=_waves(obj.get("waves", list(DEFAULT_WAVES))),
        max_updating=_int(obj, "max_updating", DEFAULT_MAX_UPDATING, 1, MAX_DEVICES),
        success_threshold=_share(obj, "success_threshold", 1.0, low_open=True, high_open=False),
        failure_threshold=_share(obj, "failure_threshold", 0.0, low_open=False, high_open=True),
        wave_timeout_s=_timeout(obj),
        on_halt=_choice(obj, "on_halt", OnHalt, OnHalt.STOP),
        unreachable=_choice(obj, "unreachable", Unreachable, Unreachable.WAIT),
    )


def _target(value: Any) -> Target:
    if value is None:
        raise SpecError('target: required: {"group": "<name>"}, {"fleet": true} or '
                        '{"devices": ["<id>", ...]}')
    if not isinstance(value, dict) or len(value) != 1:
        raise SpecError('target: must be an object with exactly one of "group", "fleet", '
                        '"devices"')
    (key, item), = value.items()
    if key == "group":
        if not isinstance(item, str) or not ID_RE.fullmatch(item):
            raise SpecError("target.group: must be a group name (1-64 letters, digits, _ . -)")
        return Target(TargetKind.GROUP, group=item)
    if key == "fleet":
        if item is not True:
            raise SpecError("target.fleet: must be true")
        return Target(TargetKind.FLEET)
    if key == "devices":
        devices = _device_list(item, "target.devices")
        return Target(TargetKind.DEVICES, devices=devices)
    raise SpecError(f"target.{str(key)[:40]}: unknown target (use group, fleet or devices)")


def _device_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: must be a non-empty list of device ids")
    if len(value) > MAX_DEVICES:
        raise SpecError(f"{where}: more than {MAX_DEVICES} devices")
    seen: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not ID_RE.fullmatch(item):
            raise SpecError(f"{where}: {str(item)[:70]!r} is not a device id")
        if item in seen:
            raise SpecError(f"{where}: device {item!r} is named twice")
        seen.add(item)
    return tuple(value)


def _waves(value: Any) -> tuple[Wave, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError("waves: must be a non-empty list (like [1, \"25%\", \"100%\"])")
    if len(value) > MAX_WAVES:
        raise SpecError(f"waves: at most {MAX_WAVES} waves")
    waves: list[Wave] = []
    named: set[str] = set()
    for index, item in enumerate(value):
        where = f"waves[{index}]"
        if isinstance(item, bool):
            raise SpecError(f"{where}: must be a number of devices, \"N%\" or a list of ids")
        if isinstance(item, int):
            if not 1 <= item <= MAX_DEVICES:
                raise SpecError(f"{where}: a wave has at least 1 device (got {item})")
            waves.append(item)
        elif isinstance(item, str):
            waves.append(_percent(item, where))
        elif isinstance(item, list):
            devices = _device_list(item, where)
            twice = sorted(named.intersection(devices))
            if twice:
                raise SpecError(f"{where}: device {twice[0]!r} is already in an earlier wave")
            named.update(devices)
            waves.append(devices)
        else:
            raise SpecError(f"{where}: must be a number of devices, \"N%\" or a list of ids")
    return tuple(waves)


def _percent(text: str, where: str) -> Percent:
    number = text[:-1] if text.endswith("%") else ""
    if not PERCENT_RE.fullmatch(number):
        raise SpecError(f"{where}: {text[:20]!r} is not a share like \"25%\"")
    value = float(number)
    if not 0 < value <= 100:  # noqa: PLR2004 - percent
        raise SpecError(f"{where}: a share must be more than 0% and at most 100%")
    return Percent(value)


def _number(obj: Mapping[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        if name in obj:
            raise SpecError(f"{name}: must be a number")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"{name}: must be a number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise SpecError(f"{name}: out of range")
    number = float(value)
    if not math.isfinite(number):
        raise SpecError(f"{name}: must be a finite number")
    return number


def _int(obj: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}: must be a whole number")
    if not low <= value <= high:
        raise SpecError(f"{name}: must be between {low} and {high} (got {value})")
    return value


def _share(obj: Mapping[str, Any], name: str, default: float, *, low_open: bool,
           high_open: bool) -> float:
    value = _number(obj, name)
    if value is None:
        return default
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise SpecError(f"{name}: must be in {interval} (a share of a wave), got {value:g}")
    return value


def _timeout(obj: Mapping[str, Any]) -> float:
    value = _number(obj, "wave_timeout_s")
    if value is None:
        return DEFAULT_WAVE_TIMEOUT_S
    if not 0 < value <= MAX_WAVE_TIMEOUT_S:
        raise SpecError(f"wave_timeout_s: must be more than 0 and at most "
                        f"{MAX_WAVE_TIMEOUT_S:g} seconds, got {value:g}")
    return value


def _choice(obj: Mapping[str, Any], name: str, kind: type[E], default: E) -> E:
    value = obj.get(name, str(default))
    allowed = [str(v) for v in kind]
    if not isinstance(value, str) or value not in allowed:
        raise SpecError(f"{name}: must be one of {', '.join(allowed)}")
    return kind(value)


def resolve_devices(spec: RolloutSpec, known: Mapping[str, Sequence[str] | None]) -> list[str]:
    """The target's devices, sorted, from ``known`` (device id -> its groups, None when
    its state does not say). SpecError for an unknown device or an empty target."""
    target = spec.target
    if target.kind is TargetKind.DEVICES:
        devices = list(target.devices)
    elif target.kind is TargetKind.FLEET:
        devices = sorted(known)
    else:
        devices = sorted(d for d, groups in known.items()
                         if groups is not None and target.group in groups)
    named = [d for w in spec.waves if isinstance(w, tuple) for d in w]
    unknown = [d for d in [*devices, *named] if d not in known]
    if unknown:
        where = "target.devices" if unknown[0] in target.devices else "waves"
        raise SpecError(f"{where}: unknown device {unknown[0]!r} (the bridge has never seen "
                        f"its state or availability){_more(unknown)}")
    if not devices:
        what = (f"no device reports group {target.group!r}" if target.kind is TargetKind.GROUP
                else "the bridge knows no device")
        raise SpecError(f"target: empty: {what}")
    outside = [d for d in named if d not in devices]
    if outside:
        raise SpecError(f"waves: device {outside[0]!r} is not in the target{_more(outside)}")
    return devices


def _more(items: Sequence[str]) -> str:
    return f" and {len(items) - 1} more" if len(items) > 1 else ""


def split_waves(spec: RolloutSpec, devices: Sequence[str]) -> list[list[str]]:
    """The devices of each wave, in order. A number takes that many of the devices not
    yet in a wave; a share takes as many as bring the total to ceil(N% of the target);
    a list takes those devices. What is left after the last wave forms a final wave.
    SpecError for a wave that would be empty."""
    named = {d for w in spec.waves if isinstance(w, tuple) for d in w}
    rest = [d for d in devices if d not in named]
    total = len(devices)
    taken = 0
    result: list[list[str]] = []
    for index, wave in enumerate(spec.waves):
        if isinstance(wave, tuple):
            members = list(wave)
        else:
            want = wave if isinstance(wave, int) else math.ceil(total * wave.value / 100 - 1e-9)
            count = want if isinstance(wave, int) else want - taken
            count = min(count, len(rest))
            if count <= 0:
                how = (f"{wave} of {total} devices is {want}, already reached"
                       if isinstance(wave, Percent) else "no device is left for it")
                raise SpecError(f"waves[{index}]: an empty wave ({how} by the earlier waves)")
            members, rest = rest[:count], rest[count:]
        taken += len(members)
        result.append(members)
    if rest:
        result.append(rest)
    return result
