"""Retrying a call the way the error policy (resonance_task.errors) says.

Kafka is the buffer while a store is down, not when it says no. Every stage calls its
stores through `retrying`: a transient error is retried with the one backoff, capped, for
as long as it takes, holding the batch in hand and its partition back; crashing the stage
instead would only restart the worker into the same wait. Poison is raised at once, any
other error after a few tries, and the caller dead-letters the one record or recipient
it concerns.

A call that has been retrying for a while is a stall: `stalls()` lists them, and
`/ready` turns red while one lasts longer than READY_STALL_SECONDS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_base

from resonance_task.errors import ATTEMPTS, BACKOFF, Poison, Transient, classify

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DELAY_SECONDS = BACKOFF.cap


class _Stall:
    __slots__ = ("since", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.since = time.monotonic()


_stalls: set[_Stall] = set()


def stalls() -> dict[str, float]:
    """What is retrying now, and for how long (seconds) the oldest of each has been."""
    now = time.monotonic()
    found: dict[str, float] = {}
    for stall in _stalls:
        found[stall.what] = max(found.get(stall.what, 0.0), round(now - stall.since, 2))
    return found


class _Policy(retry_base):
    def __init__(self, attempts: int | None) -> None:
        self._attempts = attempts

    def __call__(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        if not isinstance(exc, Exception):
            return False
        verdict = classify(exc)
        if isinstance(verdict, Poison):
            return False
        if isinstance(verdict, Transient) or self._attempts is None:
            return True
        return state.attempt_number < self._attempts


class _Until(stop_base):
    def __init__(self, stop: Callable[[], bool] | None) -> None:
        self._stop = stop

    def __call__(self, state: RetryCallState) -> bool:
        return self._stop is not None and self._stop()


async def retrying(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    attempts: int | None = ATTEMPTS,
    until: Callable[[], bool] | None = None,
    max_delay: float = MAX_DELAY_SECONDS,
) -> T:
    """`call()` until it succeeds; transient errors are retried without end.

    Poison is raised at once, a permanent error after `attempts` tries (None: retried
    like a transient one, for callers with nowhere to set the record aside), and the last
    error when `until()` turns true (the stage is stopping).
    """
    backoff = BACKOFF.capped(max_delay)
    stall: _Stall | None = None

    def before_sleep(state: RetryCallState) -> None:
        nonlocal stall
        if stall is None:
            stall = _Stall(what)
            _stalls.add(stall)
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s failed (attempt %d), retrying in %.2fs: %r", what, state.attempt_number, delay, exc
        )

    retryer = AsyncRetrying(
        retry=_Policy(attempts),
        stop=_Until(until),
        wait=lambda state: backoff.delay(state.attempt_number),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:  # tenacity awaits only what a coroutine function returns
        return await call()

    try:
        return await retryer(attempt)
    finally:
        if stall is not None:
            _stalls.discard(stall)
