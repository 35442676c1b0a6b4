"""fanout: push events -> inbox deliveries, gateway pushes and offline pushes, in one hop.

It reads push-events in a consumer group of its own (`<APP_ID>-fanout`, a fetched batch
at a time: stage/). Recipients are `to_usernames`, else
`to_username` (single chat), else the members of `session_id`, read a page at a time
from the member store (each session once per batch). The sender's inbox gets the message
too (their other devices sync it) but the push leaves the sender out; `exclude_usernames`
get neither. A batch becomes, per partition of the deliveries topic, one record of inbox
writes for storage; per gateway, one gateway-pushes record routed with this worker's
views of routes and gateways (agents/route.py); and offline pushes for recipients with
no pushable gateway. The batch's offsets commit once the broker has every record.

A group of at least `large_min_members` is not fanned out here: it becomes a
LargeGroupJob for the large_group agent, which pages it with a resumable cursor. Only a
group whose first page is full costs the extra member count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka import TopicPartition
from google.protobuf.message import DecodeError
from opentelemetry.trace import Span

from resonance_task.agents.route import Router
from resonance_task.pipeline import metrics
from resonance_task.pipeline.deliveries import DeliveryRecords
from resonance_task.pipeline.dlq import DeadLetters, InvalidRecord, Record, SourceRecord
from resonance_task.pipeline.fence import Fence
from resonance_task.pipeline.limits import Limits
from resonance_task.pipeline.pacing import Pacer
from resonance_task.pipeline.retry import retrying
from resonance_task.pipeline.trace import context_from, headers_of, start_span
from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage, SessionMeta
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import LargeGroupJob
from resonance_task.stage import GroupConsumer, Records, StageOptions
from resonance_task.stage.options import Gate
from resonance_task.stores.members import MemberStore, UnpageableGroup

log = logging.getLogger(__name__)

SESSION_SINGLE = 1
SESSION_GROUP = 2
_DEFAULT_LIMITS = Limits()


class FanoutRecord(Record, Protocol):
    """A push-events record as read, with its Kafka headers."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class Outputs:
    """Where fan-out writes: each a producer send straight to one topic."""

    deliveries: SendRecord
    gateway_pushes: SendRecord
    offline_pushes: SendRecord
    large_group_jobs: SendRecord


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


def decode_event(
    value: bytes | None, limits: Limits = _DEFAULT_LIMITS, max_bytes: int = 512 * 1024
) -> PushEvent:
    """A push event that keeps the contract and our limits, or InvalidRecord saying why.

    Recipients' ids are checked later, one by one: a bad one costs only itself.
    """
    if value is not None and len(value) > max_bytes:
        # It would not fit in the records it becomes (the body travels whole).
        raise InvalidRecord(
            "too_large", f"{len(value)} bytes; at most {max_bytes} (RECORD_MAX_BYTES)"
        )
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
    if event.session_type not in (0, SESSION_SINGLE, SESSION_GROUP):
        raise InvalidRecord("invalid", f"unknown session_type {event.session_type}")
    explicit = bool(event.to_username or event.to_usernames)
    if event.session_type == SESSION_SINGLE and not explicit:
        raise InvalidRecord("invalid", "single chat without to_username")
    if not explicit and event.session_type != SESSION_GROUP:
        # Members are read only for what says it is a group: a truncated or half-filled
        # event must not reach a whole group.
        raise InvalidRecord("invalid", "no recipients: set to_username(s) or session_type 2")
    content = len(event.content)
    if (
        content * 4 > limits.content_max_bytes
        and len(event.content.encode()) > limits.content_max_bytes
    ):
        raise InvalidRecord(
            "too_large", f"content over {limits.content_max_bytes} bytes (CONTENT_MAX_BYTES)"
        )
    for field in ("session_id", "from_username"):
        raw = getattr(event, field)
        problem = limits.id_problem(raw) if raw else None
        if problem:
            raise InvalidRecord("invalid_id", f"{field} {raw[:64]!r}: {problem}")
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


_NO_TRACE: Mapping[str, str] = {}


def trace_context(event: PushEvent, headers: Sequence[tuple[str, bytes]]) -> Mapping[str, str]:
    """W3C trace context: the Kafka record's headers, overridden by the event's own."""
    if not headers and not event.trace_headers:
        return _NO_TRACE  # most events: no dict to build
    return context_from(headers, event.trace_headers)


