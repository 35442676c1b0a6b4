"""storage: deliveries -> inboxes, in a consumer group of its own.

Storage reads the deliveries topic fanout and large_group write, in the group
`<APP_ID>-storage` (stage/), so a stalled inbox store never holds
back online pushes (and a slow gateway never holds back inbox writes). A fetched batch
is written as one store call; offsets are committed only after the store acknowledged
the whole batch. While the store is away, the batch is retried with backoff and
nothing more is fetched: Kafka is the buffer. When the store refuses a recipient, that
recipient alone is dead-lettered, and the rest of the batch is written at once (see
`_store`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from opentelemetry.trace import Span

from resonance_task.errors import ATTEMPTS, is_transient, redis_reply
from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.pipeline.retry import retrying
from resonance_task.pipeline.trace import start_span
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import Delivery, DeliveryBatch
from resonance_task.stage import GroupConsumer, Records, StageOptions, source_record
from resonance_task.stores.inbox import InboxStore, Refusal

log = logging.getLogger(__name__)


class StorageConsumer(GroupConsumer):
    def __init__(
        self,
        options: StageOptions,
        *,
        inbox: InboxStore,
        dead_letters: DeadLetters,
        retry_max_seconds: float,
    ) -> None:
        self._inbox = inbox
        self._dead_letters = dead_letters
        self._retry_max = retry_max_seconds
        self.written_batches = 0
        self.new = 0
        self.duplicates = 0
        self.refused = 0
        self.pending_since: float | None = None
        super().__init__(options, stage="storage", dead_letters=dead_letters)

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "batches_written": self.written_batches,
            "new": self.new,
            "duplicates": self.duplicates,
            "refused": self.refused,
            # How long the batch in hand has waited for the store: >0 and growing = stalled.
            "write_pending_seconds": round(time.monotonic() - self.pending_since, 2)
            if self.pending_since
            else 0,
        }

    async def handle(self, records: Records) -> None:
        batch: list[_Entry] = []
        spans: list[Span] = []
        try:
            for record in records:
                source = source_record(record)
                batch_of = await self._dead_letters.decoded(source, DeliveryBatch.FromString)
                if batch_of is None:
                    continue
                for d in batch_of.deliveries:
                    if d.push_only:
                        continue
                    batch.append((source, d.message, d.users))
                    span = start_span("storage", d.trace_headers, d.message.msg_id)
                    if span is not None:
                        span.set_attribute("resonance.recipients", len(d.users))
                        spans.append(span)
            if not batch:
                return
            refused: list[tuple[_Entry, str]] = []
            self.pending_since = time.monotonic()
            try:
                await self._store(batch, refused)
            finally:
                self.pending_since = None
        finally:
            for span in spans:
                span.end()
        await self._dead_letter(refused)

    async def _store(self, batch: list[_Entry], refused: list[tuple[_Entry, str]]) -> None:
        """Write the batch; what the store refuses for good costs only its recipients.

        A key of the wrong type (something else wrote `inbox:{u}`) is a fact about one
        recipient: the store reports those pairs in the same call that wrote everyone
        else, and they are dead-lettered, neither retried nor bisected. Transient errors
        wait (pipeline.retry). Any other error the store cannot pin on a recipient
        (CROSSSLOT, a value the database refuses, a script error) is narrowed down by
        halving the batch, which is safe because every write is idempotent, until the
        (user, message) pairs that fail alone are found.
        """
        started = time.monotonic()
        pairs = [(message, users) for _, message, users in batch]
        single = len(batch) == 1 and len(batch[0][2]) == 1
        try:
            result = await retrying(
                lambda: self._inbox.write(pairs),
                "inbox write",
                attempts=ATTEMPTS if single else 1,
                until=lambda: self.should_stop,
                max_delay=self._retry_max,
            )
        except Exception as exc:
            if self.should_stop or is_transient(exc):
                raise asyncio.CancelledError() from exc  # stopping: not committed, redone
            if single:
                refused.append((batch[0], redis_reply(exc)))
                return
            for half in _halves(batch):
                await self._store(half, refused)
            return
        if result.refused:
            refused += _refused_entries(batch, result.refused)
        metrics.STORAGE_DURATION.observe(time.monotonic() - started)
        metrics.INBOX_WRITES.labels("new").inc(result.new)
        metrics.INBOX_WRITES.labels("duplicate").inc(result.duplicate)
        self.written_batches += 1
        self.new += result.new
        self.duplicates += result.duplicate

    async def _dead_letter(self, refused: list[tuple[_Entry, str]]) -> None:
        """One dead letter per source record, message and reason, with its refused users."""
        letters: dict[tuple[int, int, int, str], tuple[_Entry, str, list[str]]] = {}
        for entry, error in refused:
            source, message, users = entry
            key = (source.partition, source.offset, message.msg_id, refusal_reason(error))
            letters.setdefault(key, (entry, error, []))[2].extend(users)
        for (_, _, _, reason), ((source, message, _), error, users) in letters.items():
            metrics.INBOX_WRITES.labels("refused").inc(len(users))
            self.refused += len(users)
            value = DeliveryBatch(deliveries=[Delivery(message=message, users=users)])
            await self._dead_letters.put(
                replace(source, value=value.SerializeToString()),
                reason,
                f"{len(users)} recipient(s), first {users[0]!r}: {error[:300]}",
            )


_Entry = tuple[SourceRecord, PushMessage, Sequence[str]]


def _halves(batch: list[_Entry]) -> list[list[_Entry]]:
    """Two halves in order: by entries, or one entry's users when it is alone."""
    if len(batch) > 1:
        middle = len(batch) // 2
        return [batch[:middle], batch[middle:]]
    source, message, users = batch[0]
    middle = len(users) // 2
    return [[(source, message, users[:middle])], [(source, message, users[middle:])]]


def _refused_entries(batch: list[_Entry], refusals: Sequence[Refusal]) -> list[tuple[_Entry, str]]:
    """The store's refused pairs as the batch's entries holding them, one user each: a pair
    that two source records carry is dead-lettered with each, as each was read."""
    errors: dict[int, dict[str, str]] = {}
    for refusal in refusals:
        errors.setdefault(refusal.msg_id, {})[refusal.user] = refusal.error
    found: list[tuple[_Entry, str]] = []
    for source, message, users in batch:
        of_message = errors.get(message.msg_id)
        if of_message is not None:
            found += [
                ((source, message, [user]), of_message[user])
                for user in users
                if user in of_message
            ]
    return found


def refusal_reason(reply: str) -> str:
    """The dead-letter reason for a store's final no (its error reply): its code, in our words."""
    if reply.startswith("WRONGTYPE"):
        return "inbox_wrong_type"
    if reply.startswith("CROSSSLOT") or "same key slot" in reply:
        return "inbox_crossslot"
    return "inbox_refused"
