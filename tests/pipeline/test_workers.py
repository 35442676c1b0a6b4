"""The workers directory on the real Redis: entries expire, clobbered keys never crash."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from resonance_task.pipeline.workers import WorkerDirectory


async def test_live_workers_are_listed_and_a_clobbered_index_is_survived(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    app_id = f"test-{uuid.uuid4().hex[:8]}"
    a = WorkerDirectory(redis_url, app_id, "host-a:1", lambda: {"stages": {}}, interval=0.2)
    b = WorkerDirectory(redis_url, app_id, "host-b:2", lambda: {"stages": {}}, interval=0.2)
    await a.beat()
    await b.beat()
    assert [w["worker"] for w in await a.workers()] == ["host-a:1", "host-b:2"]
    await b.leave()
    assert [w["worker"] for w in await a.workers()] == ["host-a:1"]

    # Another hand writes the index as a string: the beat logs it and the worker goes on.
    await redis_client.delete(f"{app_id}:workers")
    await redis_client.set(f"{app_id}:workers", "not a set")
    await a.beat()
    await a.leave()
