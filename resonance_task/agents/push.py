"""push: gateway-pushes records -> each gateway's persistent stream; offsets after its ack.

It reads gateway-pushes (keyed by gateway_id, so one worker owns each gateway's records
and its stream) in a consumer group of its own (`<APP_ID>-push`), a fetched batch at a
time. A record is done once every push it carried was acknowledged by its gateway or its
users were handed to offline push (and the broker has those records); only then does
its offset commit. Records settle independently: fetching goes on while gateways answer,
up to PUSH_PENDING_BYTES of records in hand.
A full gateway queue diverts to offline push instead of waiting, so a slow gateway never
holds up the others.

A push whose (gateway, msg_id, user) this partition already offered is not sent again:
a fanout (or large-group page) redone after its worker died writes its pushes a second
time, after the first copies, to the same partition (keyed by gateway). The memory of
what was offered is the last `dedupe_records` records of each partition; a worker taking
a partition fills it from the records before where it resumes, which are all settled.
The first copy settles the user either way (pushed, or handed to offline push).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Iterable

from aiokafka import TopicPartition
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span

from resonance_task.gateway.client import GatewayPool, PushItem, PushOutcome, position
from resonance_task.offline import records as offline_records
from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.pipeline.pacing import Pacer
from resonance_task.pipeline.trace import grpc_metadata, headers_of, start_span
from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import (
    GatewayPush,
    GatewayPushBatch,
    OfflinePush,
)
from resonance_task.stage import GroupConsumer, Records, Replay, StageOptions


class OfflineSink:
    def __init__(self, send: SendRecord) -> None:
        self._send = send

    async def put(
        self,
        message: PushMessage,
        users: list[str],
        reason: str,
        gateway_id: str = "",
        push: GatewayPush | None = None,
    ) -> Awaitable[object]:
        record = OfflinePush(message=message, users=users, reason=reason, gateway_id=gateway_id)
        if push is not None:
            record.priority = push.priority
            record.trace_headers.update(push.trace_headers)
        (value,) = offline_records.encode([record], max_bytes=2**31)
        ack = await self._send(None, value, None)
        metrics.OFFLINE_USERS.labels(reason).inc(len(users))
        return ack


async def _acked(sent: Awaitable[Awaitable[object]]) -> object:
    return await (await sent)


class _Settlement:
    """A record's pushes: its future is done when every push is settled and its offline
    records are acked.

    The future itself is the record's effect: no task waits on it, so its offset is done
    (and marked) in the loop turn after the last ack, not several turns later; under
    load a turn lasts tens of milliseconds, and what a gateway got but was not yet marked
    done is pushed again after a SIGKILL.
    """

    def __init__(self) -> None:
        self._pending = 1  # the record itself, until every push of it was offered
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks: list[Awaitable[object]] = []

    def add(self) -> None:
        self._pending += 1

    def acked_by(self, ack: Awaitable[object]) -> None:
        """Offline records this record produced: done only once the broker has them."""
        self._acks.append(ack)

    def settled(self) -> None:
        self._pending -= 1
        if self._pending or self.future.done():
            return
        if not self._acks:
            self.future.set_result(None)
        else:
            asyncio.gather(*self._acks).add_done_callback(self._acked)

    def _acked(self, acks: asyncio.Future[list[object]]) -> None:
        exc = (
            RuntimeError("an offline push send was cancelled")
            if acks.cancelled()
            else acks.exception()  # read even when no longer needed: never "unretrieved"
        )
        if self.future.done():
            return
        if exc is not None:
            # The record must not commit; a failed effect restarts the stage (a cancelled
            # one would only be forgotten, and its partition would stop committing).
            self.future.set_exception(exc)
        else:
            self.future.set_result(None)


# However few records that is, a partition remembers at most this many offered users.
OFFERED_MAX_USERS = 200_000


class Offered:
    """The users each (gateway, msg_id) was offered to in a partition's last records."""

    def __init__(self, max_records: int, max_users: int = OFFERED_MAX_USERS) -> None:
        self._users: dict[tuple[str, int], set[str]] = {}
        self._records: deque[list[tuple[tuple[str, int], list[str]]]] = deque()
        self._count = 0
        self._max_records = max_records
        self._max_users = max_users

    def fresh(self, gateway_id: str, msg_id: int, users: Iterable[str]) -> list[str]:
        seen = self._users.get((gateway_id, msg_id))
        return list(users) if seen is None else [u for u in users if u not in seen]

    def remember(self, pushes: GatewayPushBatch) -> None:
        """A settled record's pushes, as offered."""
        gateway_id = pushes.gateway_id
        self.add([((gateway_id, p.message.msg_id), list(p.users)) for p in pushes.pushes])

    def drop_repeats(self, pushes: GatewayPushBatch) -> tuple[int, list[int]]:
        """Strip the users already offered the same message; remember the rest.

        Returns how many users were stripped, and the index in the record as read of each
        push left (its position, which must not change when the record is read again).
        """
        gateway_id = pushes.gateway_id
        kept: list[GatewayPush] = []
        indexes: list[int] = []
        record: list[tuple[tuple[str, int], list[str]]] = []
        repeated = 0
        for index, push in enumerate(pushes.pushes):
            msg_id = push.message.msg_id
            fresh = self.fresh(gateway_id, msg_id, push.users)
            if len(fresh) < len(push.users):
                repeated += len(push.users) - len(fresh)
                if not fresh:
                    continue
                del push.users[:]
                push.users.extend(fresh)
            kept.append(push)
            indexes.append(index)
            record.append(((gateway_id, msg_id), fresh))
        if repeated:
            del pushes.pushes[:]
            pushes.pushes.extend(kept)
        self.add(record)
        return repeated, indexes

    def add(self, record: list[tuple[tuple[str, int], list[str]]]) -> None:
        for key, users in record:
            seen = self._users.setdefault(key, set())
            before = len(seen)
            seen.update(users)
            self._count += len(seen) - before
        self._records.append(record)
        while self._records and (
            len(self._records) > self._max_records or self._count > self._max_users
        ):
            for key, users in self._records.popleft():
                # A user may stand in two records (a replayed record remembers what it
                # carried, repeats and all): the first to go takes it, the second finds
                # it gone. Forgotten a little early at worst: pushed again, never lost.
                kept = self._users.get(key)
                if kept is None:
                    continue
                before = len(kept)
                kept.difference_update(users)
                self._count -= before - len(kept)
                if not kept:
                    del self._users[key]


