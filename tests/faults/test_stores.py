"""Faults in the stores: an inbox store that stalls, Redis paused mid-load."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from resonance_task.commands.traffic import single_chat
from tests.faults.load import Load, users_online
from tests.harness import Pipeline, eventually


@pytest.fixture
def redis_url(private_redis: str) -> str:
    """This module pauses every client of its Redis: a redis-server of its own."""
    return private_redis


@pytest.fixture
async def stalled_redis() -> AsyncIterator[str]:
    """A 'Redis' that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"
    for writer in held:
        writer.close()
    server.close()


async def test_stalled_inbox_store_does_not_delay_pushes(
    pipeline_factory: object, stalled_redis: str
) -> None:
    p: Pipeline = pipeline_factory(inbox_redis_url=stalled_redis)  # type: ignore[operator]
    worker = await p.start_worker()
    users = [p.user(i) for i in range(10)]
    sim = await p.gateway("gw-iso", users)
    await p.wait_online(worker, users)
    events = []
    for i in range(30):
        event = single_chat(users[i % 10], users[(i + 3) % 10], 1 + i // 10, f"m{i}")
        events.append(event)
        await p.publish([event])
        await asyncio.sleep(0.05)
    await eventually(lambda: _true(len(sim.recorder.deliveries) >= 30), 15, "30 pushes")
    latencies = [r.latency_ms for r in sim.recorder.deliveries]
    assert max(latencies) < 1000, latencies
    _, stats = await asyncio.to_thread(worker.get, "/stats")
    assert stats["storage"]["batches_written"] == 0
    assert stats["storage"]["write_pending_seconds"] > 0
    assert [await p.inbox(u) for u in users] == [[]] * len(users)  # the real Redis got nothing


async def _true(value: bool) -> bool:
    return value


async def test_redis_paused_ten_seconds_mid_load_loses_nothing(
    pipeline: Pipeline, redis_client: Any
) -> None:
    p = pipeline
    worker = await p.start_worker()
    users, online = await users_online(p, worker, 100, online=60, gateways=2)

    load = Load(p, users, online, 20_000, rate=1_000).start()
    await load.until_published(0.25)
    # Every client but replicas waits, ours included: the worker's inbox writes and the
    # web API's reads alike.
    await redis_client.execute_command("CLIENT", "PAUSE", "10000", "ALL")
    paused_at = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - paused_at < 9:
        status, body = await asyncio.to_thread(worker.get, f"/inbox/{users[0]}", 5.0)
        statuses.append(status)
        if status != 200:
            assert status == 503 and "error" in body, (status, body)
    print(f"/inbox during the pause: {Counter(statuses)}")
    assert 503 in statuses and 500 not in statuses

    outcome = await load.check(seconds=120)
    print(f"Redis paused 10 s mid-load: {outcome}")
    status, _ = await asyncio.to_thread(worker.get, f"/inbox/{users[0]}")
    assert status == 200
