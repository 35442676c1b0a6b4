"""fanout: one PushEvent -> one Delivery per user-partition, the body once, users as a list.

Recipients are `to_usernames`, else `to_username` (single chat), else the members of
`session_id` read a page at a time from the member store. The sender's inbox gets the
message too (their other devices sync it); route, not fanout, leaves the sender out of
the push. `exclude_usernames` are dropped here, for both.

A group of at least `large_group_min_members` is not fanned out here: it becomes a
LargeGroupJob for the large_group agent, which pages it with a resumable cursor. Only a
group whose first page is full costs the extra member count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from google.protobuf.message import DecodeError

from pipeline import metrics
from pipeline.dlq import DeadLetters, InvalidRecord, SourceRecord, source_of
from pipeline.partitioning import partition_for
from pipeline.retry import retrying
from proto.resonance.gateway.v1.gateway_pb2 import PushMessage, SessionMeta
from proto.resonance.mq.v1.push_event_pb2 import PushEvent
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery, LargeGroupJob
from stores.members import MemberStore

SESSION_SINGLE = 1
SESSION_GROUP = 2

# (partition, key, value) -> awaitable: the deliveries topic, partition chosen by us.
SendDelivery = Callable[[int, bytes, bytes], Awaitable[object]]
# (key, value): the large-group-jobs topic, keyed by session_id.
SendJob = Callable[[bytes, bytes], Awaitable[object]]


def delivery_template(
    event: PushEvent, headers: Mapping[str, str], *, read_diffusion: bool = False
) -> Delivery:
    """The Delivery every record of this event copies; only `users` (and `page`) differ.

    Read diffusion: the timeline holds the message, so the deliveries only push, and only
    to users who are online.
    """
    template = Delivery(
        message=push_message(event),
        priority=event.priority,
        persist_only=event.persist_only,
        push_only=event.push_only or read_diffusion,
        online_only=read_diffusion,
    )
    template.trace_headers.update(headers)
    template.trace_headers.update(event.trace_headers)
    return template


class Diffusion:
    """When a group is big enough for the large_group agent, and for read diffusion."""

    def __init__(self, large_min_members: int = 0, read_min_members: int = 0) -> None:
        # 0 disables the step.
        self.large_min = large_min_members
        self.read_min = read_min_members

    def is_large(self, members: int) -> bool:
        return self.large_min > 0 and members >= self.large_min

    def is_read(self, members: int) -> bool:
        return self.read_min > 0 and members >= self.read_min


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
        diffusion: Diffusion | None = None,
        send_job: SendJob | None = None,
    ) -> None:
        self._members = members
        self._send = send
        self._diffusion = diffusion or Diffusion()
        self._send_job = send_job
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
        first_page: tuple[list[str], str | None] | None = None
        if is_group_event(event):
            # A full first page is what makes a group a candidate for large_group, so the
            # page is no larger than the large-group threshold.
            size = min(self._page_size, self._diffusion.large_min or self._page_size)
            first_page = await page_with_retry(self._members, event.session_id, "", size)
            if first_page[1] is not None and await self._hand_over(event, headers):
                return 0
        template = delivery_template(event, headers)
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

        async for page in self._recipient_pages(event, first_page):
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

    async def _hand_over(self, event: PushEvent, headers: dict[str, str]) -> bool:
        """Give a large group to the large_group agent; False if it is not large."""
        if self._send_job is None:
            return False
        size = await retrying(lambda: self._members.count(event.session_id), "member store")
        if not self._diffusion.is_large(size):
            return False
        job = LargeGroupJob(event=event, read_diffusion=self._diffusion.is_read(size), members=size)
        job.trace_headers.update(headers)
        await self._send_job(event.session_id.encode(), job.SerializeToString())
        metrics.LARGE_GROUP_JOBS.labels("read" if job.read_diffusion else "write").inc()
        return True

    async def _recipient_pages(
        self, event: PushEvent, first_page: tuple[list[str], str | None] | None
    ) -> AsyncIterator[Iterable[str]]:
        if event.from_username:
            yield (event.from_username,)
        if event.to_usernames:
            yield event.to_usernames
        elif event.to_username:
            yield (event.to_username,)
        else:
            page, cursor = first_page or ([], None)
            yield page
            while cursor is not None:
                page, cursor = await page_with_retry(
                    self._members, event.session_id, cursor, self._page_size
                )
                yield page


def is_group_event(event: PushEvent) -> bool:
    """Recipients come from the member store (no explicit recipients on the event)."""
    return not (event.to_usernames or event.to_username)


async def page_with_retry(
    members: MemberStore, session_id: str, cursor: str, count: int
) -> tuple[list[str], str | None]:
    return await retrying(lambda: members.page(session_id, cursor, count), "member store")


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
