"""Retrying a store call until it succeeds: Kafka is the buffer while a store is down."""

from __future__ import annotations

import asyncio
import logging
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
) -> T:
    """Call until it succeeds, backing off up to 5 s between attempts.

    A failing store holds the event or batch in hand (and its partition) back. Crashing
    the stage instead would only restart the worker into the same wait. Errors of the
    `permanent` types are not the store being down: they are raised at once.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except permanent:
            raise
        except Exception as exc:
            attempt += 1
            delay = min(5.0, 0.05 * 2**attempt)
            log.warning("%s failed (attempt %d), retrying in %.2fs: %r", what, attempt, delay, exc)
            await asyncio.sleep(delay)


def is_transient(exc: BaseException) -> bool:
    """The other side may answer later (connection, timeout, busy, a moving leader).

    Anything else is about the data or a bug, and will fail the same way next time.
    """
    if isinstance(exc, (ConnectionError, TimeoutError, asyncio.TimeoutError, OSError)):
        return True
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, KafkaTimeoutError)):
        return True
    if isinstance(exc, KafkaError):
        return bool(getattr(exc, "retriable", False))
    # asyncpg is imported only when configured: judge its errors by class, not import.
    return any(
        cls.__module__.startswith("asyncpg")
        and cls.__name__ in ("PostgresConnectionError", "ConnectionDoesNotExistError")
        for cls in type(exc).__mro__
    )
