"""storage: deliveries -> inboxes, in a consumer group of its own.

Storage reads the deliveries topic fanout and large_group write, in the group
`<APP_ID>-storage` (pipeline/group_consumer.py), so a stalled inbox store never holds
back online pushes (and a slow gateway never holds back inbox writes). A fetched batch
is written as one store call; offsets are committed only after the store acknowledged
the whole batch. While the store is failing, the batch is retried with backoff and
nothing more is fetched: Kafka is the buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError

from pipeline import metrics
from pipeline.dlq import DeadLetters
from pipeline.group_consumer import GroupConsumer, Records, source_record
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch
from stores.inbox import InboxStore

log = logging.getLogger(__name__)


class StorageConsumer(GroupConsumer):
    def __init__(
        self,
        *,
        inbox: InboxStore,
        dead_letters: DeadLetters,
        retry_max_seconds: float,
        **kwargs: Any,
    ) -> None:
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._retry_max = retry_max_seconds
        self.written_batches = 0
        self.new = 0
        self.duplicates = 0
        self.pending_since: float | None = None
        super().__init__(stage="storage", **kwargs)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "batches_written": self.written_batches,
            "new": self.new,
            "duplicates": self.duplicates,
            # How long the batch in hand has waited for the store: >0 and growing = stalled.
            "write_pending_seconds": round(time.monotonic() - self.pending_since, 2)
            if self.pending_since
            else 0,
        }

    async def handle(self, records: Records) -> None:
        batch: list[tuple[PushMessage, Sequence[str]]] = []
        for record in records:
            try:
                deliveries = DeliveryBatch.FromString(record.value or b"").deliveries
            except DecodeError as exc:
                await self._dead_letters.put(source_record(record), "decode_error", exc)
                continue
            batch.extend((d.message, d.users) for d in deliveries if not d.push_only)
        if batch:
            await self._store(batch)

    async def _store(self, batch: list[tuple[PushMessage, Sequence[str]]]) -> None:
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
