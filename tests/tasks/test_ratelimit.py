"""Rate limits per task type: counted in Redis for the whole cluster (the real Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

import pytest
import redis.asyncio as aioredis

from resonance_task.tasks.ratelimit import RateLimits, parse


def test_the_setting_parses_or_says_what_is_wrong() -> None:
    assert parse("") == {}
    assert parse("content_audit=50, archive=5") == {"content_audit": 50, "archive": 5}
    for bad in ("content_audit", "x=0", "x=-1", "x=1.5", "=3", "x=fast"):
        with pytest.raises(ValueError, match="tasks_per_second"):
            parse(bad)


async def test_two_workers_share_one_limit(redis_url: str) -> None:
    """Two limiters (two workers) on one type at 20 a second: 60 tokens take three
    seconds' windows between them, and no second grants more than 20."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    limiters = [RateLimits(c, prefix, {"audit": 20}) for c in clients]
    granted: list[float] = []

    async def take(limiter: RateLimits) -> None:
        await limiter.acquire("audit")
        granted.append(time.time())

    try:
        await asyncio.gather(*(take(limiters[i % 2]) for i in range(60)))
        await limiters[0].acquire("other")  # no limit: at once
    finally:
        for c in clients:
            await c.aclose()
    per_second = Counter(int(t) for t in granted)
    assert max(per_second.values()) <= 20, per_second
    assert len(per_second) >= 3, per_second
