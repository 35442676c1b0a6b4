"""storage: deliveries -> inboxes, in a consumer group of its own.

Storage reads the same deliveries topic as route, but through its own aiokafka consumer
in the group `<APP_ID>-storage`: its fetches, its offsets and its backpressure are its
own, so a stalled inbox store never holds back online pushes (and a slow gateway never
holds back inbox writes). Records are taken in batches and written as one Redis pipeline;
offsets are committed only after the store acknowledged the whole batch. While the store
is failing, the batch is retried with backoff and nothing more is fetched: Kafka is the
buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from google.protobuf.message import DecodeError
from mode import Service

from pipeline import metrics
from pipeline.dlq import DeadLetters, SourceRecord
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery
from stores.inbox import InboxStore

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.5  # seconds


class StorageConsumer(Service):
    def __init__(
        self,
        *,
        topic: str,
        inbox: InboxStore,
        dead_letters: DeadLetters,
        consumer_config: dict[str, Any],
        batch_max_records: int,
        retry_max_seconds: float,
        **kwargs: Any,
    ) -> None:
        self._topic = topic
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._consumer_config = consumer_config
        self._batch_max = batch_max_records
        self._retry_max = retry_max_seconds
        self._consumer: AIOKafkaConsumer | None = None
        self.written_batches = 0
        self.new = 0
        self.duplicates = 0
        self.pending_since: float | None = None
        super().__init__(**kwargs)

    @property
    def assigned(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def stats(self) -> dict[str, Any]:
        return {
            "assigned": sorted(tp.partition for tp in self._consumer.assignment())
            if self._consumer
            else [],
            "batches_written": self.written_batches,
            "new": self.new,
            "duplicates": self.duplicates,
            # How long the batch in hand has waited for the store: >0 and growing = stalled.
            "write_pending_seconds": round(time.monotonic() - self.pending_since, 2)
            if self.pending_since
            else 0,
        }

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
        # Offsets of written batches, committed at most every COMMIT_INTERVAL: a commit per
        # fetch cost more broker work than the writes. Anything written but not committed
        # when a worker dies is written again by the next owner, idempotently.
        written: dict[TopicPartition, int] = {}
        last_commit = time.monotonic()
        while not self.should_stop:
            fetched = await consumer.getmany(timeout_ms=200, max_records=self._batch_max)
            if fetched:
                await self._store(fetched)
                written.update({tp: rs[-1].offset + 1 for tp, rs in fetched.items()})
            if written and (not fetched or time.monotonic() - last_commit >= COMMIT_INTERVAL):
                await self._commit(consumer, written)
                written = {}
                last_commit = time.monotonic()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        # Only partitions still ours: a rebalance may have taken some since they were written.
        owned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Partitions moved while we wrote: the new owner rewrites them, idempotently.
            log.info("storage commit skipped after rebalance: %s", exc)
        self._report_lag(consumer, offsets)

    async def _store(self, fetched: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
        batch: list[tuple[PushMessage, Sequence[str]]] = []
        for records in fetched.values():
            for record in records:
                try:
                    delivery = Delivery.FromString(record.value or b"")
                except DecodeError as exc:
                    await self._dead_letters.put(
                        SourceRecord(
                            record.topic, record.partition, record.offset, record.key, record.value
                        ),
                        "decode_error",
                        exc,
                    )
                    continue
                if not delivery.push_only:
                    batch.append((delivery.message, delivery.users))
        if not batch:
            return
        attempt = 0
        self.pending_since = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                result = await self._inbox.write(batch)
            except Exception as exc:  # any store error: retry; offsets stay where they are
                attempt += 1
                delay = min(self._retry_max, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning(
                    "inbox write failed (attempt %d), retrying in %.2fs: %r", attempt, delay, exc
                )
                await asyncio.sleep(delay)
                if self.should_stop:
                    raise asyncio.CancelledError() from exc
                continue
            self.pending_since = None
            metrics.STORAGE_DURATION.observe(time.monotonic() - started)
            metrics.INBOX_WRITES.labels("new").inc(result.new)
            metrics.INBOX_WRITES.labels("duplicate").inc(result.duplicate)
            self.written_batches += 1
            self.new += result.new
            self.duplicates += result.duplicate
            return

    def _report_lag(self, consumer: AIOKafkaConsumer, committed: dict[TopicPartition, int]) -> None:
        for tp, offset in committed.items():
            try:
                highwater = consumer.highwater(tp)
            except KafkaError:
                continue
            if highwater is not None:
                metrics.STORAGE_LAG.labels(str(tp.partition)).set(max(0, highwater - offset))