class PushConsumer(GroupConsumer):
    def __init__(
        self,
        options: StageOptions,
        *,
        pool: GatewayPool,
        offline: OfflineSink,
        dead_letters: DeadLetters,
        dedupe_records: int = 0,
    ) -> None:
        self._pool = pool
        self._offline = offline
        self._dead_letters = dead_letters
        self._dedupe_records = dedupe_records
        self._offered: dict[TopicPartition, Offered] = {}
        super().__init__(
            options,
            stage="push",
            dead_letters=dead_letters,
            replay=Replay(dedupe_records, self.replayed),
        )

    def _offered_on(self, tp: TopicPartition) -> Offered:
        offered = self._offered.get(tp)
        if offered is None:
            offered = self._offered[tp] = Offered(self._dedupe_records)
        return offered

    def released(self, tps: set[TopicPartition] | None) -> None:
        # What was offered but may not have settled is redone by whoever resumes the
        # partition (this worker too, after a restart): it must not count as offered.
        if tps is None:
            self._offered.clear()
        for tp in tps or ():
            self._offered.pop(tp, None)

    def given(self, tps: set[TopicPartition]) -> None:
        # Another worker may have pushed records of these partitions and died with acks
        # in flight; a stream opened before then knows nothing of it.
        if tps:
            self._pool.reopen()

    def replayed(self, tp: TopicPartition, records: Records) -> None:
        # Settled before this worker took the partition: what they carried counts as offered.
        offered = self._offered_on(tp)
        for record in records:
            try:
                offered.remember(GatewayPushBatch.FromString(record.value))
            except DecodeError:
                continue  # dead-lettered when it was first read

    async def drain(self, deadline: float) -> None:
        # Queued pushes get until the deadline to be acknowledged; what is left then is
        # not committed, and the next owner of the partition sends it again.
        await self._pool.drain(max(0.0, deadline - time.monotonic()))
        await super().drain(deadline)

    # Each record settles when its own gateway answers: a slow gateway holds back its own
    # records' offsets, not the other gateways' records, nor the fetching.
    per_record = True

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        effects: list[Awaitable[object] | None] = []
        pacer = Pacer()
        for record in records:
            await pacer.pace()
            pushes = await self._dead_letters.decoded(record, GatewayPushBatch.FromString)
            if pushes is None:
                effects.append(None)
                continue
            indexes: Iterable[int] = range(len(pushes.pushes))
            if self._dedupe_records:
                tp = TopicPartition(record.topic, record.partition)
                repeated, indexes = self._offered_on(tp).drop_repeats(pushes)
                metrics.PUSH_REPEATS_DROPPED.inc(repeated)
            # Where each push is, so a gateway that already has it (the ack was in flight
            # when a worker died) answers for it instead of getting it again.
            source = f"{record.topic}/{record.partition}"
            positions = [
                None if (at := position(record.offset, index)) is None else (source, at)
                for index in indexes
            ]
            settlement = _Settlement()
            await self._offer(pushes, settlement, positions)
            settlement.settled()
            effects.append(settlement.future)
        return effects

    async def _offer(
        self,
        pushes: GatewayPushBatch,
        batch: _Settlement,
        positions: list[tuple[str, int] | None],
    ) -> None:
        if not pushes.pushes:
            return
        gateway_id = pushes.gateway_id
        session = self._pool.session(gateway_id, pushes.address)
        offline = self._offline
        enqueued = 0
        now_ms = time.time() * 1000
        for push, at in zip(pushes.pushes, positions, strict=True):
            if push.message.timestamp:
                metrics.PUSH_AGE.observe(max(0.0, now_ms - push.message.timestamp) / 1000)

            span = start_span("push", push.trace_headers, push.message.msg_id)
            if span is not None:
                span.set_attribute("resonance.gateway", gateway_id)
                # Offline push, if the gateway fails them, follows from this span too.
                push.trace_headers.clear()
                push.trace_headers.update(headers_of(span, {}))

            def settle(
                outcome: PushOutcome, push: GatewayPush = push, span: Span | None = span
            ) -> None:
                if span is not None:
                    span.set_attribute("resonance.delivered", len(outcome.delivered))
                    span.set_attribute("resonance.failed", len(outcome.failed))
                    if outcome.failed:
                        span.set_attribute("resonance.failed_reason", outcome.reason)
                    span.end()
                if outcome.delivered:
                    metrics.PUSHED_USERS.inc(len(outcome.delivered))
                    if push.message.timestamp:
                        age = time.time() * 1000 - push.message.timestamp
                        metrics.GATEWAY_ACK_AGE.observe(max(0.0, age) / 1000)
                if outcome.failed:
                    # Done once the broker has the offline record; a send that fails
                    # fails the record, and the stage restarts from committed offsets.
                    handed = offline.put(
                        push.message, outcome.failed, outcome.reason, gateway_id, push
                    )
                    batch.acked_by(asyncio.ensure_future(_acked(handed)))
                batch.settled()

            item = PushItem(
                message=push.message,
                users=list(push.users),
                on_done=settle,
                metadata=grpc_metadata(push.trace_headers),
                position=at,
            )
            batch.add()
            if session.offer(item):
                enqueued += 1
            else:
                # A slow or silent gateway must not hold up the others on this partition.
                label, reason = (
                    ("queue_full", "gateway_overloaded")
                    if session.healthy
                    else ("unhealthy", "gateway_unhealthy")
                )
                metrics.PUSH_ENQUEUE_FAILED.labels(gateway_id, label).inc()
                settle(PushOutcome(delivered=[], failed=item.users, reason=reason))
        if enqueued:
            metrics.PUSH_ENQUEUE.labels(gateway_id).inc(enqueued)
