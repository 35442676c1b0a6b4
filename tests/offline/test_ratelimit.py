"""The token bucket alone: a rate, a burst, fairness between waiters."""

from __future__ import annotations

import asyncio
import time

import pytest

from offline.ratelimit import TokenBucket


async def test_rate_after_the_burst() -> None:
    bucket = TokenBucket(rate=200, burst=5)
    started = time.monotonic()
    for _ in range(5):
        await bucket.acquire()
    assert time.monotonic() - started < 0.02  # the burst goes at once
    started = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(40)))
    assert 40 / 200 * 0.9 <= time.monotonic() - started <= 40 / 200 * 1.5


def test_rate_must_be_positive() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)
