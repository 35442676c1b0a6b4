"""Slots by priority: high first, low never starved."""

from __future__ import annotations

import asyncio

from resonance_task.proto.resonance.task.v1.task_pb2 import Priority
from resonance_task.tasks.scheduler import Scheduler

HIGH, NORMAL, LOW = Priority.PRIORITY_HIGH, Priority.PRIORITY_NORMAL, Priority.PRIORITY_LOW


async def test_high_overtakes_a_low_backlog_and_low_still_moves() -> None:
    scheduler = Scheduler(concurrency=2)
    order: list[str] = []

    def job(name: str):  # type: ignore[no-untyped-def]
        async def run() -> str:
            order.append(name)
            await asyncio.sleep(0)
            return name

        return run

    futures = [scheduler.submit(LOW, job(f"low-{i}")) for i in range(200)]
    futures += [scheduler.submit(HIGH, job(f"high-{i}")) for i in range(20)]
    await asyncio.gather(*futures)
    # Two low ones had the slots before the high ones came; then 6 high for 1 low.
    highs = [i for i, name in enumerate(order) if name.startswith("high")]
    assert max(highs) < 2 + 20 + 20 // 6 + 1, order[:30]
    lows_among_first = sum(1 for name in order[: max(highs) + 1] if name.startswith("low"))
    assert lows_among_first >= 3  # not starved while high had work
    assert len(order) == 220


async def test_concurrency_is_a_bound() -> None:
    scheduler = Scheduler(concurrency=3)
    running = peak = 0

    async def run() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1

    await asyncio.gather(*(scheduler.submit(NORMAL, run) for _ in range(30)))
    assert peak == 3 and scheduler.running == 0


async def test_a_failing_job_fails_its_future_only() -> None:
    scheduler = Scheduler(concurrency=1)

    async def boom() -> None:
        raise RuntimeError("boom")

    async def fine() -> str:
        return "fine"

    failed = scheduler.submit(NORMAL, boom)
    ok = scheduler.submit(NORMAL, fine)
    assert await ok == "fine"
    assert isinstance(failed.exception(), RuntimeError)


async def test_a_slot_is_idle_only_while_free_and_nothing_waits() -> None:
    scheduler = Scheduler(concurrency=1)
    assert scheduler.idle_slot
    release = asyncio.Event()

    async def held() -> None:
        await release.wait()

    first = scheduler.submit(LOW, held)
    assert not scheduler.idle_slot  # its one slot is taken
    second = scheduler.submit(HIGH, held)
    release.set()
    await first
    # The slot came free, and went to the waiting job at once: still not idle.
    assert not scheduler.idle_slot
    await second
    assert scheduler.idle_slot
