"""Typed tasks on one worker: no-op tasks/s, submit-to-start latency at a steady rate,
and high priority against a low backlog.

Tasks are produced to the submit topic as protobuf, as a service would; a task counts
when its status says succeeded. Burst latency is the status's finished_at - created_at
(intake to end of run); the paced run's is started_at - submitted_at, the latter stamped
by the bench as it produces the task (submit to start, the Kafka hop included). Both
are read back from Redis after the run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.harness import pct, rss_mb
from bench.pipeline import REDIS_URL, System
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task


async def _produce(system: System, tasks: list[Task]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=system.broker.bootstrap, linger_ms=5)
    await producer.start()
    started = time.monotonic()
    try:
        topic = system.env["TOPIC_TASKS"]
        for task in tasks:
            await producer.send(topic, task.SerializeToString(), key=task.task_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - started


async def _succeeded(system: System) -> int:
    """How many tasks of this app have succeeded: one ZCARD, so polling costs the bench
    next to nothing (it shares the machine with the worker it measures)."""
    r = aioredis.from_url(REDIS_URL)
    try:
        return int(await r.zcard(f"{system.env['APP_ID']}:{{tasks}}:state:succeeded"))
    finally:
        await r.aclose()


async def _until_succeeded(system: System, total: int, limit_s: float = 600) -> float:
    """Seconds until `total` tasks of this app have succeeded."""
    started = time.monotonic()
    while await _succeeded(system) < total:
        if time.monotonic() - started > limit_s:
            raise TimeoutError(f"not {total} tasks done in {limit_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _latencies_ms(
    system: System, ids: list[str], since: str = "created_at", until: str = "finished_at"
) -> list[float]:
    r = aioredis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"{system.env['APP_ID']}:{{tasks}}:task:"
    try:
        async with r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hmget(prefix + task_id, [since, until])
            rows = await pipe.execute()
    finally:
        await r.aclose()
    return [float(end) - float(start) for start, end in rows]


async def _produce_paced(system: System, tasks: list[Task], rate: float) -> float:
    """At `rate` tasks a second, in 10 ms steps; each stamped as it is sent."""
    producer = AIOKafkaProducer(bootstrap_servers=system.broker.bootstrap, linger_ms=1)
    await producer.start()
    topic, step = system.env["TOPIC_TASKS"], 0.01
    per_step = max(1, round(rate * step))
    started = time.monotonic()
    try:
        for n, first in enumerate(range(0, len(tasks), per_step)):
            await asyncio.sleep(max(0.0, started + n * step - time.monotonic()))
            for task in tasks[first : first + per_step]:
                task.submitted_at = int(time.time() * 1000)
                await producer.send(topic, task.SerializeToString(), key=task.task_id.encode())
        await producer.flush()
    finally:
        await producer.stop()
    return time.monotonic() - started


async def paced(system: System, rate: float, seconds: float) -> dict[str, Any]:
    """No-op tasks at a steady `rate`: how long from submit until a task starts."""
    count = int(rate * seconds)
    tasks = _tasks(count, Priority.PRIORITY_NORMAL, "paced")
    base = await _succeeded(system)
    system.cpu.start()
    produce_s, _ = await asyncio.gather(
        _produce_paced(system, tasks, rate), _until_succeeded(system, base + count)
    )
    cpu = system.cpu.split()
    ids = [t.task_id for t in tasks]
    submitted = {t.task_id: t.submitted_at for t in tasks}
    r = aioredis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"{system.env['APP_ID']}:{{tasks}}:task:"
    try:
        async with r.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(prefix + task_id, "started_at")
            started = await pipe.execute()
    finally:
        await r.aclose()
    start_ms = [float(at) - submitted[task_id] for task_id, at in zip(ids, started, strict=True)]
    return {
        "rate_per_s": rate,
        "tasks": count,
        "achieved_per_s": round(count / produce_s),
        "submit_to_start_ms_p50": pct(start_ms, 0.5),
        "submit_to_start_ms_p99": pct(start_ms, 0.99),
        "submit_to_start_ms_max": max(start_ms),
        "cpu": cpu,
    }


def _tasks(count: int, priority: int, tag: str) -> list[Task]:
    run = uuid.uuid4().hex[:6]
    return [
        Task(task_id=f"{tag}-{run}-{i}", task_type="noop", priority=priority)  # type: ignore[arg-type]
        for i in range(count)
    ]


async def noop_tasks(system: System, count: int) -> dict[str, Any]:
    """`count` no-op tasks as fast as the worker takes them: submit topic to succeeded."""
    tasks = _tasks(count, Priority.PRIORITY_NORMAL, "noop")
    base = await _succeeded(system)
    system.cpu.start()
    produce_s, done_s = await asyncio.gather(
        _produce(system, tasks), _until_succeeded(system, base + count)
    )
    cpu = system.cpu.split()
    latencies = await _latencies_ms(system, [t.task_id for t in tasks])
    worker = system.workers[0]
    assert worker.proc is not None
    return {
        "tasks": count,
        "tasks_per_s": round(count / done_s),
        "produce_s": round(produce_s, 2),
        "last_succeeded_s": round(done_s, 2),
        "intake_to_end_ms_p50": pct(latencies, 0.5),
        "intake_to_end_ms_p99": pct(latencies, 0.99),
        "worker_rss_mb": rss_mb(worker.proc.pid),
        "cpu": cpu,
    }


async def priority(system: System, low: int, high: int) -> dict[str, Any]:
    """A backlog of `low` low-priority tasks, then `high` high-priority ones once a tenth
    of the backlog has run: how long each waited, intake to end of run."""
    lows, highs = (
        _tasks(low, Priority.PRIORITY_LOW, "low"),
        _tasks(high, Priority.PRIORITY_HIGH, "high"),
    )
    base = await _succeeded(system)
    system.cpu.start()
    started = time.monotonic()
    await _produce(system, lows)
    await _until_succeeded(system, base + low // 10)
    highs_at = time.monotonic() - started
    await _produce(system, highs)
    # The highs are done when every one of them is: their own states, a hundred reads.
    r = aioredis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"{system.env['APP_ID']}:{{tasks}}:task:"
    while True:
        async with r.pipeline(transaction=False) as pipe:
            for task in highs:
                pipe.hget(prefix + task.task_id, "state")
            if all(state == "succeeded" for state in await pipe.execute()):
                break
        await asyncio.sleep(0.02)
    await r.aclose()
    high_done = time.monotonic() - started
    await _until_succeeded(system, base + low + high)
    low_done = time.monotonic() - started
    cpu = system.cpu.split()
    high_ms = await _latencies_ms(system, [t.task_id for t in highs])
    low_ms = await _latencies_ms(system, [t.task_id for t in lows])
    return {
        "low_tasks": low,
        "high_tasks": high,
        "highs_submitted_at_s": round(highs_at, 2),
        "last_high_succeeded_s": round(high_done, 2),
        "last_low_succeeded_s": round(low_done, 2),
        "high_ms_p50": pct(high_ms, 0.5),
        "high_ms_p99": pct(high_ms, 0.99),
        "low_ms_p50": pct(low_ms, 0.5),
        "low_ms_p99": pct(low_ms, 0.99),
        "cpu": cpu,
    }
