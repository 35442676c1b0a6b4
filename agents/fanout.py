"""fanout: one PushEvent -> one Delivery per user-partition, the body once, users as a list.

Recipients are `to_usernames`, else `to_username` (single chat), else the members of
`session_id` read a page at a time from the member store. The sender's inbox gets the
message too (their other devices sync it); route, not fanout, leaves the sender out of
the push. `exclude_usernames` are dropped here, for both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from google.protobuf.message import DecodeError

from pipeline import metrics
from pipeline.dlq import DeadLetters, InvalidRecord, SourceRecord, source_of
from pipeline.partitioning import partition_for
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage, SessionMeta
from proto.resonance.mq.v1.push_event_pb2 import PushEvent
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery
from stores.members import MemberStore

log = logging.getLogger(__name__)

SESSION_SINGLE = 1
SESSION_GROUP = 2

# (partition, key, value) -> awaitable: the deliveries topic, partition chosen by us.
SendDelivery = Callable[[int, bytes, bytes], Awaitable[object]]


def decode_event(value: bytes | None) -> PushEvent:
    try:
        event = PushEvent.FromString(value or b"")
    except DecodeError as exc:
        raise InvalidRecord("decode_error", f"not a resonance.mq.v1.PushEvent: {exc}") from exc
    if event.msg_id <= 0:
        raise InvalidRecord("invalid", "msg_id must be a positive Snowflake id")
    if not event.session_id:
        raise InvalidRecord("invalid", "session_id is required")
    if event.persist_only and event.push_only:
        raise InvalidRecord("invalid", "persist_only and push_only are exclusive")
    if event.session_type == SESSION_SINGLE and not (event.to_username or event.to_usernames):
        raise InvalidRecord("invalid", "single chat without to_username")
    return event


def push_message(event: PushEvent) -> PushMessage:
    return PushMessage(
        msg_id=event.msg_id,
        seq_id=event.seq_id,
        session_id=event.session_id,
        from_username=event.from_username,
        to_username=event.to_username,
        content=event.content,
        type=event.type,
        timestamp=event.timestamp,
        session_meta=SessionMeta(name=event.session_name, type=event.session_type),
    )


class Fanout:
    def __init__(
        self,
        *,
        members: MemberStore,
        send: SendDelivery,
        dead_letters: DeadLetters,
        partitions: int,
        page_size: int,
        max_users_per_delivery: int,
    ) -> None:
        self._members = members
        self._send = send
        self._dead_letters = dead_letters
        self._partitions = partitions
        self._page_size = page_size
        self._max_users = max_users_per_delivery

    async def handle(self, record: SourceRecord, headers: dict[str, str] | None = None) -> int:
        """Fan one record out; returns the deliveries records produced."""
        try:
            event = decode_event(record.value)
        except InvalidRecord as exc:
            await self._dead_letters.put(record, exc.reason, exc)
            return 0
        return await self.fan_out(event, headers or {})

    async def fan_out(self, event: PushEvent, headers: dict[str, str]) -> int:
        template = Delivery(
            message=push_message(event),
            priority=event.priority,
            persist_only=event.persist_only,
            push_only=event.push_only,
        )
        template.trace_headers.update(headers)
        template.trace_headers.update(event.trace_headers)
        key = event.session_id.encode()
        excluded = set(event.exclude_usernames)
        # Sets, not lists: explicit recipient lists may repeat a name or name the sender.
        buckets: dict[int, dict[str, None]] = {}
        produced = recipients = 0

        async def flush(partition: int) -> None:
            nonlocal produced
            delivery = Delivery()
            delivery.CopyFrom(template)
            delivery.users.extend(buckets.pop(partition))
            await self._send(partition, key, delivery.SerializeToString())
            produced += 1

        async for page in self._recipient_pages(event):
            for user in page:
                if user in excluded or not user:
                    continue
                partition = partition_for(user, self._partitions)
                bucket = buckets.setdefault(partition, {})
                if user not in bucket:
                    bucket[user] = None
                    recipients += 1
                    if len(bucket) >= self._max_users:
                        # Bounded memory and record size for groups of any size.
                        await flush(partition)
        for partition in sorted(buckets):
            await flush(partition)
        metrics.EVENTS.inc()
        metrics.DELIVERIES.inc(produced)
        metrics.RECIPIENTS.inc(recipients)
        return produced

    async def _recipient_pages(self, event: PushEvent) -> AsyncIterator[Iterable[str]]:
        if event.from_username:
            yield (event.from_username,)
        if event.to_usernames:
            yield event.to_usernames
        elif event.to_username:
            yield (event.to_username,)
        else:
            cursor: str | None = ""
            while cursor is not None:
                page, cursor = await self._page_with_retry(event.session_id, cursor)
                yield page

    async def _page_with_retry(self, session_id: str, cursor: str) -> tuple[list[str], str | None]:
        # A failing member store holds this event (and its partition) back: Kafka is the
        # buffer. Crashing the agent would only restart the worker into the same wait.
        attempt = 0
        while True:
            try:
                return await self._members.page(session_id, cursor, self._page_size)
            except Exception as exc:
                attempt += 1
                delay = min(5.0, 0.05 * 2**attempt)
                log.warning(
                    "member store failed (attempt %d), retrying in %.2fs: %r", attempt, delay, exc
                )
                await asyncio.sleep(delay)


def agent(fanout: Fanout) -> Callable[[Any], Awaitable[None]]:
    async def fanout_agent(stream: Any) -> None:
        async for event in stream.events():
            await fanout.handle(source_of(event), _trace_headers(event))

    return fanout_agent


def _trace_headers(event: Any) -> dict[str, str]:
    """W3C trace context from the Kafka record's headers, if the producer put it there."""
    found: dict[str, str] = {}
    for name, value in event.message.headers or ():
        if name in ("traceparent", "tracestate") and value is not None:
            found[name] = value.decode() if isinstance(value, bytes) else str(value)
    return found
