"""A stage with a consumer group of its own inside the worker, for isolation.

A Faust app is one consumer group, and its conductor stops feeding every agent when one
agent's buffer is full: a stage that may be slow for long (a stalled inbox store, a
rate-limited push provider) would hold back the whole pipeline. Such a stage reads its
topic through its own aiokafka consumer instead: its fetches, offsets and backpressure
are its own. Records come in batches; offsets are committed only after `handle`
returned for the batch, at most every COMMIT_INTERVAL (and whenever the topic is idle).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service
from prometheus_client import Gauge

from pipeline.dlq import SourceRecord

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.5  # seconds: a commit per fetch cost more broker work than the writes

Records = list[ConsumerRecord[Any, Any]]


def source_record(record: ConsumerRecord[Any, Any]) -> SourceRecord:
    return SourceRecord(record.topic, record.partition, record.offset, record.key, record.value)


class GroupConsumer(Service):
    def __init__(
        self,
        *,
        topic: str,
        consumer_config: dict[str, Any],
        batch_max_records: int,
        lag_gauge: Gauge,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._topic = topic
        self._before_commit = before_commit
        self._consumer_config = consumer_config
        self._batch_max = batch_max_records
        self._lag = lag_gauge
        self._consumer: AIOKafkaConsumer | None = None
        super().__init__(**kwargs)

    async def handle(self, records: Records) -> None:
        """Take a batch to its effect; raising stops the stage (retry inside instead)."""
        raise NotImplementedError

    @property
    def assigned(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment()) if self._consumer else []

    async def on_start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self._topic,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **self._consumer_config,
        )
        await self._consumer.start()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    @Service.task
    async def _consume(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        # Anything handled but not committed when a worker dies is handled again by the
        # next owner: handlers are idempotent, or say what they repeat.
        done: dict[TopicPartition, int] = {}
        last_commit = time.monotonic()
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=200, max_records=self._batch_max)
            if fetched:
                await self.handle([r for records in fetched.values() for r in records])
                done.update({tp: rs[-1].offset + 1 for tp, rs in fetched.items()})
            if done and (not fetched or time.monotonic() - last_commit >= COMMIT_INTERVAL):
                await self._commit(consumer, done)
                done = {}
                last_commit = time.monotonic()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        # Only partitions still ours: a rebalance may have taken some since they were handled.
        owned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return
        if self._before_commit is not None:
            # What handling sent elsewhere (dead letters) is out before the offsets say done.
            await self._before_commit()
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            log.info("%s: commit skipped after a rebalance: %s", self._topic, exc)
        for tp, offset in offsets.items():
            try:
                highwater = consumer.highwater(tp)
            except KafkaError:
                continue
            if highwater is not None:
                self._lag.labels(str(tp.partition)).set(max(0, highwater - offset))
