"""deadline.call / deadline.stream: total deadlines and the stop grace (no I/O: the
"peers" here are functions that sleep or wait on an event)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from edge_agent.agent import deadline


@pytest.fixture(autouse=True)
def _fresh_stop(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    deadline.reset_stop()
    monkeypatch.setattr(deadline, "STOP_GRACE_S", 0.3)
    yield
    deadline.reset_stop()


def test_call_returns_the_value_and_raises_the_functions_own_error() -> None:
    assert deadline.call(lambda: 42, timeout_s=5, what="answer") == 42

    def fails() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        deadline.call(fails, timeout_s=5, what="failing")


def test_a_call_that_never_returns_is_given_up_at_its_deadline_and_cancelled() -> None:
    release = threading.Event()
    cancelled = threading.Event()
    started = time.monotonic()
    with pytest.raises(deadline.GaveUp, match=r"hang: no answer within 0\.3 s") as caught:
        deadline.call(release.wait, timeout_s=0.3, what="hang", cancel=cancelled.set)
    assert not caught.value.stopping
    assert cancelled.is_set()
    assert time.monotonic() - started < 5
    release.set()


def test_a_stop_gives_a_changing_call_its_grace_then_gives_it_up() -> None:
    deadline.request_stop()
    # a short step in flight completes within the grace
    def short_step() -> str:
        time.sleep(0.05)
        return "done"

    assert deadline.call(short_step, timeout_s=60, what="rename") == "done"
    release = threading.Event()
    with pytest.raises(deadline.GaveUp, match="the agent is stopping") as caught:
        deadline.call(release.wait, timeout_s=60, what="stop")
    assert caught.value.stopping
    release.set()
    # after the grace, nothing waits at all
    started = time.monotonic()
    with pytest.raises(deadline.GaveUp):
        deadline.call(threading.Event().wait, timeout_s=60, what="late")
    assert time.monotonic() - started < 1


def test_a_question_is_dropped_at_once_on_stop() -> None:
    release = threading.Event()
    threading.Timer(0.1, deadline.request_stop).start()
    started = time.monotonic()
    with pytest.raises(deadline.GaveUp) as caught:
        deadline.call(release.wait, timeout_s=60, what="inspect", should_abort=deadline.stopping)
    assert caught.value.stopping
    assert time.monotonic() - started < deadline.STOP_GRACE_S + 0.2
    release.set()


def test_stream_passes_items_and_ends() -> None:
    assert list(deadline.stream(lambda: iter([1, 2, 3]), idle_s=5, timeout_s=5,
                                what="three")) == [1, 2, 3]


def test_stream_raises_the_producers_error() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise ConnectionError("reset")

    seen = []
    with pytest.raises(ConnectionError, match="reset"):
        for item in deadline.stream(broken, idle_s=5, timeout_s=5, what="broken"):
            seen.append(item)
    assert seen == [1]


def test_a_stream_that_goes_quiet_is_given_up_and_cancelled() -> None:
    release = threading.Event()
    cancelled = threading.Event()

    def quiet() -> Iterator[int]:
        yield 1
        release.wait()
        yield 2

    seen = []
    with pytest.raises(deadline.GaveUp, match=r"no progress for 0\.3 s"):
        for item in deadline.stream(quiet, idle_s=0.3, timeout_s=60, what="pull",
                                    cancel=cancelled.set):
            seen.append(item)
    assert seen == [1]
    assert cancelled.is_set()
    release.set()


def test_a_dripping_stream_is_given_up_at_its_total_deadline() -> None:
    def drip() -> Iterator[int]:
        n = 0
        while True:
            time.sleep(0.05)
            n += 1
            yield n

    with pytest.raises(deadline.GaveUp, match=r"no answer within 0\.5 s"):
        for _ in deadline.stream(drip, idle_s=5, timeout_s=0.5, what="drip"):
            pass


def test_stream_stops_at_once_when_asked_to_abort() -> None:
    abort = threading.Event()
    threading.Timer(0.1, abort.set).start()
    started = time.monotonic()
    with pytest.raises(deadline.GaveUp) as caught:
        for _ in deadline.stream(lambda: iter(threading.Event().wait, True), idle_s=60,
                                 timeout_s=60, what="pull", should_abort=abort.is_set):
            pass
    assert caught.value.stopping
    assert time.monotonic() - started < 2


def test_request_stop_keeps_the_first_time() -> None:
    deadline.request_stop()
    first = deadline.stop_requested_at()
    deadline.request_stop()
    assert deadline.stop_requested_at() == first
    assert deadline.stopping()
