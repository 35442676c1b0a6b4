"""The token bucket alone: a rate, a burst, fairness between waiters."""

from __future__ import annotations

import asyncio
import time

import pytest

from resonance_task.offline.ratelimit import TokenBucket


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


async def test_waiters_go_in_arrival_order() -> None:
    bucket = TokenBucket(rate=100, burst=1)
    order: list[int] = []

    async def take(i: int) -> None:
        await bucket.acquire()
        order.append(i)

    await asyncio.gather(*(take(i) for i in range(20)))
    assert order == list(range(20))


async def test_a_late_wake_up_does_not_slow_the_rate() -> None:
    # Sustained rate at 1000/s, where each sleep's overshoot is a sizeable part of the
    # 1 ms between requests: the measured rate must still be the configured one.
    # The machine is shared: a run starved of CPU measures the machine, not the bucket.
    # A bucket that lost the overshoot would miss in every run, so the best of three counts.
    rates = []
    for _ in range(3):
        bucket = TokenBucket(rate=1000, burst=1)
        stamps: list[float] = []

        async def take(bucket: TokenBucket = bucket, stamps: list[float] = stamps) -> None:
            await bucket.acquire()
            stamps.append(time.monotonic())

        await asyncio.gather(*(take() for _ in range(600)))
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        if abs(rates[-1] - 1000) / 1000 <= 0.05:
            return
    raise AssertionError(f"rates {rates}, configured 1000/s")


async def test_acquiring_several_tokens_waits_for_all_of_them() -> None:
    bucket = TokenBucket(rate=100, burst=1)
    await bucket.acquire()
    started = time.monotonic()
    await bucket.acquire(5)
    assert 0.045 <= time.monotonic() - started <= 0.1
    with pytest.raises(ValueError):
        await bucket.acquire(0)
