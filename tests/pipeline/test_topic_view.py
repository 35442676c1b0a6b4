"""TopicView against the real broker: every partition, no group, caught up when it says so."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.topic_view import TopicView
from tests.kafka import make_topic, produce, until, view_of


async def wait(view: TopicView, seconds: float = 20) -> None:
    await until(lambda: view.caught_up, seconds)


async def test_reads_every_partition_and_says_when_it_caught_up(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic = f"{tag}.view"
    await make_topic(broker, topic)
    # Many records per producer batch: caught up must not stop at a batch's first offset.
    await produce(broker, topic, [(i % 4, f"r{i}".encode()) for i in range(2000)])
    seen: list[bytes] = []
    for _ in range(2):  # two views: two workers, each with the whole topic
        view = view_of(broker, topic, lambda r: seen.append(r.value))
        await view.start()
        try:
            await wait(view)
            assert view.records == 2000
        finally:
            await view.stop()
    assert sorted(seen) == sorted(2 * [f"r{i}".encode() for i in range(2000)])


async def test_an_empty_topic_is_caught_up_and_later_records_arrive(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic = f"{tag}.empty"
    await make_topic(broker, topic)
    seen: list[Any] = []
    view = view_of(broker, topic, seen.append)
    await view.start()
    try:
        await wait(view)
        await produce(broker, topic, [(3, b"late")])
        await until(lambda: bool(seen), 10)
        assert [r.value for r in seen] == [b"late"]
    finally:
        await view.stop()


async def test_a_topic_created_after_the_view_started(broker: EmbeddedBroker, tag: str) -> None:
    topic = f"{tag}.later"
    seen: list[Any] = []
    view = view_of(broker, topic, seen.append)
    await view.start()
    try:
        await asyncio.sleep(0.3)
        assert not view.caught_up
        await make_topic(broker, topic)
        await produce(broker, topic, [(0, b"a"), (1, b"b")])
        await wait(view)
        await until(lambda: len(seen) >= 2, 10)
        assert sorted(r.value for r in seen) == [b"a", b"b"]
    finally:
        await view.stop()


async def test_lookback_skips_what_is_too_old_to_matter(broker: EmbeddedBroker, tag: str) -> None:
    topic = f"{tag}.lookback"
    await make_topic(broker, topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        old = int((time.time() - 3600) * 1000)
        await producer.send_and_wait(topic, b"an hour ago", partition=0, timestamp_ms=old)
        await producer.send_and_wait(topic, b"now", partition=0)
    finally:
        await producer.stop()
    seen: list[bytes] = []
    view = view_of(broker, topic, lambda r: seen.append(r.value), lookback_seconds=60)
    await view.start()
    try:
        await wait(view)
        assert seen == [b"now"]
    finally:
        await view.stop()


async def test_a_failing_consumer_is_replaced_where_the_view_stood(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic = f"{tag}.flaky"
    await make_topic(broker, topic)
    await produce(broker, topic, [(i % 4, f"a{i}".encode()) for i in range(100)])
    seen: list[bytes] = []
    view = view_of(broker, topic, lambda r: seen.append(r.value))
    await view.start()
    try:
        await wait(view)
        broken = view._consumer
        assert broken is not None

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the fetch broke")

        broken.getmany = fail
        await until(lambda: view.restarts >= 1 and view._consumer is not broken)
        await produce(broker, topic, [(i % 4, f"b{i}".encode()) for i in range(100)])
        # Last on every partition: once all four are read, so is whatever came before.
        ends = [f"end{p}".encode() for p in range(4)]
        await produce(broker, topic, list(enumerate(ends)))
        await until(lambda: set(ends) <= set(seen))
        seen = [value for value in seen if value not in ends]
        assert view.alive
        # Nothing read twice, nothing skipped: the new consumer starts at the old position.
        assert sorted(seen) == sorted(
            [f"a{i}".encode() for i in range(100)] + [f"b{i}".encode() for i in range(100)]
        )
    finally:
        await view.stop()
    assert not view.alive
