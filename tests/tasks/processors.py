"""Processors the task tests run in real workers (TASK_PROCESSOR_MODULES names this).

Each reports what it did to Redis, where the test counts it: the worker is another process.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks import Context, PermanentError, processor

_redis: aioredis.Redis | None = None


def _client() -> aioredis.Redis:
    global _redis
    if _redis is None:
        _redis = aioredis.from_url(os.environ["REDIS_URL"], decode_responses=True)
    return _redis


def _payload(task: Task) -> dict[str, Any]:
    value = json.loads(task.payload or b"{}")
    assert isinstance(value, dict)
    return value


async def _count(task: Task) -> None:
    await _client().incr(f"test-task-runs:{os.environ['APP_ID']}:{task.task_id}")


@processor("flaky")
async def flaky(task: Task, ctx: Context) -> dict[str, Any]:
    """Fails its first `fail_times` runs, then succeeds."""
    await _count(task)
    if ctx.attempt < _payload(task).get("fail_times", 0):
        raise RuntimeError(f"flaky run {ctx.attempt}")
    return {"runs": ctx.attempt + 1}


@processor("always_fails")
async def always_fails(task: Task, ctx: Context) -> None:
    await _count(task)
    raise RuntimeError("it always fails")


@processor("refuses")
async def refuses(task: Task, ctx: Context) -> None:
    await _count(task)
    raise PermanentError("the payload can never work")


@processor("counted")
async def counted(task: Task, ctx: Context) -> str:
    await _count(task)
    return "counted"


@processor("sleeps")
async def sleeps(task: Task, ctx: Context) -> None:
    """Takes `ms` milliseconds and does nothing else (no Redis: the load is the worker's)."""
    await asyncio.sleep(_payload(task).get("ms", 5) / 1000)


@processor("slow")
class Slow:
    """Runs `seconds`, reporting progress; stop() ends it early."""

    def __init__(self) -> None:
        self.stopped: set[str] = set()

    async def run(self, task: Task, ctx: Context) -> str:
        await _count(task)
        steps = int(_payload(task).get("seconds", 1) * 10)
        for step in range(steps):
            if task.task_id in self.stopped:
                return "stopped"
            await ctx.progress(100 * step / steps, f"step {step}")
            await asyncio.sleep(0.1)
        return "done"

    async def stop(self, task: Task) -> None:
        self.stopped.add(task.task_id)
        await _client().set(f"test-task-stopped:{os.environ['APP_ID']}:{task.task_id}", 1)


class Typed(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    n: int = Field(ge=1)
    label: str = "plain"


@processor("typed", payload=Typed)
async def typed(task: Task, ctx: Context) -> dict[str, Any]:
    """Declares its payload: what reaches it was checked (and given as the model)."""
    await _count(task)
    assert isinstance(ctx.payload, Typed), ctx.payload
    return {"n": ctx.payload.n, "label": ctx.payload.label}
