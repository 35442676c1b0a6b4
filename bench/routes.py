"""A worker holding a million online routes: its memory, and how long it takes to load.

The routes changelog is filled as the routes stage would have left it after a million
users connected (one connection each, on 20 gateways), then a worker starts on it: its
view reads every route, and the fence (pipeline/fence.py) waits for it before ready.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.harness import CpuMeter, rss_mb
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import WorkerProcess, pipeline_env
from resonance_task.pipeline.partitioning import partition_for
from resonance_task.tables.routes import Connection, encode

PARTITIONS = 4


async def fill_changelog(broker: EmbeddedBroker, topic: str, count: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    t0 = time.monotonic()
    now = int(time.time() * 1000)
    last: dict[int, tuple[bytes, bytes]] = {}
    for i in range(count):
        user = f"route-user-{i:07d}"
        gateway = f"gateway-{i % 20:03d}"
        route = {f"{gateway}:{user}": Connection(gw=gateway, ts=now, on=True, pf="ios")}
        key, value = json.dumps(user).encode(), encode(route)
        partition = partition_for(user, PARTITIONS)
        if i >= count - PARTITIONS * 4 and partition not in last:
            last[partition] = (key, value)  # sent alone, below
            continue
        await producer.send(topic, value, key=key, partition=partition)
    await producer.flush()
    # Written alone, as they were when Faust's table wrote the changelog a record a batch
    # (Tansu's ListOffsets(latest) answers the last batch's first offset + 1); the view
    # and the fence read ends from fetches, right either way.
    for partition, (key, value) in last.items():
        await producer.send_and_wait(topic, value, key=key, partition=partition)
    await producer.stop()
    return time.monotonic() - t0


async def million_routes(
    broker: EmbeddedBroker, workdir: Path, redis_url: str, tag: str, count: int
) -> dict[str, Any]:
    env = pipeline_env(tag=tag, broker_url=broker.url, redis_url=redis_url, partitions=PARTITIONS)
    fill_s = await fill_changelog(broker, f"{env['APP_ID']}-routes-changelog", count)
    worker = WorkerProcess(env, workdir, "worker-routes").start()
    meter = CpuMeter()
    assert worker.proc is not None
    meter.watch("worker", worker.proc.pid)
    meter.watch("broker", broker.pid)
    meter.start()
    t0 = time.monotonic()
    try:
        await asyncio.to_thread(worker.wait_ready, 600)
        ready_s = time.monotonic() - t0
        _, stats = await asyncio.to_thread(worker.get, "/stats")
        await asyncio.sleep(2)  # let the allocator settle
        return {
            "routes": count,
            "changelog_fill_s": round(fill_s, 1),
            "worker_ready_s": round(ready_s, 1),
            "routes_in_view": stats["routes_known"],
            "online_users_in_view": stats["online_users"],
            "worker_rss_mb": rss_mb(worker.proc.pid),
            "cpu": meter.split(),
        }
    finally:
        await asyncio.to_thread(worker.stop)
