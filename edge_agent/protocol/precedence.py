"""The precedence of desired tags (docs/PROTOCOL.md, section 4) as operators read it from
state documents: which devices a group or fleet tag reaches, and which group or fleet
tag a device's own tag shadows. Pure: state documents (already checked by
``device_data``) and retained tags in, answers out.

A device lists its ``DEVICE_GROUPS`` in its state (``groups``); an agent too old to do so
is taken to be in the group it follows (``desired.group``) only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from edge_agent.protocol.answers import lookup
from edge_agent.protocol.state import Source


def groups_of(state: Mapping[str, Any] | None) -> list[str]:
    """The device's groups, in its order of precedence."""
    if state is None:
        return []
    groups = state.get("groups")
    if isinstance(groups, list):
        return [g for g in groups if isinstance(g, str)]
    followed = lookup(state, "desired", "group")
    return [followed] if isinstance(followed, str) else []


def in_scope(state: Mapping[str, Any] | None, group: str | None) -> bool:
    """Whether a tag for ``group`` (None: the fleet) reaches the device at all."""
    return group is None or group in groups_of(state)


def repositories(states: Iterable[Mapping[str, Any] | None], group: str | None = None
                 ) -> list[str]:
    """The image repositories (state ``image``) of the devices a tag for ``group`` (None:
    the fleet) reaches."""
    found = {state["image"] for state in states
             if state is not None and isinstance(state.get("image"), str)
             and in_scope(state, group)}
    return sorted(found)


def shadowed(state: Mapping[str, Any] | None, group_tags: Mapping[str, str],
             fleet_tag: str | None) -> dict[str, Any] | None:
    """The group or fleet tag that the device would follow without its own tag, when it
    has one of its own (``desired.source`` is ``device``) and that tag differs:
    ``{"scope": "group", "group": "line-1", "tag": "2.0"}`` or
    ``{"scope": "fleet", "group": None, "tag": "2.0"}``; else None."""
    if lookup(state, "desired", "source") != Source.DEVICE:
        return None
    below: dict[str, Any] | None = None
    for group in groups_of(state):
        if group in group_tags:
            below = {"scope": str(Source.GROUP), "group": group, "tag": group_tags[group]}
            break
    if below is None and fleet_tag is not None:
        below = {"scope": str(Source.FLEET), "group": None, "tag": fleet_tag}
    if below is None or below["tag"] == lookup(state, "desired", "tag"):
        return None
    return below
