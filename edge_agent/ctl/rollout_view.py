"""Rollout documents (docs/PROTOCOL.md, "Rollouts") as text for the operator: the list
table, one rollout with its waves and devices, and the changes between two polls that
``--watch`` prints. Pure: no I/O.

A rollout document comes from the bridge, but its reasons, tags and ids started on
devices: every string reaches the terminal through ``render.printable``, and a field of
the wrong type shows as ``?`` (as in render.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_agent.ctl.errors import EXIT_FAILED, EXIT_OK
from edge_agent.ctl.render import CELL_CHARS, TEXT_CHARS, date_time, printable, text_at
from edge_agent.protocol.answers import lookup
from edge_agent.protocol.timestamps import format_utc, local_time
from edge_agent.rollout.plan import DeviceOutcome, RolloutState, WaveState

# A rollout that ends in one of these states ends ``--watch`` with this exit code.
FINAL_STATES = {RolloutState.SUCCEEDED: EXIT_OK, RolloutState.HALTED: EXIT_FAILED,
                RolloutState.ABORTED: EXIT_FAILED}
# Device outcomes in the order a rollout moves a device through them (the counts line).
OUTCOME_ORDER = tuple(DeviceOutcome)


@dataclass(frozen=True)
class Change:
    """One thing that changed between two polls: ``text`` for people, ``obj`` for --json."""

    obj: dict[str, Any]
    text: str


# -- fields -------------------------------------------------------------------------------
def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cell(document: Any, *path: str) -> str:
    return printable(text_at(document, *path) or "-", CELL_CHARS)


def when(value: Any, *, with_date: bool = False) -> str:
    """A timestamp of the document (RFC 3339, or epoch seconds) in local time."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            value = format_utc(float(value))
        except (OverflowError, OSError, ValueError):
            return "?"
    if with_date:
        return date_time(value)
    return local_time(value) or ("-" if value is None else printable(value, CELL_CHARS))


def target_text(spec: Any) -> str:
    """``group line-1``, ``the fleet`` or ``3 devices``."""
    target = _dict(lookup(spec, "target"))
    if isinstance(target.get("group"), str):
        return f"group {printable(target['group'], CELL_CHARS)}"
    if target.get("fleet") is True:
        return "the fleet"
    devices = target.get("devices")
    if isinstance(devices, list):
        return f"{len(devices)} device{'s' * (len(devices) != 1)}"
    return "?"


def counts_text(rollout: Any) -> str:
    """``3 succeeded, 1 failed, 8 pending`` (zero counts left out)."""
    counts = _dict(lookup(rollout, "counts"))
    known = [name for name in OUTCOME_ORDER if name in counts]
    others = sorted(str(name) for name in counts if name not in OUTCOME_ORDER)
    parts = [f"{printable(counts[name], CELL_CHARS)} {printable(name, CELL_CHARS)}"
             for name in [*known, *others] if counts[name] != 0]
    return ", ".join(parts) or "no devices"


def wave_devices(wave: Any) -> list[dict[str, Any]]:
    return [_dict(device) for device in _list(lookup(wave, "devices"))]


def total_devices(rollout: Any) -> int:
    return sum(len(wave_devices(wave)) for wave in _list(lookup(rollout, "waves")))


def succeeded_devices(rollout: Any) -> int:
    return sum(1 for wave in _list(lookup(rollout, "waves")) for device in wave_devices(wave)
               if device.get("outcome") == DeviceOutcome.SUCCEEDED)


# -- list ---------------------------------------------------------------------------------
def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
         + "  " + row[-1]).rstrip()
        for row in rows)


def rollouts_table(rollouts: Sequence[Any]) -> str:
    rows = [("ROLLOUT", "STATE", "TAG", "TARGET", "WAVE", "DONE", "CREATED", "REASON")]
    for rollout in rollouts:
        waves = _list(lookup(rollout, "waves"))
        current = lookup(rollout, "current_wave")
        wave = (f"{current + 1}/{len(waves)}" if isinstance(current, int)
                and not isinstance(current, bool) else f"?/{len(waves)}")
        rows.append((
            _cell(rollout, "id"),
            _cell(rollout, "state"),
            _cell(rollout, "spec", "tag"),
            target_text(lookup(rollout, "spec")),
            wave,
            f"{succeeded_devices(rollout)}/{total_devices(rollout)}",
            when(lookup(rollout, "created_at"), with_date=True),
            printable(text_at(rollout, "reason") or "", TEXT_CHARS),
        ))
    return columns(rows)


# -- show ---------------------------------------------------------------------------------
def wave_title(wave: Any, count: int) -> str:
    """``wave 2/3  running  4 devices  started 12:00:01``."""
    index = lookup(wave, "index")
    number = index + 1 if isinstance(index, int) and not isinstance(index, bool) else "?"
    devices = wave_devices(wave)
    text = (f"wave {number}/{count}  {_cell(wave, 'state')}  "
            f"{len(devices)} device{'s' * (len(devices) != 1)}")
    if lookup(wave, "started_at") is not None:
        text += f"  started {when(lookup(wave, 'started_at'))}"
    if lookup(wave, "ended_at") is not None:
        text += f"  ended {when(lookup(wave, 'ended_at'))}"
    return text


