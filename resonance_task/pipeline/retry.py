"""The one error policy: transient errors wait, permanent ones are set aside.

Kafka is the buffer while a store is down, not when it says no. Every stage calls its
stores through `retrying`: a transient error (connection, timeout, busy, a moving leader)
is retried with jittered exponential backoff, capped, for as long as it takes, holding the
batch in hand and its partition back; crashing the stage instead would only restart the
worker into the same wait. Any other error is about the data or a bug and fails the same
way next time: it is raised after a few tries, and the caller dead-letters the one record
or recipient it concerns.

A call that has been retrying for a while is a stall: `stalls()` lists them, and
`/ready` turns red while one lasts longer than READY_STALL_SECONDS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential
from tenacity.retry import retry_base
from tenacity.stop import stop_base

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DELAY_SECONDS = 5.0
PERMANENT_ATTEMPTS = 3  # tries of an error that is not transient, before it is raised


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
    def __init__(self, permanent: tuple[type[BaseException], ...], attempts: int | None) -> None:
        self._permanent = permanent
        self._attempts = attempts

    def __call__(self, state: RetryCallState) -> bool:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return False
        exc = outcome.exception()
        if not isinstance(exc, Exception) or isinstance(exc, self._permanent):
            return False
        if is_transient(exc) or self._attempts is None:
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
    permanent: tuple[type[BaseException], ...] = (),
    attempts: int | None = PERMANENT_ATTEMPTS,
    until: Callable[[], bool] | None = None,
    max_delay: float = MAX_DELAY_SECONDS,
) -> T:
    """`call()` until it succeeds; transient errors are retried without end.

    An error that is not transient is raised after `attempts` tries (None: retried like a
    transient one, for callers with nowhere to set the record aside), errors of the
    `permanent` types at once, and the last error when `until()` turns true (the stage
    is stopping).
    """
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
        retry=_Policy(permanent, attempts),
        stop=_Until(until),
        wait=wait_random_exponential(multiplier=0.05, max=max_delay),
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


# Redis answers these while it cannot serve now but will: a script running too long, a
# cluster resharding or failing over, a replica not yet promoted, memory full until
# keys expire. Every other error reply (WRONGTYPE, CROSSSLOT, a script error) is final.
_REDIS_TRANSIENT_REPLIES = (
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "LOADING",
    "OOM",
)


def redis_reply(exc: BaseException) -> str:
    """A Redis error reply as the server said it, without redis-py's pipeline preamble
    ("Command # 1 (<the command, arguments and all>) of pipeline caused error: ...")."""
    text = str(exc.args[0]) if exc.args else str(exc)
    _, found, reply = text.partition(" of pipeline caused error: ")
    # The reply comes as the repr of the original error's args: ('WRONGTYPE ...',)
    return reply.lstrip("('\"") if found else text


def is_transient(exc: BaseException) -> bool:
    """The other side may answer later (connection, timeout, busy, a moving leader).

    Anything else is about the data or a bug, and will fail the same way next time.
    """
    if getattr(exc, "transient", False):
        return True  # a store's own error saying "wait for me" (e.g. a misconfigured table)
    # Python 3.11: ConnectionError and asyncio's TimeoutError are OSErrors too.
    if isinstance(exc, (OSError, RedisConnectionError, RedisTimeoutError, KafkaTimeoutError)):
        return True
    if isinstance(exc, RedisResponseError):
        return redis_reply(exc).startswith(_REDIS_TRANSIENT_REPLIES)
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    # asyncpg is imported only when configured: judge its errors by class, not import.
    return any(
        cls.__module__.startswith("asyncpg") and cls.__name__ in _ASYNCPG_TRANSIENT
        for cls in type(exc).__mro__
    )


_ASYNCPG_TRANSIENT = (
    "PostgresConnectionError",
    "ConnectionDoesNotExistError",
    "TransactionRollbackError",  # serialization failure, deadlock: the next try may pass
    "TooManyConnectionsError",
    "CannotConnectNowError",
)
