"""push: gateway-pushes records -> each gateway's persistent stream; offsets after its ack.

It reads gateway-pushes (keyed by gateway_id, so one worker owns each gateway's records
and its stream) in a consumer group of its own (`<APP_ID>-push`), a fetched batch at a
time. A record is done once every push it carried was acknowledged by its gateway or its
users were handed to offline push (and the broker has those records); only then does
its offset commit. Records settle independently: fetching goes on while gateways answer,
up to PUSH_PENDING_BYTES of records in hand.
A full gateway queue diverts to offline push instead of waiting, so a slow gateway never
holds up the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.client import GatewayPool, PushItem, PushOutcome
from offline import records as offline_records
from pipeline import metrics
from pipeline.dlq import DeadLetters
from pipeline.group_consumer import GroupConsumer, Records
from pipeline.trace import grpc_metadata
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPush, GatewayPushBatch, OfflinePush

# (key, value, partition or None) -> the broker's acknowledgement, once the record is queued.
SendRecord = Callable[[bytes | None, bytes, int | None], Awaitable[Awaitable[object]]]


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


class _Settlement:
    """A batch's pushes: done when every one is settled and its offline records are acked."""

    def __init__(self) -> None:
        self._pending = 1  # the batch itself, until every push of it was offered
        self._all = asyncio.get_running_loop().create_future()
        self.acks: list[Awaitable[object]] = []

    def add(self) -> None:
        self._pending += 1

    def settled(self) -> None:
        self._pending -= 1
        if self._pending == 0 and not self._all.done():
            self._all.set_result(None)

    def fail(self, exc: BaseException) -> None:
        # Users neither pushed nor handed to offline push: the record must not commit.
        if not self._all.done():
            self._all.set_exception(exc)

    async def wait(self) -> None:
        await self._all
        if self.acks:
            await asyncio.gather(*self.acks)


class PushConsumer(GroupConsumer):
    def __init__(
        self,
        *,
        pool: GatewayPool,
        offline: OfflineSink,
        dead_letters: DeadLetters,
        **kwargs: Any,
    ) -> None:
        self._pool = pool
        self._offline = offline
        self._dead_letters = dead_letters
        super().__init__(stage="push", dead_letters=dead_letters, **kwargs)

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
        for record in records:
            pushes = await self._dead_letters.decoded(record, GatewayPushBatch.FromString)
            if pushes is None:
                effects.append(None)
                continue
            settlement = _Settlement()
            await self._offer(pushes, settlement)
            settlement.settled()
            effects.append(settlement.wait())
        return effects

    async def _offer(self, pushes: GatewayPushBatch, batch: _Settlement) -> None:
        if not pushes.pushes:
            return
        gateway_id = pushes.gateway_id
        session = self._pool.session(gateway_id, pushes.address)
        offline = self._offline
        enqueued = 0
        now_ms = time.time() * 1000
        for push in pushes.pushes:
            if push.message.timestamp:
                metrics.PUSH_AGE.observe(max(0.0, now_ms - push.message.timestamp) / 1000)

            async def settle(outcome: PushOutcome, push: GatewayPush = push) -> None:
                if outcome.delivered:
                    metrics.PUSHED_USERS.inc(len(outcome.delivered))
                    if push.message.timestamp:
                        age = time.time() * 1000 - push.message.timestamp
                        metrics.GATEWAY_ACK_AGE.observe(max(0.0, age) / 1000)
                if outcome.failed:
                    try:
                        ack = await offline.put(
                            push.message, outcome.failed, outcome.reason, gateway_id, push
                        )
                    except Exception as exc:
                        batch.fail(exc)  # the stage restarts from the committed offsets
                        raise
                    batch.acks.append(ack)
                batch.settled()

            item = PushItem(
                message=push.message,
                users=list(push.users),
                on_done=settle,
                metadata=grpc_metadata(push.trace_headers),
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
                await settle(PushOutcome(delivered=[], failed=item.users, reason=reason))
        if enqueued:
            metrics.PUSH_ENQUEUE.labels(gateway_id).inc(enqueued)