def rollout_text(rollout: Any) -> str:
    """One rollout: its summary, then each wave with a row per device."""
    spec = lookup(rollout, "spec")
    lines = [
        f"rollout {_cell(rollout, 'id')}: {_cell(rollout, 'state')}",
        f"  tag {_cell(spec, 'tag')} to {target_text(spec)}; "
        f"created {when(lookup(rollout, 'created_at'), with_date=True)}"
        + (f", ended {when(lookup(rollout, 'ended_at'), with_date=True)}"
           if lookup(rollout, "ended_at") is not None else ""),
        f"  devices: {counts_text(rollout)}",
    ]
    policy = [f"{key}={printable(lookup(spec, key), CELL_CHARS)}"
              for key in ("max_updating", "success_threshold", "failure_threshold",
                          "wave_timeout_s", "on_halt", "unreachable")
              if lookup(spec, key) is not None]
    if policy:
        lines.append("  " + " ".join(policy))
    if text_at(rollout, "reason"):
        lines.append(f"  reason: {printable(text_at(rollout, 'reason'), TEXT_CHARS)}")
    waves = _list(lookup(rollout, "waves"))
    for wave in waves:
        lines.append("")
        lines.append(wave_title(wave, len(waves)))
        rows = [("  DEVICE", "OUTCOME", "PREVIOUS", "REASON")]
        rows += [(f"  {_cell(device, 'device_id')}", _cell(device, "outcome"),
                  _cell(device, "previous_tag"),
                  printable(text_at(device, "reason") or "", TEXT_CHARS))
                 for device in wave_devices(wave)]
        lines.append(columns(rows))
    return "\n".join(lines)


# -- watch --------------------------------------------------------------------------------
def changes(old: Any, new: Any) -> list[Change]:
    """What a poll shows that the previous one did not, in the order it happened: the
    rollout's state (its end is ``final``'s), each wave's start, its devices' outcomes
    (with their reasons), its end. ``old`` None: only where it stands."""
    rollout_id = text_at(new, "id") or "?"
    found: list[Change] = []
    state, reason = text_at(new, "state"), text_at(new, "reason")
    if state not in FINAL_STATES and (
            old is None or (state, reason) != (text_at(old, "state"), text_at(old, "reason"))):
        text = f"rollout {printable(rollout_id, CELL_CHARS)} {printable(state or '?', CELL_CHARS)}"
        if reason:
            text += f": {printable(reason, TEXT_CHARS)}"
        found.append(Change({"type": "rollout", "id": rollout_id, "state": state,
                             "reason": reason, "counts": lookup(new, "counts")}, text))
    old_waves = _list(lookup(old, "waves")) if old is not None else []
    new_waves = _list(lookup(new, "waves"))
    for position, wave in enumerate(new_waves):
        before = old_waves[position] if position < len(old_waves) else None
        wave_change = _wave_change(rollout_id, position, before, new_waves,
                                   shown=old is not None)
        started = text_at(wave, "state") in (WaveState.PENDING, WaveState.RUNNING)
        if wave_change is not None and started:
            found.append(wave_change)
        found += _device_changes(rollout_id, position, before, wave)
        if wave_change is not None and not started:
            found.append(wave_change)
    return found


def _wave_change(rollout_id: str, position: int, before: Any, waves: list[Any], *,
                 shown: bool) -> Change | None:
    wave = waves[position]
    state = text_at(wave, "state")
    if state == (text_at(before, "state") if before is not None else None):
        return None
    if not shown and state == WaveState.PENDING:
        return None  # not news: where every wave starts
    return Change({"type": "wave", "id": rollout_id, "index": position, "state": state},
                  wave_title(wave, len(waves)))


def _device_changes(rollout_id: str, position: int, before: Any, wave: Any) -> list[Change]:
    previous = {text_at(device, "device_id"): device for device in wave_devices(before)}
    found = []
    for device in wave_devices(wave):
        device_id = text_at(device, "device_id")
        was = previous.get(device_id)
        outcome, why = text_at(device, "outcome"), text_at(device, "reason")
        if was is not None and (outcome, why) == (text_at(was, "outcome"),
                                                  text_at(was, "reason")):
            continue
        if was is None and outcome == DeviceOutcome.PENDING:
            continue  # not news: where every device starts
        text = (f"  wave {position + 1}  {printable(device_id or '?', CELL_CHARS)}  "
                + (f"{_cell(was, 'outcome')} -> " if was is not None else "")
                + printable(outcome or "?", CELL_CHARS))
        if why:
            text += f": {printable(why, TEXT_CHARS)}"
        found.append(Change({"type": "device", "id": rollout_id, "wave": position,
                             "device_id": device_id, "outcome": outcome, "reason": why}, text))
    return found


def final(rollout: Any) -> tuple[int, str] | None:
    """(exit code, closing line) once the rollout has ended; None while it goes on."""
    state = text_at(rollout, "state")
    if state not in FINAL_STATES:
        return None
    rollout_id = _cell(rollout, "id")
    if state == RolloutState.SUCCEEDED:
        text = (f"rollout {rollout_id} succeeded: {succeeded_devices(rollout)} of "
                f"{total_devices(rollout)} devices on {_cell(lookup(rollout, 'spec'), 'tag')}"
                f" ({counts_text(rollout)})")
        if text_at(rollout, "reason"):
            text += f"; {printable(text_at(rollout, 'reason'), TEXT_CHARS)}"
    else:
        reason = printable(text_at(rollout, "reason") or "no reason given", TEXT_CHARS)
        text = f"rollout {rollout_id} {state}: {reason} ({counts_text(rollout)})"
    return FINAL_STATES[RolloutState(state)], text
