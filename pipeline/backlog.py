"""How much a topic holds and how far its consumer group is behind, asked of the broker.

Through a consumer's ListOffsets and OffsetFetch rather than the admin client's
ListConsumerGroupOffsets, which Tansu answers in a form aiokafka cannot read: a consumer
is what both Kafka and Tansu serve alike. The committed offsets are the group's, so the
answer covers every worker, whichever one asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


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
    cluster = await consumer._client.fetch_all_metadata()
    return {topic: sorted(cluster.partitions_for_topic(topic) or ()) for topic in topics}
