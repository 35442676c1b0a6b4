"""Retrying a store call until it succeeds: Kafka is the buffer while a store is down."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

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
