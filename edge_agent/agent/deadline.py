"""Bounded blocking calls: every call to a peer (registry, Docker daemon) has a total
deadline, and is given up soon after the agent is asked to stop.

A socket timeout bounds each read, not the call: a peer that sends one byte every few
seconds never trips it. And a read blocked in the loop's thread does not return for a
signal: Python runs the handler and reads on. So ``call`` runs the blocking function in a
short-lived daemon thread while the caller waits for it in short slices; when the
deadline passes, or the agent is stopping and the stop grace is over, the caller gives
up on it (``cancel`` shuts its connection where the caller can, so the thread ends too)
and goes on. The loop still does one thing at a time: it waits for each call, and a
given-up call's thread only finishes its I/O and exits.

The SIGTERM promise: the agent exits within ``STOP_PROMISE_S`` in every state. A call
that changes something (create, rename, stop, start...) and is in flight when the signal
arrives gets ``STOP_GRACE_S`` to finish, so a swap in progress completes; one that only
asks (inspect, the registry check) is given up at once (``should_abort=stopping``).
After the grace every call is given up at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

STOP_PROMISE_S = 5.0
STOP_GRACE_S = 2.0
# How often a waiting caller looks at the clock and at a stop request.
SLICE_S = 0.1

_stop_at: float | None = None


def request_stop() -> None:
    """Note that the agent must stop (signal-handler safe: one store, no lock)."""
    global _stop_at  # noqa: PLW0603 - one process-wide fact, set from a signal handler
    if _stop_at is None:
        _stop_at = time.monotonic()


def stopping() -> bool:
    """True once a stop was requested: for calls that change nothing and need no grace."""
    return _stop_at is not None


def stop_requested_at() -> float | None:
    """``time.monotonic()`` of the stop request, None while running."""
    return _stop_at


def reset_stop() -> None:
    """Forget a stop request (for tests that run agents in-process)."""
    global _stop_at  # noqa: PLW0603
    _stop_at = None


def _stop_deadline() -> float | None:
    return None if _stop_at is None else _stop_at + STOP_GRACE_S


class GaveUp(Exception):
    """A bounded call was given up; the message says after how long, or that the agent
    is stopping. Callers translate it into their own error."""

    def __init__(self, what: str, reason: str, *, stopping: bool) -> None:
        super().__init__(f"{what}: {reason}")
        self.stopping = stopping


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    error: BaseException | None = None


def _verdict(  # noqa: PLR0913, PLR0917 - private; the state call() and stream() share
    what: str, deadline: float, timeout_s: float, should_abort: Callable[[], bool] | None,
    idle_s: float | None = None, last_seen: float = 0.0,
) -> GaveUp | None:
    """Why to give up now, if we must."""
    now = time.monotonic()
    stop = _stop_deadline()
    if stop is not None and now >= stop:
        return GaveUp(what, "given up: the agent is stopping", stopping=True)
    if should_abort is not None and should_abort():
        return GaveUp(what, "given up: the agent is stopping", stopping=True)
    if now >= deadline:
        return GaveUp(what, f"no answer within {timeout_s:g} s", stopping=False)
    if idle_s is not None and now - last_seen >= idle_s:
        return GaveUp(what, f"no progress for {idle_s:g} s", stopping=False)
    return None


def call(
    fn: Callable[[], T], *, timeout_s: float, what: str,
    cancel: Callable[[], None] | None = None, should_abort: Callable[[], bool] | None = None,
) -> T:
    """``fn()``, or GaveUp after ``timeout_s`` (or when stopping). ``fn``'s own exceptions
    are raised here unchanged. ``cancel`` is called when the call is given up."""
    outcome: _Outcome[T] = _Outcome()
    done = threading.Event()

    def run() -> None:
        try:
            outcome.value = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome.error = exc
        finally:
            done.set()

    threading.Thread(target=run, name=f"call: {what}"[:60], daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(SLICE_S):
        gave_up = _verdict(what, deadline, timeout_s, should_abort)
        if gave_up is not None:
            if cancel is not None:
                cancel()
            raise gave_up
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]  # set whenever error is None


_END = object()


def stream(  # noqa: PLR0913 - keyword-only limits of one guarded stream
    open_stream: Callable[[], Iterable[T]], *, idle_s: float, timeout_s: float, what: str,
    cancel: Callable[[], None] | None = None, should_abort: Callable[[], bool] | None = None,
) -> Generator[T, None, None]:
    """The items of a blocking stream, read by a worker thread. GaveUp when no item came
    for ``idle_s``, when the whole stream took longer than ``timeout_s``, or when
    stopping. ``cancel`` (and the worker noticing, at its next item) ends the reading."""
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    given_up = threading.Event()

    def run() -> None:
        try:
            for item in open_stream():
                if given_up.is_set():
                    return
                items.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            items.put(_Failure(exc))
        finally:
            items.put(_END)

    threading.Thread(target=run, name=f"stream: {what}"[:60], daemon=True).start()
    deadline = last_seen = time.monotonic()
    deadline += timeout_s
    finished = False
    try:
        while True:
            try:
                item = items.get(timeout=SLICE_S)
            except queue.Empty:
                gave_up = _verdict(what, deadline, timeout_s, should_abort, idle_s, last_seen)
                if gave_up is not None:
                    raise gave_up from None
                continue
            if item is _END:
                finished = True
                return
            if isinstance(item, _Failure):
                finished = True
                raise item.error
            last_seen = time.monotonic()
            yield item
            gave_up = _verdict(what, deadline, timeout_s, should_abort)
            if gave_up is not None:
                raise gave_up
    finally:
        if not finished:
            given_up.set()
            if cancel is not None:
                cancel()


@dataclass(frozen=True)
class _Failure:
    error: BaseException
