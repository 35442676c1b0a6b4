"""How much a topic holds and how far its consumer group is behind, asked of the broker.

Through a consumer's ListOffsets and OffsetFetch rather than the admin client's
ListConsumerGroupOffsets, which Tansu answers in a form aiokafka cannot read: a consumer
is what both Kafka and Tansu serve alike. The committed offsets are the group's, so the
answer covers every worker, whichever one asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from resonance_task import compat


async def backlog(
    consumer: AIOKafkaConsumer, topic: str, partitions: Iterable[int], *, group: str | None
) -> dict[str, Any]:
    """{topic, group, partitions, depth (records held), lag (records the group has not
    done; None without a group)}. `consumer` must belong to `group` when one is named."""
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    if not tps:
        return {"topic": topic, "group": group, "partitions": 0, "depth": 0, "lag": None}
    begin, end = await asyncio.gather(consumer.beginning_offsets(tps), consumer.end_offsets(tps))
    depth = sum(max(0, end[tp] - begin[tp]) for tp in tps)
    lag: int | None = None
    if group is not None:
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        # Nothing committed yet: the group starts at the earliest record (auto_offset_reset).
        lag = sum(
            max(0, end[tp] - max(begin[tp], done if done is not None else 0))
            for tp, done in zip(tps, committed, strict=True)
        )
    return {"topic": topic, "group": group, "partitions": len(tps), "depth": depth, "lag": lag}


async def end_offsets(
    consumer: AIOKafkaConsumer, topics: Iterable[str]
) -> dict[tuple[str, int], int]:
    """Each partition's end offset, of every partition the broker lists for `topics`
    (a topic it does not know has none)."""
    tps = [
        TopicPartition(topic, partition)
        for topic, partitions in (await partitions_of(consumer, topics)).items()
        for partition in partitions
    ]
    if not tps:
        return {}
    ends = await consumer.end_offsets(tps)
    return {(tp.topic, tp.partition): int(offset) for tp, offset in ends.items()}


async def partitions_of(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> dict[str, list[int]]:
    """The partitions the broker lists for each of `topics` (none for one it does not know)."""
    # Metadata of all topics, not only those this consumer reads: the client's own view
    # holds only its subscriptions.
    cluster = await compat.cluster_metadata(consumer)
    return {topic: sorted(cluster.partitions_for_topic(topic) or ()) for topic in topics}


ENDS_TIMEOUT = 10.0  # seconds for every partition asked to answer a fetch


class OffsetProbe(Service):
    """Where topics end, and how far other consumer groups have committed, asked fresh.

    What a fence (pipeline/fence.py) and a stage taking partitions over need: not the
    end a consumer last saw, but the end now. Tansu's ListOffsets(latest) answers the
    first offset of the last batch + 1 (DESIGN.md section 6), so an end is the high
    watermark of a fetch sent after the question, right on both brokers. The committed
    offsets are read through a consumer of each group that never joins it.
    """

    def __init__(self, consumer_config: dict[str, Any], **kwargs: Any) -> None:
        self._config = {k: v for k, v in consumer_config.items() if k != "group_id"}
        # A fetch at a partition's end waits this long on Kafka, which answers when it is
        # full or due; Tansu always waits it out.
        self._config["fetch_max_wait_ms"] = 10
        self._ends: AIOKafkaConsumer | None = None
        self._ends_lock = asyncio.Lock()
        self._groups: dict[str, AIOKafkaConsumer] = {}
        super().__init__(**kwargs)

    async def on_stop(self) -> None:
        consumers = [*self._groups.values(), *([self._ends] if self._ends else [])]
        self._groups, self._ends = {}, None
        for consumer in consumers:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _consumer(self, group: str | None) -> AIOKafkaConsumer:
        existing = self._ends if group is None else self._groups.get(group)
        if existing is not None:
            return existing
        consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **self._config)
        await consumer.start()
        if group is None:
            self._ends = consumer
        else:
            self._groups[group] = consumer
        return consumer

    async def partitions(self, topic: str) -> list[int]:
        consumer = await self._consumer(None)
        return (await partitions_of(consumer, [topic]))[topic]

    async def ends(self, topic: str, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Each partition's end as of a fetch answered after this call."""
        async with self._ends_lock:
            consumer = await self._consumer(None)
            wanted = sorted(partitions) if partitions is not None else None
            if wanted is None:
                wanted = (await partitions_of(consumer, [topic]))[topic]
            tps = [TopicPartition(topic, p) for p in wanted]
            if not tps:
                return {}
            # A new assignment forgets every high watermark the consumer knew.
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)  # at or below the end: little to fetch
            deadline = time.monotonic() + ENDS_TIMEOUT
            while any(consumer.highwater(tp) is None for tp in tps):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{topic}: no fetch answered in {ENDS_TIMEOUT:g}s")
                await consumer.getmany(*tps, timeout_ms=50, max_records=1)
            return {tp.partition: int(consumer.highwater(tp)) for tp in tps}

    async def committed(self, group: str, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """What `group` has committed of each partition (0 where nothing yet)."""
        consumer = await self._consumer(group)
        tps = [TopicPartition(topic, p) for p in partitions]
        found = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return {tp.partition: int(o or 0) for tp, o in zip(tps, found, strict=True)}

    async def beginnings(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        async with self._ends_lock:
            consumer = await self._consumer(None)
            tps = [TopicPartition(topic, p) for p in partitions]
            begins = await consumer.beginning_offsets(tps)
            return {tp.partition: int(o) for tp, o in begins.items()}
