"""Pure decision logic: no I/O, no clocks, no Docker. Everything here is unit-tested.

The agent gathers facts (desired sources, the container, the registry's answer),
and these functions say what to do about them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edge_agent.protocol.state import Source


@dataclass(frozen=True)
class Desired:
    """The tag the agent should run, where it came from and the request it answers."""

    tag: str
    source: Source
    request_id: str | None = None
    detail: str | None = None  # the group name when source is GROUP


@dataclass(frozen=True)
class RemoteTag:
    """A desired tag received over MQTT (device, group or fleet topic)."""

    tag: str
    request_id: str | None = None


def resolve_desired(  # noqa: PLR0911, PLR0913 - one per precedence level
    *,
    device: RemoteTag | None,
    groups: Sequence[tuple[str, RemoteTag | None]],
    fleet: RemoteTag | None,
    file_tag: str | None,
    image_tag: str | None,
    fallback_tag: str | None,
) -> Desired | None:
    """Apply the precedence device > group (first listed) > fleet > file > image > fallback."""
    if device is not None:
        return Desired(device.tag, Source.DEVICE, device.request_id)
    for name, remote in groups:
        if remote is not None:
            return Desired(remote.tag, Source.GROUP, remote.request_id, detail=name)
    if fleet is not None:
        return Desired(fleet.tag, Source.FLEET, fleet.request_id)
    if file_tag is not None:
        return Desired(file_tag, Source.FILE)
    if image_tag is not None:
        return Desired(image_tag, Source.IMAGE)
    if fallback_tag is not None:
        return Desired(fallback_tag, Source.FALLBACK)
    return None


def deciding_keys(desired: Desired | None, groups: Sequence[str]
                  ) -> list[tuple[Source, str | None]]:
    """The desired-tag topics, as (scope, group), that decide ``desired``: its own and
    every one above it, whose tag would win if it had one (device > groups in order >
    fleet). Below the fleet (file, image, fallback): all of them."""
    chain: list[tuple[Source, str | None]] = [
        (Source.DEVICE, None), *((Source.GROUP, g) for g in groups), (Source.FLEET, None)]
    if desired is None:
        return chain
    if desired.source is Source.DEVICE:
        return chain[:1]
    if desired.source is Source.GROUP and (Source.GROUP, desired.detail) in chain:
        return chain[:chain.index((Source.GROUP, desired.detail)) + 1]
    return chain


@dataclass(frozen=True)
class Target:
    """The image a check decided to run: tag, registry digest (if known) and why."""

    tag: str
    digest: str | None
    fallback_reason: str | None = None  # set when running FALLBACK_TAG instead of desired
    registry_error: str | None = None  # set when decided from local images alone
    image_id: str | None = None  # the local image, when decided without a registry digest

    @property
    def key(self) -> str | None:
        """What a failure of this target is remembered by: the digest, else the local image."""
        return self.digest or self.image_id


@dataclass(frozen=True)
class Running:
    """What the agent needs to know about the current container to decide."""

    digests: frozenset[str]
    tag: str | None
    config_digest: str | None
    running: bool


class Action(enum.StrEnum):
    NOTHING = "nothing"
    START = "start"  # same image and config, but the container is not running
    UPDATE = "update"
    SKIP_FAILED = "skip_failed"  # this image failed for this desired tag and run config


def decide(
    target: Target,
    running: Running | None,
    config_digest: str,
    failed: frozenset[str],
) -> Action:
    """Compare the target with the running container.

    A target without a digest (registry unreachable, image only known locally) matches
    by tag. ``failed`` holds the keys (``Target.key``) of images that failed under this
    desired tag with this run config (``failed_keys``): they are skipped.
    """
    if running is not None and running.config_digest == config_digest:
        same_image = (
            target.digest in running.digests if target.digest else target.tag == running.tag
        )
        if same_image:
            return Action.NOTHING if running.running else Action.START
    if target.key is not None and target.key in failed:
        return Action.SKIP_FAILED
    return Action.UPDATE


# -- failed and interrupted attempts ----------------------------------------------------
# An attempt is remembered as {"desired", "digest", "config", "reason", "image"}: the
# desired tag it was made for, the image (Target.key), the docker_config.json digest, why
# it ended, and the local image id (so it is known again when the registry is away and
# the agent decides by the local image). A change of any of the first three is worth a
# new try; records of earlier agents carry no "config" and hold for any run config.
Attempt = Mapping[str, str]
A = TypeVar("A", bound=Attempt)

# An update broken off this many times in a row with no verdict (agent killed, Docker
# daemon gone while the old container was stopped) counts as failed: an image that takes
# the device down at start must not take it down forever.
MAX_INTERRUPTED = 3
# Journal steps at which the old container may already be stopped.
STOPPING_STEPS = frozenset({"starting", "verifying"})


def attempt(desired: str, key: str, config: str | None, reason: str,
            image_id: str | None = None) -> dict[str, str]:
    """A record for AgentState.failed or AgentState.interrupted."""
    record = {"desired": desired, "digest": key, "reason": reason}
    if config is not None:
        record["config"] = config
    if image_id is not None and image_id != key:
        record["image"] = image_id
    return record


def _concerns(record: Attempt, desired: str, config: str) -> bool:
    return record.get("desired") == desired and record.get("config", config) == config


def relevant_attempts(records: Sequence[A], desired: str, config: str) -> list[A]:
    """The records that still hold for this desired tag and run config; others are void."""
    return [r for r in records if _concerns(r, desired, config)]


def failed_keys(records: Sequence[Attempt], desired: str, config: str) -> frozenset[str]:
    """Keys of the images not to try again under this desired tag and run config."""
    return frozenset(key for r in records if _concerns(r, desired, config)
                     for key in (r.get("digest"), r.get("image")) if key)


def failure_of(records: Sequence[Attempt], desired: str, config: str, key: str) -> str | None:
    """Why ``key`` failed under this desired tag and config; None if it did not."""
    for record in records:
        if _concerns(record, desired, config) and key in (record.get("digest"),
                                                          record.get("image")):
            return record.get("reason") or "no reason recorded"
    return None


def interruptions(records: Sequence[Attempt], desired: str, key: str, config: str) -> int:
    """How many updates to ``key`` under this desired tag and config were broken off."""
    return sum(1 for r in records if _concerns(r, desired, config) and r.get("digest") == key)


# -- recovery -------------------------------------------------------------------------
class Recovery(enum.StrEnum):
    CLEAR = "clear"  # nothing to undo: forget the journal
    ROLL_BACK = "roll_back"  # remove the new container, put the old one back in service
    VERIFY = "verify"  # the new container runs: judge it as the update would have


@dataclass(frozen=True)
class Found:
    """What recovery finds: the journal of the update and the containers it made."""

    journal: bool  # an update is journalled in the state
    step: str | None  # its last journalled step
    failure: str | None  # the journal says it failed and a rollback was under way
    new_status: str | None  # the new container's status; None when there is none
    new_in_place: bool  # the new container holds the container name
    old_exists: bool  # the container the update replaces still exists


def plan_recovery(found: Found) -> Recovery:
    """Finish or undo an update that a crash or a Docker error broke off.

    Only a journalled update whose new container runs in place is carried on (verified);
    everything else is undone. An update already judged failed is always undone.
    """
    if found.failure is not None:
        return Recovery.ROLL_BACK
    if found.new_status is None:
        return Recovery.ROLL_BACK if found.old_exists else Recovery.CLEAR
    if (found.journal and found.new_in_place and found.step in STOPPING_STEPS
            and found.new_status in ("running", "restarting")):
        return Recovery.VERIFY
    return Recovery.ROLL_BACK


def counts_as_interrupted(found: Found, plan: Recovery) -> bool:
    """An undone update that may have stopped the old container, with no verdict of its
    own: it counts towards MAX_INTERRUPTED."""
    return (plan is Recovery.ROLL_BACK and found.journal and found.failure is None
            and found.step in STOPPING_STEPS)


class Verdict(enum.StrEnum):
    WAIT = "wait"
    HEALTHY = "healthy"
    FAILED = "failed"


@dataclass(frozen=True)
class Probe:
    """One look at a container being verified."""

    status: str
    health: str | None
    restart_count: int
    elapsed_s: float


STABLE_RUN_S = 10.0


def judge(  # noqa: PLR0911 - one return per verdict and reason
    probe: Probe, *, has_healthcheck: bool, initial_restarts: int, timeout_s: float
) -> tuple[Verdict, str]:
    """Decide whether a freshly started container has proven itself (docs/PROTOCOL.md,
    section 10, step 4)."""
    if probe.status in ("exited", "dead"):
        return Verdict.FAILED, f"container {probe.status}"
    if probe.restart_count > initial_restarts or probe.status == "restarting":
        return Verdict.FAILED, "container restarted"
    if has_healthcheck:
        if probe.health == "healthy":
            return Verdict.HEALTHY, "healthy"
        if probe.health == "unhealthy":
            return Verdict.FAILED, "container turned unhealthy"
        if probe.elapsed_s >= timeout_s:
            return Verdict.FAILED, f"not healthy within {timeout_s:g} s"
        return Verdict.WAIT, "waiting for health check"
    if probe.status != "running":
        if probe.elapsed_s >= timeout_s:
            return Verdict.FAILED, f"container {probe.status}"
        return Verdict.WAIT, f"container {probe.status}"
    if probe.elapsed_s >= min(STABLE_RUN_S, timeout_s):
        return Verdict.HEALTHY, "kept running"
    return Verdict.WAIT, "watching it run"


@dataclass
class PullProgress:
    """Turns Docker's per-layer pull messages into one percentage."""

    layers: dict[str, float] = field(default_factory=dict)
    last_reported: float = -1.0

    # Statuses Docker sends per layer; other messages (e.g. "Pulling from x" with the
    # tag as its id) are not about a layer.
    LAYER_STATUSES = frozenset({
        "Pulling fs layer", "Waiting", "Downloading", "Verifying Checksum",
        "Download complete", "Extracting", "Pull complete", "Already exists",
    })

    def update(self, message: Mapping[str, Any]) -> float | None:
        """Feed one message; return the new percentage when it moved by at least 1."""
        layer = message.get("id")
        status = str(message.get("status", ""))
        if not isinstance(layer, str) or status not in self.LAYER_STATUSES:
            return None
        detail = message.get("progressDetail") or {}
        current, total = detail.get("current"), detail.get("total")
        if status == "Already exists":
            # Nothing to download: a layer the device has counts for nothing either way.
            # (Counting it as done showed 100 % before the layers still to come were
            # even announced, and the report never goes down.)
            self.layers.pop(layer, None)
        else:
            fraction = self.layers.get(layer, 0.0)
            if status == "Downloading" and total:
                fraction = 0.9 * min(current or 0, total) / total
            elif status == "Extracting" and total:
                fraction = 0.9 + 0.1 * min(current or 0, total) / total
            elif status == "Pull complete":
                fraction = 1.0
            elif status in ("Download complete", "Verifying Checksum"):
                fraction = max(fraction, 0.9)
            self.layers[layer] = fraction
        if not self.layers:
            return None
        percent = round(100 * sum(self.layers.values()) / len(self.layers), 1)
        if percent >= self.last_reported + 1 or (percent == 100 and self.last_reported < 100):  # noqa: PLR2004
            self.last_reported = percent
            return percent
        return None


def backoff_s(failures: int, base_s: float, cap_s: float) -> float:
    """Delay before retrying after ``failures`` consecutive failures: doubling, capped."""
    if failures <= 0:
        return base_s
    return float(min(cap_s, base_s * (2 ** min(failures - 1, 16))))