def recipients(event: PushEvent, members: Iterable[str] = ()) -> list[str]:
    """Everyone whose inbox gets the message, sender first, once each, none excluded."""
    if event.to_usernames:
        listed: Iterable[str] = event.to_usernames
    elif event.to_username:
        listed = (event.to_username,)
    else:
        listed = members
    # A dict, not a set: explicit lists may repeat a name or name the sender, and the
    # order is kept so record contents are reproducible.
    sender = (event.from_username,) if event.from_username else ()  # "": a system message
    chosen = dict.fromkeys((*sender, *listed))
    for name in event.exclude_usernames:
        chosen.pop(name, None)
    # An empty name listed as a recipient stays: it is refused (and dead-lettered) with
    # the other ids we cannot use, not dropped without a trace.
    return list(chosen)


def is_group_event(event: PushEvent) -> bool:
    """Recipients come from the member store (no explicit recipients on the event)."""
    return not (event.to_usernames or event.to_username)


class _Large:
    """A session whose messages go to the large_group agent."""

    def __init__(self, members: int, read_diffusion: bool) -> None:
        self.members = members
        self.read_diffusion = read_diffusion


@dataclass(frozen=True)
class _Members:
    """A small group's members, their ids checked once for the whole batch."""

    users: list[str]
    refused: list[str]


Resolved = _Members | _Large | UnpageableGroup


class Fanout:
    def __init__(
        self,
        *,
        members: MemberStore,
        router: Router,
        outputs: Outputs,
        dead_letters: DeadLetters,
        partitions: int,
        page_size: int,
        max_users_per_delivery: int,
        record_max_bytes: int = 512 * 1024,
        diffusion: Diffusion | None = None,
        member_concurrency: int = 16,
        limits: Limits = _DEFAULT_LIMITS,
    ) -> None:
        self._limits = limits
        self._members = members
        self._router = router
        self._out = outputs
        self._diffusion = diffusion or Diffusion()
        self._dead_letters = dead_letters
        self._partitions = partitions
        self._page_size = page_size
        self._max_users = max_users_per_delivery
        self._max_bytes = record_max_bytes
        self._member_reads = asyncio.Semaphore(member_concurrency)

    async def handle(self, records: Sequence[FanoutRecord]) -> list[Awaitable[object]]:
        """Fan a batch of push-events records out; returns the produced records' acks."""
        pacer = Pacer()
        events: list[tuple[FanoutRecord, PushEvent]] = []
        for record in records:
            await pacer.pace()
            event = await self._dead_letters.decoded(record, self._decode)
            if event is not None:
                events.append((record, event))
        groups = await self._resolve_groups({e.session_id for _, e in events if is_group_event(e)})

        deliveries = DeliveryRecords(
            partitions=self._partitions, max_users=self._max_users, max_bytes=self._max_bytes
        )
        plan = self._router.plan()
        acks: list[Awaitable[object]] = []
        spans: list[Span] = []
        fanned = 0
        now_ms = time.time() * 1000
        try:
            for record, event in events:
                await pacer.pace()
                if event.timestamp:
                    metrics.FANOUT_AGE.observe(max(0.0, now_ms - event.timestamp) / 1000)
                context = trace_context(event, record.headers)
                span = start_span("fanout", context, event.msg_id)
                if span is not None:
                    spans.append(span)
                    context = headers_of(span, context)
                group = groups.get(event.session_id) if is_group_event(event) else None
                if isinstance(group, UnpageableGroup):
                    metrics.MEMBER_STORE_REFUSED.labels(group.reason).inc()
                    await self._dead_letters.put(record, group.reason, group)
                    continue
                if isinstance(group, _Large):
                    acks.append(await self._hand_over(event, group, context))
                    continue
                if len(event.to_usernames) > self._limits.recipients_max:
                    # Paged like a large group's members, so one event cannot hold the stage.
                    listed = _Large(len(event.to_usernames), read_diffusion=False)
                    acks.append(await self._hand_over(event, listed, context))
                    continue
                if group is None:
                    users, refused = self._limits.split_ids(recipients(event))
                else:
                    # The sender's id was checked with the event, the members' with the group.
                    users = recipients(event, group.users)
                    excluded = event.exclude_usernames
                    refused = [u for u in group.refused if u not in excluded]
                if refused:
                    await refuse_ids(self._dead_letters, record, event, refused, self._limits)
                message = push_message(event)
                if not event.push_only:
                    deliveries.add(message, users, priority=event.priority, trace_headers=context)
                if not event.persist_only:
                    plan.add(message, users, priority=event.priority, trace_headers=context)
                fanned += 1

            for partition, value in deliveries.records():
                acks.append(await self._out.deliveries(None, value, partition))
            for key, value in plan.gateway_records():
                acks.append(await self._out.gateway_pushes(key, value, None))
            for value in plan.offline_records():
                acks.append(await self._out.offline_pushes(None, value, None))
            plan.count()
        finally:
            for span in spans:
                span.end()
        metrics.EVENTS.inc(fanned)
        metrics.DELIVERIES.inc(deliveries.deliveries)
        metrics.RECIPIENTS.inc(deliveries.recipients)
        return acks

    def _decode(self, value: bytes) -> PushEvent:
        return decode_event(value, self._limits, self._max_bytes)

    async def _resolve_groups(self, sessions: set[str]) -> dict[str, Resolved]:
        """Each group session of the batch read once, the sessions concurrently."""
        if not sessions:
            return {}
        ordered = sorted(sessions)
        found = await asyncio.gather(*(self._resolve(s) for s in ordered))
        return dict(zip(ordered, found, strict=True))

    async def _resolve(self, session_id: str) -> Resolved:
        async with self._member_reads:
            try:
                # A full first page is what makes a group a candidate for large_group, so
                # the page is no larger than the large-group threshold.
                first = min(self._page_size, self._diffusion.large_min or self._page_size)
                page, cursor = await self._page(session_id, "", first)
                if cursor is not None and self._diffusion.large_min:
                    size = await retrying(
                        lambda: self._members.count(session_id),
                        "member store",
                    )
                    if self._diffusion.is_large(size):
                        return _Large(size, self._diffusion.is_read(size))
                members = list(page)
                while cursor is not None:
                    page, cursor = await self._page(session_id, cursor, self._page_size)
                    members += page
                return _Members(*self._limits.split_ids(members))
            except UnpageableGroup as exc:
                log.error("group %s: %s", session_id, exc)
                return exc
            except Exception as exc:
                # Not transient (those are retried until the store answers): the store
                # refuses this group, so its events are set aside, not the whole stage.
                log.error("group %s: the member store failed: %r", session_id, exc)
                return UnpageableGroup("member_store_error", f"{type(exc).__name__}: {exc}")

    async def _page(self, session_id: str, cursor: str, count: int) -> tuple[list[str], str | None]:
        return await retrying(
            lambda: self._members.page(session_id, cursor, count),
            "member store",
        )

    async def _hand_over(
        self, event: PushEvent, group: _Large, context: Mapping[str, str]
    ) -> Awaitable[object]:
        job = LargeGroupJob(event=event, read_diffusion=group.read_diffusion, members=group.members)
        job.trace_headers.update(context)
        ack = await self._out.large_group_jobs(
            event.session_id.encode(), job.SerializeToString(), None
        )
        metrics.LARGE_GROUP_JOBS.labels("read" if job.read_diffusion else "write").inc()
        return ack


