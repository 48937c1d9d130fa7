"""The pure decision core: precedence, decide, verification verdicts, pull progress,
remembered failures and the recovery plan."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.reconcile import (
    MAX_INTERRUPTED,
    Action,
    Desired,
    Found,
    Probe,
    PullProgress,
    Recovery,
    RemoteTag,
    Running,
    Target,
    Verdict,
    attempt,
    backoff_s,
    counts_as_interrupted,
    decide,
    deciding_keys,
    failed_keys,
    failure_of,
    interruptions,
    judge,
    plan_recovery,
    relevant_attempts,
    resolve_desired,
)
from edge_agent.protocol.state import Source


def resolve(**overrides: object) -> Desired | None:
    sources: dict[str, object] = {
        "device": None, "groups": [], "fleet": None, "file_tag": None,
        "image_tag": None, "fallback_tag": "latest",
    }
    sources.update(overrides)
    return resolve_desired(**sources)  # type: ignore[arg-type]


def test_precedence_device_group_fleet_file_image_fallback() -> None:
    everything = {
        "device": RemoteTag("d", "r1"),
        "groups": [("g1", None), ("g2", RemoteTag("g"))],
        "fleet": RemoteTag("f"),
        "file_tag": "file",
        "image_tag": "img",
    }
    assert resolve(**everything) == Desired("d", Source.DEVICE, "r1")
    everything["device"] = None
    assert resolve(**everything) == Desired("g", Source.GROUP, None, detail="g2")
    everything["groups"] = [("g1", None)]
    assert resolve(**everything) == Desired("f", Source.FLEET)
    everything["fleet"] = None
    assert resolve(**everything) == Desired("file", Source.FILE)
    everything["file_tag"] = None
    assert resolve(**everything) == Desired("img", Source.IMAGE)
    everything["image_tag"] = None
    assert resolve(**everything) == Desired("latest", Source.FALLBACK)
    assert resolve(fallback_tag=None) is None


def test_first_listed_group_wins() -> None:
    desired = resolve(groups=[("a", RemoteTag("1")), ("b", RemoteTag("2"))])
    assert desired is not None
    assert (desired.tag, desired.detail) == ("1", "a")


def test_the_keys_deciding_a_desired_tag_are_its_own_and_every_one_above() -> None:
    device, fleet = (Source.DEVICE, None), (Source.FLEET, None)
    a, b = (Source.GROUP, "a"), (Source.GROUP, "b")
    assert deciding_keys(Desired("1", Source.DEVICE), ["a", "b"]) == [device]
    assert deciding_keys(Desired("1", Source.GROUP, detail="a"), ["a", "b"]) == [device, a]
    assert deciding_keys(Desired("1", Source.GROUP, detail="b"), ["a", "b"]) == [device, a, b]
    for below in (Source.FLEET, Source.FILE, Source.IMAGE, Source.FALLBACK):
        assert deciding_keys(Desired("1", below), ["a", "b"]) == [device, a, b, fleet]
    assert deciding_keys(None, []) == [device, fleet]


RUNNING = Running(digests=frozenset({"sha256:a"}), tag="1.0", config_digest="c1", running=True)


def test_same_digest_same_config_running_is_nothing() -> None:
    assert decide(Target("1.0", "sha256:a"), RUNNING, "c1", frozenset()) is Action.NOTHING


def test_same_digest_under_another_tag_is_nothing() -> None:
    assert decide(Target("latest", "sha256:a"), RUNNING, "c1", frozenset()) is Action.NOTHING


def test_new_digest_same_tag_updates() -> None:
    assert decide(Target("1.0", "sha256:b"), RUNNING, "c1", frozenset()) is Action.UPDATE


def test_changed_config_updates() -> None:
    assert decide(Target("1.0", "sha256:a"), RUNNING, "c2", frozenset()) is Action.UPDATE


def test_stopped_container_is_started() -> None:
    stopped = Running(RUNNING.digests, "1.0", "c1", running=False)
    assert decide(Target("1.0", "sha256:a"), stopped, "c1", frozenset()) is Action.START


def test_no_container_updates() -> None:
    assert decide(Target("1.0", "sha256:a"), None, "c1", frozenset()) is Action.UPDATE


def test_failed_digest_is_skipped_but_a_new_one_is_tried() -> None:
    failed = frozenset({"sha256:b"})
    assert decide(Target("2.0", "sha256:b"), RUNNING, "c1", failed) is Action.SKIP_FAILED
    assert decide(Target("2.0", "sha256:c"), RUNNING, "c1", failed) is Action.UPDATE


def test_unknown_digest_matches_by_tag() -> None:
    assert decide(Target("1.0", None), RUNNING, "c1", frozenset()) is Action.NOTHING
    assert decide(Target("2.0", None), RUNNING, "c1", frozenset()) is Action.UPDATE


def probe(status: str = "running", health: str | None = None, restarts: int = 0,
          elapsed: float = 0.0) -> Probe:
    return Probe(status, health, restarts, elapsed)


@pytest.mark.parametrize(
    ("p", "has_hc", "verdict"),
    [
        (probe(health="starting", elapsed=1), True, Verdict.WAIT),
        (probe(health="healthy", elapsed=1), True, Verdict.HEALTHY),
        (probe(health="unhealthy", elapsed=1), True, Verdict.FAILED),
        (probe(health="starting", elapsed=60), True, Verdict.FAILED),
        (probe(elapsed=9.9), False, Verdict.WAIT),
        (probe(elapsed=10), False, Verdict.HEALTHY),
        (probe(status="exited", elapsed=1), False, Verdict.FAILED),
        (probe(status="exited", health="healthy"), True, Verdict.FAILED),
        (probe(restarts=1, elapsed=1), False, Verdict.FAILED),
        (probe(status="restarting", elapsed=1), False, Verdict.FAILED),
        (probe(status="created", elapsed=1), False, Verdict.WAIT),
    ],
)
def test_judge(p: Probe, has_hc: bool, verdict: Verdict) -> None:
    assert judge(p, has_healthcheck=has_hc, initial_restarts=0, timeout_s=60)[0] is verdict


def test_judge_without_healthcheck_uses_smaller_timeout() -> None:
    assert judge(probe(elapsed=3), has_healthcheck=False, initial_restarts=0,
                 timeout_s=3)[0] is Verdict.HEALTHY


def test_pull_progress_counts_layers() -> None:
    progress = PullProgress()
    assert progress.update({"status": "Pulling from x", "id": "1.0"}) is None
    assert progress.update({"status": "Pulling fs layer", "id": "a"}) == 0
    progress.update({"status": "Pulling fs layer", "id": "b"})
    assert progress.update({"status": "Downloading", "id": "a",
                            "progressDetail": {"current": 50, "total": 100}}) == 22.5
    assert progress.update({"status": "Pull complete", "id": "a"}) == 50
    assert progress.update({"status": "Already exists", "id": "b"}) == 100
    assert progress.update({"status": "Digest: sha256:x"}) is None


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(n, 2, 30) for n in range(6)] == [2, 2, 4, 8, 16, 30]


def test_a_local_image_that_failed_is_skipped_by_its_id() -> None:
    """Decided without the registry: the local image id is what failed, so the same image
    is not tried at every check while the registry is away."""
    local = Target("2.0", None, image_id="sha256:local")
    assert local.key == "sha256:local"
    assert Target("2.0", "sha256:d", image_id="sha256:local").key == "sha256:d"
    assert decide(local, RUNNING, "c1", frozenset({"sha256:local"})) is Action.SKIP_FAILED
    assert decide(Target("2.0", None), RUNNING, "c1", frozenset({"sha256:local"})) \
        is Action.UPDATE


# -- remembered attempts -------------------------------------------------------------------
FAILED = [
    attempt("2.0", "sha256:b", "c1", "did not start: exec: no such file"),
    attempt("3.0", "sha256:c", "c1", "container exited"),
    {"desired": "2.0", "digest": "sha256:old", "reason": "from an older agent"},  # no config
]


def test_a_failure_holds_for_its_desired_tag_and_run_config_only() -> None:
    assert failed_keys(FAILED, "2.0", "c1") == {"sha256:b", "sha256:old"}
    assert failed_keys(FAILED, "2.0", "c2") == {"sha256:old"}  # docker_config.json changed
    assert failed_keys(FAILED, "3.0", "c1") == {"sha256:c"}
    assert failed_keys(FAILED, "4.0", "c1") == frozenset()
    assert relevant_attempts(FAILED, "2.0", "c2") == [FAILED[2]]
    assert relevant_attempts(FAILED, "2.0", "c1") == [FAILED[0], FAILED[2]]


def test_the_reason_of_a_failure_is_found_again() -> None:
    assert failure_of(FAILED, "2.0", "c1", "sha256:b") == "did not start: exec: no such file"
    assert failure_of(FAILED, "2.0", "c2", "sha256:b") is None
    assert failure_of(FAILED, "2.0", "c9", "sha256:old") == "from an older agent"
    assert failure_of([{"desired": "2.0", "digest": "x"}], "2.0", "c", "x") == \
        "no reason recorded"


def test_interruptions_are_counted_per_image_tag_and_config() -> None:
    records = [attempt("2.0", "sha256:b", "c1", "broken off")] * 2 + [
        attempt("2.0", "sha256:b", "c2", "broken off"),
        attempt("2.0", "sha256:x", "c1", "broken off"),
    ]
    assert interruptions(records, "2.0", "sha256:b", "c1") == 2
    assert interruptions(records, "2.0", "sha256:b", "c2") == 1
    assert interruptions(records, "1.0", "sha256:b", "c1") == 0
    assert MAX_INTERRUPTED >= 2  # a single power cut must not condemn an image


def test_attempt_without_a_config_is_recorded_without_one() -> None:
    assert attempt("2.0", "k", None, "r") == {"desired": "2.0", "digest": "k", "reason": "r"}


def test_a_failed_digest_is_known_again_by_its_local_image() -> None:
    """Failed while the registry answered (by digest); later the registry is away and
    the agent decides by the local image id: still the same failed image."""
    records = [attempt("2.0", "sha256:d", "c1", "did not start", image_id="sha256:img")]
    assert failed_keys(records, "2.0", "c1") == {"sha256:d", "sha256:img"}
    assert failure_of(records, "2.0", "c1", "sha256:img") == "did not start"
    local = Target("2.0", None, image_id="sha256:img")
    assert decide(local, RUNNING, "c1", failed_keys(records, "2.0", "c1")) \
        is Action.SKIP_FAILED
    assert "image" not in attempt("2.0", "sha256:img", "c1", "r", image_id="sha256:img")


# -- recovery --------------------------------------------------------------------------------
def found(step: str | None = "starting", *, failure: str | None = None,  # noqa: PLR0913
          new: str | None = "created", in_place: bool = True, old: bool = True,
          journal: bool = True) -> Found:
    return Found(journal=journal, step=step if journal else None, failure=failure,
                 new_status=new, new_in_place=in_place and new is not None, old_exists=old)


@pytest.mark.parametrize(("facts", "plan", "counted"), [
    # a judged failure is always undone, whatever the containers look like
    (found("rolling_back", failure="did not start", new="created"), Recovery.ROLL_BACK, False),
    (found("rolling_back", failure="exited", new=None), Recovery.ROLL_BACK, False),
    (found("rolling_back", failure="exited", new="running"), Recovery.ROLL_BACK, False),
    # the new container never started (killed at "stopped", daemon gone at start)
    (found("starting", new="created"), Recovery.ROLL_BACK, True),
    # it ran and stopped (daemon restart) or was killed while verifying
    (found("verifying", new="exited"), Recovery.ROLL_BACK, True),
    (found("verifying", new="dead"), Recovery.ROLL_BACK, True),
    # it runs in place: verify it as the update would have
    (found("verifying", new="running"), Recovery.VERIFY, False),
    (found("starting", new="running"), Recovery.VERIFY, False),  # killed just after start
    (found("verifying", new="restarting"), Recovery.VERIFY, False),
    # before the old container was stopped: undone, not counted
    (found("creating", new=None), Recovery.ROLL_BACK, False),
    (found("swapping", new="created", in_place=False), Recovery.ROLL_BACK, False),
    (found("swapping", new="created"), Recovery.ROLL_BACK, False),
    (found("swapping", new="running"), Recovery.ROLL_BACK, False),  # not journalled started
    # a running new container not in place is not trusted
    (found("verifying", new="running", in_place=False), Recovery.ROLL_BACK, True),
    # nothing there at all: forget the journal
    (found("creating", new=None, old=False), Recovery.CLEAR, False),
    # a first install (no old container) that never started
    (found("starting", new="created", old=False), Recovery.ROLL_BACK, True),
    # no journal (state.json lost): never verified, always undone, never counted
    (found(journal=False, new="running"), Recovery.ROLL_BACK, False),
    (found(journal=False, new=None), Recovery.ROLL_BACK, False),
])
def test_plan_recovery(facts: Found, plan: Recovery, counted: bool) -> None:
    assert plan_recovery(facts) is plan
    assert counts_as_interrupted(facts, plan) is counted


STEPS = st.sampled_from([None, "creating", "swapping", "starting", "verifying",
                         "rolling_back", "unknown"])
STATUSES = st.sampled_from([None, "created", "running", "restarting", "paused", "exited",
                            "dead", "removing"])


@given(st.builds(Found, journal=st.booleans(), step=STEPS,
                 failure=st.one_of(st.none(), st.text(max_size=5)), new_status=STATUSES,
                 new_in_place=st.booleans(), old_exists=st.booleans()))
def test_recovery_only_carries_on_with_a_journalled_new_container_running_in_place(
    facts: Found,
) -> None:
    plan = plan_recovery(facts)
    if plan is Recovery.VERIFY:
        assert facts.journal and facts.failure is None and facts.new_in_place
        assert facts.new_status in ("running", "restarting")
    if plan is Recovery.CLEAR:
        assert facts.new_status is None and not facts.old_exists and facts.failure is None
    if facts.failure is not None:
        assert plan is Recovery.ROLL_BACK
    if counts_as_interrupted(facts, plan):
        assert plan is Recovery.ROLL_BACK and facts.journal and facts.failure is None
