"""Periodic tasks (one per period however many submit it) and the stats report, against
the real broker and Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from resonance_task.commands.dlq import read_all
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.backlog import end_offsets
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from resonance_task.tasks.periodic import Periodic, PeriodicTasks
from resonance_task.tasks.reports import ReportBusy, StatsReport, StatsTable, period_key
from resonance_task.tasks.status import TaskStatuses


async def test_a_period_task_is_submitted_once_and_named_after_its_period() -> None:
    submitted: list[Task] = []

    async def submit(tasks: Sequence[Task]) -> list[tuple[str, str]]:
        submitted.extend(tasks)
        return [("new", "queued")] * len(tasks)

    periodic = PeriodicTasks(
        [Periodic("stats_report", 3600), Periodic("inbox_archive", 600), Periodic("off", 0)],
        submit,
    )
    hour = 1_796_310_000  # a whole hour, in seconds
    assert periodic.tick_seconds == 30.0
    assert sorted(await periodic.tick(hour + 5)) == [
        f"inbox_archive-{hour * 1000}",
        f"stats_report-{hour * 1000}",
    ]
    assert await periodic.tick(hour + 500) == []  # same periods: nothing again
    assert await periodic.tick(hour + 601) == [f"inbox_archive-{(hour + 600) * 1000}"]
    report = next(t for t in submitted if t.task_type == "stats_report")
    assert report.idempotency_key == report.task_id and report.priority == Priority.PRIORITY_LOW
    assert json.loads(report.payload) == {
        "period_start": (hour - 3600) * 1000,
        "period_end": hour * 1000,
    }


class _Ctx:
    task_id = "t"
    attempt = 1
    cancelled = False
    payload: Any = None  # not checked by a runner: the processor checks it itself

    async def progress(self, percent: float, note: str = "") -> None:
        pass


async def test_stats_report_counts_records_since_the_last_report(
    broker: EmbeddedBroker, redis_url: str, tag: str
) -> None:
    events, dead = f"{tag}-events", f"{tag}-events-dlq"
    stats_topic = f"{tag}-stats"
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    statuses = TaskStatuses(redis_url, f"test-{uuid.uuid4().hex[:8]}")
    await producer.start()
    await consumer.start()

    async def produce(topic: str, n: int) -> None:
        # One record a request: Tansu's end offset is exact only for single-record batches.
        for i in range(n):
            await producer.send_and_wait(topic, b"x", key=str(i).encode())

    async def publish(key: bytes | None, value: bytes, partition: int | None) -> Any:
        return await producer.send(stats_topic, value, key=key, partition=partition)

    async def offsets(topics: list[str]) -> dict[tuple[str, int], int]:
        return await end_offsets(consumer, topics)

    report = StatsReport(
        topics={"push_events": [events], "dead_letters": [dead], "absent": [f"{tag}-none"]},
        end_offsets=offsets,
        statuses=statuses,
        publish=publish,
    )

    def task(start: int) -> Task:
        period = {"period_start": start, "period_end": start + 3_600_000}
        return Task(
            task_id=f"r{start}", task_type="stats_report", payload=json.dumps(period).encode()
        )

    try:
        await produce(events, 7)
        await produce(dead, 2)
        # Another report counting: this one waits for a retry rather than count twice.
        await statuses.redis.set(f"{statuses.prefix}stats:lock", "other-report")
        with pytest.raises(ReportBusy):
            await report.run(task(1_796_306_400_000), _Ctx())
        await statuses.redis.delete(f"{statuses.prefix}stats:lock")
        first = await report.run(task(1_796_306_400_000), _Ctx())
        assert first["from"] is None  # the first report counts from the topics' start
        assert first["records"] == {"push_events": 7, "dead_letters": 2, "absent": 0}
        assert set(first["tasks"]) == {"succeeded", "failed", "dead", "cancelled"}
        await produce(events, 5)
        second = await report.run(task(1_796_310_000_000), _Ctx())
        assert second["from"] == first["to"]
        assert second["records"] == {"push_events": 5, "dead_letters": 0, "absent": 0}
        # The same period run again (its first run's end was never recorded): the same
        # report, not a recount of the seconds since.
        await produce(events, 1)
        assert await report.run(task(1_796_310_000_000), _Ctx()) == second

        table = StatsTable()
        for record in await read_all(broker.bootstrap, stats_topic, 100):
            table.apply(record)
        latest = table.latest(10)
        assert [r["period"] for r in latest] == [
            period_key(1_796_310_000_000),
            period_key(1_796_306_400_000),
        ]
        assert latest[0]["period"] == "2026-12-03T15:00:00Z"
        assert latest[0]["records"]["push_events"] == 5
    finally:
        await producer.stop()
        await consumer.stop()
        await statuses.close()


async def test_bad_payloads_fail_for_good_not_retried(redis_url: str) -> None:
    """A permanent error: the runner dead-letters the task at once (tests/e2e/test_tasks)."""
    from resonance_task.tasks.builtins import InboxArchiveTask
    from resonance_task.tasks.registry import PermanentError

    statuses = TaskStatuses(redis_url, f"test-{uuid.uuid4().hex[:8]}")

    async def unused(*args: Any) -> Any:
        raise AssertionError("nothing is counted or published for a bad payload")

    report = StatsReport(topics={}, end_offsets=unused, statuses=statuses, publish=unused)
    try:
        for payload in (
            b"nope",
            b'{"period_start": "5"}',
            b'{"period_start": 9, "period_end": 1}',
            b'{"period": 5}',
        ):
            bad = Task(task_id="r", task_type="stats_report", payload=payload)
            with pytest.raises(PermanentError, match="payload"):
                await report.run(bad, _Ctx())
    finally:
        await statuses.close()
    archive = InboxArchiveTask(archive=None)  # type: ignore[arg-type]
    for payload in (b"[1]", b'{"users": "u1"}', b'{"users": [""]}', b'{"user": ["u1"]}'):
        with pytest.raises(PermanentError, match="payload"):
            await archive.run(Task(task_id="a", task_type="inbox_archive", payload=payload), _Ctx())