async def refuse_ids(
    dead_letters: DeadLetters,
    record: Record,
    event: PushEvent,
    refused: list[str],
    limits: Limits,
) -> None:
    """Dead-letter `event` for the `refused` recipients only (everyone else got it)."""
    copy = PushEvent()
    copy.CopyFrom(event)
    del copy.to_usernames[:]
    copy.to_username = ""
    copy.to_usernames.extend(refused)
    metrics.REFUSED_IDS.inc(len(refused))
    problem = limits.id_problem(refused[0])
    await dead_letters.put(
        SourceRecord(
            record.topic, record.partition, record.offset, record.key, copy.SerializeToString()
        ),
        "invalid_user_id",
        f"{len(refused)} recipient(s), first {refused[0][:64]!r}: {problem}",
    )


class FanoutConsumer(GroupConsumer):
    """The fanout stage: push-events in its own consumer group, a fetched batch at a time.

    With a `fence`, it routes nothing before its routes view covers the presence already
    in Kafka: at start, and again whenever its partitions move (pipeline/fence.py).
    """

    def __init__(
        self,
        options: StageOptions,
        *,
        fanout: Fanout,
        dead_letters: DeadLetters,
        ready: Gate | None = None,
        fence: Fence | None = None,
    ) -> None:
        self._fanout = fanout
        self._fence = fence
        # Nothing is fetched before `ready`: routing with views not yet caught up would
        # send online users to offline push.
        super().__init__(options, stage="fanout", dead_letters=dead_letters, gate=ready)

    def given(self, tps: set[TopicPartition]) -> None:
        if self._fence is not None:
            self._fence.hold()

    async def handle(self, records: Records) -> Awaitable[object] | None:
        if self._fence is not None:
            await self._fence.wait_covered()
        acks = await self._fanout.handle(records)
        return asyncio.gather(*acks) if acks else None
