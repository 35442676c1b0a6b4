"""Rate limits per task type, for the whole cluster: TASK_RATE_LIMITS="content_audit=50".

A limit protects what a processor calls (a moderation service, a push provider), and
that does not care how many workers call it: so the count is in Redis, per type and per
second, not per worker. A worker takes tokens in small chunks (a twentieth of the rate)
and hands them out locally, so a limited type costs Redis one call per chunk, not per
task. A task waiting for a token waits outside the run slots: a limited backlog does not
hold slots other types could use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping

from redis import asyncio as aioredis

from resonance_task.pipeline import metrics
from resonance_task.pipeline.retry import retrying

log = logging.getLogger(__name__)

# KEYS: this second's counter; ARGV: the limit, tokens wanted. Returns tokens granted.
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], 5000)
return grant
"""


def parse(spec: str) -> dict[str, int]:
    """ "type=rate,type2=rate" (whole tasks a second, >= 1) -> {type: rate}."""
    limits: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, rate = part.partition("=")
        if not sep or not name.strip() or not rate.strip().isdigit() or int(rate) < 1:
            raise ValueError(f"task_type=tasks_per_second (>= 1), comma-separated; got {part!r}")
        limits[name.strip()] = int(rate)
    return limits


class _Bucket:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.chunk = max(1, math.ceil(rate / 20))
        self.window = -1
        self.tokens = 0
        self.lock = asyncio.Lock()


class RateLimits:
    def __init__(self, redis: aioredis.Redis, prefix: str, limits: Mapping[str, int]) -> None:
        self._redis = redis
        self._prefix = prefix
        self._buckets = {name: _Bucket(rate) for name, rate in limits.items()}
        self._take = redis.register_script(_TAKE)

    def limited(self, task_type: str) -> bool:
        return task_type in self._buckets

    async def acquire(self, task_type: str) -> None:
        """Wait for one token of `task_type` (at once if it has no limit)."""
        bucket = self._buckets.get(task_type)
        if bucket is None:
            return
        async with bucket.lock:  # one asker per type at a time: no herd on Redis
            waited = False
            while True:
                now = time.time()
                window = int(now)
                if window != bucket.window:
                    bucket.window, bucket.tokens = window, 0  # a second's tokens end with it
                if bucket.tokens == 0:
                    bucket.tokens = await self._refill(task_type, bucket, window)
                if bucket.tokens > 0:
                    bucket.tokens -= 1
                    return
                if not waited:
                    metrics.TASKS_RATE_LIMITED.labels(task_type).inc()
                    waited = True
                await asyncio.sleep(window + 1 - now)

    async def _refill(self, task_type: str, bucket: _Bucket, window: int) -> int:
        key = f"{self._prefix}rate:{task_type}:{window}"
        # A limit Redis cannot count is not enforced, loudly: better than tasks that never
        # start (a transient error is waited out first).
        try:
            granted = await retrying(
                lambda: self._take(keys=[key], args=[bucket.rate, bucket.chunk]),
                "task rate limit",
                attempts=1,
            )
        except Exception as exc:
            log.error("rate limit of %s not counted, task runs: %r", task_type, exc)
            return 1
        return int(granted)
