"""push: gateway-keyed pushes -> each gateway's persistent stream; offsets after its ack.

The stream runs without auto-ack: an event is acked only once its gateway acknowledged
the batch that carried it, or once its users were handed to offline push. Faust commits
per partition up to the lowest unacked offset, so acks may arrive out of order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from gateway.client import GatewayPool, PushItem, PushOutcome
from pipeline import metrics
from pipeline.dlq import DeadLetters, source_of
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPush, GatewayPushBatch, OfflinePush

SendOffline = Callable[[bytes, bytes], Awaitable[object]]  # (key, value)


class OfflineSink:
    def __init__(self, send: SendOffline) -> None:
        self._send = send

    async def put(
        self,
        message: PushMessage,
        users: list[str],
        reason: str,
        gateway_id: str = "",
        push: GatewayPush | None = None,
    ) -> None:
        record = OfflinePush(message=message, users=users, reason=reason, gateway_id=gateway_id)
        if push is not None:
            record.priority = push.priority
            record.trace_headers.update(push.trace_headers)
        await self._send(str(message.msg_id).encode(), record.SerializeToString())
        metrics.OFFLINE_USERS.labels(reason).inc(len(users))


def agent(
    pool: GatewayPool, offline: OfflineSink, dead_letters: DeadLetters
) -> Callable[[Any], Awaitable[None]]:
    async def push_agent(stream: Any) -> None:
        manual = stream.noack()
        async for event in manual.events():
            record = source_of(event)
            try:
                batch = GatewayPushBatch.FromString(record.value or b"")
            except DecodeError as exc:
                await dead_letters.put(record, "decode_error", exc)
                await manual.ack(event)
                continue
            await _offer(pool, offline, batch, _AckWhenAllSettled(manual, event, len(batch.pushes)))

    return push_agent


class _AckWhenAllSettled:
    """Acks one gateway-pushes record once every push it carried is settled."""

    def __init__(self, stream: Any, event: Any, pending: int) -> None:
        self._stream = stream
        self._event = event
        self._pending = pending

    async def settled(self) -> None:
        self._pending -= 1
        if self._pending <= 0:
            await self._stream.ack(self._event)


async def _offer(
    pool: GatewayPool, offline: OfflineSink, batch: GatewayPushBatch, ack: _AckWhenAllSettled
) -> None:
    if not batch.pushes:
        await ack.settled()
        return
    session = pool.session(batch.gateway_id, batch.address)
    for push in batch.pushes:

        async def settle(outcome: PushOutcome, push: GatewayPush = push) -> None:
            metrics.PUSHED_USERS.inc(len(outcome.delivered))
            if outcome.failed:
                await offline.put(
                    push.message, outcome.failed, outcome.reason, batch.gateway_id, push
                )
            await ack.settled()

        item = PushItem(
            message=push.message,
            users=list(push.users),
            on_done=settle,
            metadata=list(push.trace_headers.items()),
        )
        if session.offer(item):
            metrics.PUSH_ENQUEUE.labels(batch.gateway_id).inc()
        else:
            # A slow gateway must not hold up the others on this partition: divert.
            metrics.PUSH_ENQUEUE_FAILED.labels(batch.gateway_id, "queue_full").inc()
            await settle(PushOutcome(delivered=[], failed=item.users, reason="gateway_overloaded"))
