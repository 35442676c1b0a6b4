"""Retrying a store call: Kafka is the buffer while a store is down, not when it says no."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)
T = TypeVar("T")


async def retrying(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    permanent: tuple[type[BaseException], ...] = (),
    attempts: int | None = None,
) -> T:
    """Call until it succeeds, backing off (jittered) up to 5 s between attempts.

    A failing store holds the event or batch in hand (and its partition) back: crashing
    the stage instead would only restart the worker into the same wait. That holds for
    transient errors (see is_transient), retried for as long as it takes. Any other error
    is raised after `attempts` tries (None: never, for callers with nowhere to set the
    record aside yet), and errors of the `permanent` types at once.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except permanent:
            raise
        except Exception as exc:
            attempt += 1
            if attempts is not None and attempt >= attempts and not is_transient(exc):
                raise
            delay = min(5.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("%s failed (attempt %d), retrying in %.2fs: %r", what, attempt, delay, exc)
            await asyncio.sleep(delay)


def is_transient(exc: BaseException) -> bool:
    """The other side may answer later (connection, timeout, busy, a moving leader).

    Anything else is about the data or a bug, and will fail the same way next time.
    """
    if getattr(exc, "transient", False):
        return True  # a store's own error saying "wait for me" (e.g. a misconfigured table)
    # Python 3.11: ConnectionError and asyncio's TimeoutError are OSErrors too.
    if isinstance(exc, (OSError, RedisConnectionError, RedisTimeoutError, KafkaTimeoutError)):
        return True
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
