"""Faults: a stalled inbox store, a worker killed with SIGKILL mid-load, readiness."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable

import pytest

from commands.traffic import single_chat
from embedded.expectations import expected, received
from embedded.worker import WorkerProcess
from tests.harness import Pipeline, eventually


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


async def test_sigkill_mid_load_loses_and_duplicates_no_inbox_entry(pipeline: Pipeline) -> None:
    p = pipeline
    first = await p.start_worker("worker-1")
    users = [p.user(i) for i in range(40)]
    online = users[:30]
    sims = [await p.gateway("gw-k1", online[:15]), await p.gateway("gw-k2", online[15:])]
    await p.wait_online(first, online)

    rng = random.Random(5)
    seqs: dict[str, int] = {}
    events = []
    for i in range(4000):
        sender, recipient = rng.sample(users, 2)
        event = single_chat(sender, recipient, 0, f"load {i}")
        seqs[event.session_id] = seqs.get(event.session_id, 0) + 1
        event.seq_id = seqs[event.session_id]
        events.append(event)
    want = expected(events, {}, set(online))

    async def inbox_total() -> int:
        return sum([len(await p.inbox(u)) for u in users])

    async def produce() -> None:
        for start in range(0, len(events), 50):
            await p.publish(events[start : start + 50])
            await asyncio.sleep(0.1)  # ~500 events/s: the load outlasts the kill

    producing = asyncio.create_task(produce())
    await eventually(
        lambda: _at_least(inbox_total(), want.inbox_total // 4), 60, "a quarter of the inbox"
    )
    await asyncio.sleep(3)  # past Faust's commit interval: offsets have been committed
    await asyncio.to_thread(first.kill)
    killed_at = await inbox_total()
    assert killed_at < want.inbox_total, "the kill should land mid-load"

    statuses: list[int] = []
    second = WorkerProcess(p.env, p.workdir, "worker-2").start()
    p.workers.append(second)
    await asyncio.to_thread(_watch_ready, second, statuses)
    await producing

    await eventually(lambda: _at_least(inbox_total(), want.inbox_total), 120, "every inbox entry")
    await asyncio.sleep(2)
    for user in users:
        entries = await p.inbox(user)
        assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
        assert [e.cursor for e in entries] == list(range(1, len(entries) + 1)), user

    # /ready said 503 until the new worker had its partitions and recovered tables.
    assert 503 in statuses and statuses[-1] == 200
    assert statuses.index(200) > statuses.index(503)

    # Routes survived in the changelog: users online before the kill are still pushed to.
    after = [single_chat(users[39], u, 10_000, "after restart") for u in online]
    await p.publish(after)

    async def all_pushed() -> bool:
        got = received(sims)
        return all(got[e.to_username][e.msg_id] for e in after)

    await eventually(all_pushed, 30, "pushes after the restart")


def _watch_ready(worker: WorkerProcess, statuses: list[int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _ = worker.get("/ready", timeout=1)
        except OSError:
            time.sleep(0.05)
            continue
        statuses.append(status)
        if status == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(worker.log_tail())


async def _at_least(total: Awaitable[int], want: int) -> bool:
    return await total >= want


async def _true(value: bool) -> bool:
    return value


async def test_a_slow_gateway_does_not_delay_the_others(pipeline: Pipeline) -> None:
    p = pipeline
    worker = await p.start_worker()
    fast_users = [p.user(i) for i in range(20)]
    slow_users = [p.user(i) for i in range(20, 40)]
    fast = await p.gateway("gw-fast", fast_users)
    slow = await p.gateway("gw-slow", slow_users, delay=2.0)  # acks each batch after 2 s
    await p.wait_online(worker, fast_users + slow_users)
    events = []
    for i in range(300):
        to = (slow_users if i % 2 else fast_users)[i % 20]
        event = single_chat(p.user(100 + i % 7), to, 1 + i, f"m{i}")
        events.append(event)
    for start in range(0, len(events), 30):
        chunk = events[start : start + 30]
        for event in chunk:
            event.timestamp = int(time.time() * 1000)  # latency counts from the publish
        await p.publish(chunk)
        await asyncio.sleep(0.1)
    await eventually(lambda: _true(len(fast.recorder.deliveries) >= 150), 30, "the fast gateway")
    latencies = sorted(r.latency_ms for r in fast.recorder.deliveries)
    assert latencies[int(len(latencies) * 0.99)] < 1000, latencies[-10:]
    # The slow gateway gets its pushes too, late (or its users go to offline push).
    await eventually(lambda: _true(len(slow.recorder.deliveries) >= 150), 60, "the slow gateway")
