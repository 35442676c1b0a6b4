"""`dlq-list` and `dlq-replay`: look into a dead-letter topic, send records back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from faust.cli import option

from pipeline.dlq import H_ERROR, H_REASON, H_TOPIC, dlq_topic
from settings import Settings


async def read_all(bootstrap_servers: list[str] | str, topic: str, limit: int) -> list[Any]:
    """Every record of `topic` from the start, without joining a consumer group."""
    # Fetches answer within 50 ms: "quiet" below means several empty fetches in a row,
    # not one fetch still held by the broker (aiokafka's default wait, 500 ms, outlasts
    # a 300 ms poll: two polls could end empty-handed with records on their way).
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[Any] = []
        # Read until the topic has been quiet for a moment rather than up to end_offsets():
        # Tansu's ListOffsets(latest) undercounts topics written in multi-record batches.
        quiet = 0
        while len(records) < limit and quiet < 3:
            batch = await consumer.getmany(timeout_ms=300, max_records=limit - len(records))
            quiet = 0 if batch else quiet + 1
            for rs in batch.values():
                records.extend(rs)
        return records[:limit]
    finally:
        # A group-less aiokafka consumer stopped before its background task ever ran
        # (a topic that does not exist returns at once) raises CancelledError from stop().
        await asyncio.sleep(0)
        await consumer.stop()


def describe(record: Any) -> dict[str, Any]:
    headers = {k: v.decode(errors="replace") for k, v in record.headers or ()}
    return {
        "partition": record.partition,
        "offset": record.offset,
        "reason": headers.get(H_REASON),
        "error": headers.get(H_ERROR),
        "source": headers.get(H_TOPIC),
        "bytes": len(record.value or b""),
    }


def register(app: Any, settings: Settings) -> None:
    @app.command(
        option("--topic", default=settings.topic_push_events, help="source topic"),
        option("--limit", type=int, default=100),
    )
    async def dlq_list(self: Any, topic: str, limit: int) -> None:
        """List what `<topic>.dlq` holds, with the reason of each record."""
        for record in await read_all(settings.bootstrap_servers, dlq_topic(topic), limit):
            print(json.dumps(describe(record)))

    @app.command(
        option("--topic", default=settings.topic_push_events, help="source topic"),
        option("--limit", type=int, default=1000),
        option("--reason", default="", help="only records dead-lettered for this reason"),
    )
    async def dlq_replay(self: Any, topic: str, limit: int, reason: str) -> None:
        """Send dead-lettered records back to their source topic (after a fix)."""
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        sent = 0
        try:
            for record in await read_all(settings.bootstrap_servers, dlq_topic(topic), limit):
                if reason and describe(record)["reason"] != reason:
                    continue
                await producer.send_and_wait(topic, record.value, key=record.key)
                sent += 1
        finally:
            await producer.stop()
        print(json.dumps({"replayed": sent, "to": topic}))
