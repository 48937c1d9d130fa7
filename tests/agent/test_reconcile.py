"""The pure decision core: precedence, decide, verification verdicts, pull progress."""

from __future__ import annotations

import pytest

from edge_agent.agent.reconcile import (
    Action,
    Desired,
    Probe,
    PullProgress,
    RemoteTag,
    Running,
    Target,
    Verdict,
    backoff_s,
    decide,
    judge,
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
