"""large_group: a big group's message, fanned out a member page at a time, resumably.

Jobs come from fanout keyed by session_id, so one group's messages run in order on one
partition and a user sees them in order. Each page becomes what fanout would make of
it: inbox deliveries (the body once per record), gateway-pushes records routed with
this worker's views, offline pushes. After a page's records are acknowledged by the
broker, the cursor (the member store's opaque position after the page) goes to the
`large-group-cursors` table and its changelog record is acknowledged too before the next
page is sent: a worker killed mid-group resumes after the last finished page, and at
most the page in flight is sent twice (inbox writes are idempotent; gateways dedupe by
msg_id).

Read diffusion: the message is appended once to the group's timeline; the pages only
push, to online members, and divert nobody to offline push.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypedDict

from google.protobuf.message import DecodeError

from resonance_task import errors
from resonance_task.agents.fanout import Outputs, push_message, refuse_ids
from resonance_task.agents.route import Router
from resonance_task.pipeline import metrics
from resonance_task.pipeline.deliveries import DeliveryRecords
from resonance_task.pipeline.dlq import DeadLetters, InvalidRecord, SourceRecord, source_of
from resonance_task.pipeline.limits import Limits
from resonance_task.pipeline.retry import retrying
from resonance_task.pipeline.trace import headers_of, start_span
from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import LargeGroupJob
from resonance_task.stores.members import MemberStore, UnpageableGroup
from resonance_task.stores.timeline import TimelineStore

log = logging.getLogger(__name__)

TABLE_NAME = "large-group-cursors"

# (key, cursor) -> sets the table entry, returns its changelog record's acknowledgement.
SaveCursor = Callable[[str, "Cursor"], Awaitable[object]]


class Cursor(TypedDict):
    after: str  # the member store's cursor after the last finished page ("" = the start)
    pages: int  # pages finished
    done: bool
    at: int  # wall clock, ms, of the last update
    partition: int  # the jobs partition, whose changelog partition holds this entry


def decode_job(value: bytes | None) -> LargeGroupJob:
    try:
        job = LargeGroupJob.FromString(value or b"")
    except DecodeError as exc:
        raise InvalidRecord("decode_error", f"not a LargeGroupJob: {exc}") from exc
    if job.event.msg_id <= 0 or not job.event.session_id:
        raise InvalidRecord("invalid", "job without msg_id or session_id")
    return job


class LargeGroups:
    def __init__(
        self,
        *,
        members: MemberStore,
        timeline: TimelineStore,
        cursors: MutableMapping[str, Cursor],
        save: SaveCursor,
        router: Router,
        outputs: Outputs,
        dead_letters: DeadLetters,
        partitions: int,
        page_size: int,
        max_users_per_delivery: int,
        record_max_bytes: int = 512 * 1024,
        pages_per_second: float = 0.0,
        pages_in_flight: int = 1,
        keep_done_seconds: float = 3600.0,
        ready: Callable[[], Awaitable[object]] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._ready = ready
        self._members = members
        self._timeline = timeline
        self._cursors = cursors
        self._router = router
        self._out = outputs
        self._save_cursor = save
        self._dead_letters = dead_letters
        self._partitions = partitions
        self._page_size = page_size
        self._max_users = max_users_per_delivery
        self._max_bytes = record_max_bytes
        self._page_interval = 1.0 / pages_per_second if pages_per_second > 0 else 0.0
        self._window = max(1, pages_in_flight)
        self._keep_done_ms = int(keep_done_seconds * 1000)
        self._pruned_at = 0.0
        self._limits = limits or Limits()

    async def handle(self, record: SourceRecord) -> int:
        """Run one job to its end (or resume it); returns the pages fanned out now."""
        job = await self._dead_letters.decoded(record, decode_job)
        if job is None:
            return 0
        key = str(job.event.msg_id)
        # A job is rare and long: where it came from is worth a line (a resumed job's
        # record should be the one its first worker held at its end).
        log.info(
            "large group %s msg %s: job %s:%d@%d",
            job.event.session_id,
            key,
            record.topic,
            record.partition,
            record.offset,
        )
        if self._ready is not None:
            await self._ready()  # routing before the views are current sends users offline
        try:
            # Escaping the agent would ack the job with its group half done: each try
            # resumes from the saved cursor, for as long as it takes if the cause is
            # transient (a broker or store away), a few times if it is not known.
            pages = await retrying(
                lambda: self._attempt(job, key, record), f"large group msg {key}"
            )
        except Exception as exc:
            # Pages already sent stay sent; the rest of the group is set aside.
            verdict = errors.record("large_group", exc)
            if isinstance(exc, UnpageableGroup):
                metrics.MEMBER_STORE_REFUSED.labels(exc.reason).inc()
            reason = verdict.reason if isinstance(verdict, errors.Poison) else "job_failed"
            log.error("large group msg %s set aside (%s): %r", key, reason, exc)
            await self._dead_letters.put(record, reason, exc)
            pages = 0
        self._prune(record.partition)
        return pages

    async def _attempt(self, job: LargeGroupJob, key: str, record: SourceRecord) -> int:
        saved = self._cursors.get(key)
        if saved is not None and saved["done"]:
            return 0  # a replay of a finished job: its effects are all in place
        if saved is not None:
            metrics.LARGE_GROUP_RESUMED.inc()
            log.info(
                "large group %s msg %s: resuming after page %d",
                job.event.session_id,
                key,
                saved["pages"],
            )
        return await self._run(job, key, record, saved)

    async def _page(self, event: PushEvent, cursor: str) -> tuple[list[str], str | None]:
        if event.to_usernames:
            # A recipient list too long to fan out inline: paged here, by position.
            start = int(cursor or 0)
            end = start + self._page_size
            listed = list(event.to_usernames[start:end])
            return listed, (str(end) if end < len(event.to_usernames) else None)
        session_id = event.session_id
        return await retrying(
            lambda: self._members.page(session_id, cursor, self._page_size),
            "member store",
            attempts=1,  # not transient: the job's own retry decides
        )

    async def _run(
        self, job: LargeGroupJob, key: str, record: SourceRecord, saved: Cursor | None
    ) -> int:
        event, partition = job.event, record.partition
        message = push_message(event)
        if job.read_diffusion:
            result = await retrying(
                lambda: self._timeline.append([message]), "timeline store", attempts=1
            )
            metrics.TIMELINE_WRITES.inc(result.new)
            if event.persist_only:
                await self._save(key, partition, "", 0, done=True)
                return 0
        excluded = set(event.exclude_usernames)
        after, page_no = (saved["after"], saved["pages"]) if saved else ("", 0)
        users, cursor = await self._page(event, after)
        # The next page is always being read while this one is built, sent and saved: a
        # member page may queue behind inbox writes on the same Redis.
        ahead = self._read_ahead(event, cursor)
        try:
            if page_no == 0 and event.from_username and not job.read_diffusion:
                users = [event.from_username, *users]  # the sender's own inbox, as in fanout
            records = await self._build(record, job, message, users, excluded, page_no)
            # Pages sent whose cursor is not saved yet, oldest first: (pages after it,
            # cursor, acks). A crash redoes at most these, so their number is the window.
            in_flight: deque[tuple[int, str, list[Awaitable[object]]]] = deque()
            sent_now = 0
            next_at = time.monotonic()
            while True:
                if records or cursor is not None:
                    acks = [await send(k, value, p) for send, k, value, p in records]
                    page_no += 1
                    sent_now += 1
                    in_flight.append((page_no, cursor or "", acks))
                    metrics.LARGE_GROUP_PAGES.inc()
                last = cursor is None
                if not last:
                    assert ahead is not None
                    users, cursor = await ahead
                    ahead = self._read_ahead(event, cursor)
                    last = not users and cursor is None  # the page before was full: the end
                    records = await self._build(record, job, message, users, excluded, page_no)
                while in_flight and (last or len(in_flight) >= self._window):
                    pages, after, acks = in_flight.popleft()
                    await asyncio.gather(*acks)
                    # Saved in page order, each durable before another page is sent: the
                    # cursor never runs ahead of records that might still be lost.
                    await self._save(key, partition, after, pages, done=last and not in_flight)
                if last:
                    if sent_now == 0:
                        await self._save(key, partition, "", page_no, done=True)
                    return sent_now
                if self._page_interval:
                    next_at += self._page_interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            if ahead is not None:
                ahead.cancel()
                # Its failure, if any, is already this job's: only mark it as seen.
                ahead.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _read_ahead(
        self, event: PushEvent, cursor: str | None
    ) -> asyncio.Task[tuple[list[str], str | None]] | None:
        if cursor is None:
            return None
        return asyncio.ensure_future(self._page(event, cursor))

    async def _build(
        self,
        record: SourceRecord,
        job: LargeGroupJob,
        message: PushMessage,
        users: list[str],
        excluded: set[str],
        page: int,
    ) -> list[tuple[SendRecord, bytes | None, bytes, int | None]]:
        """A page's records, as fanout would make them: (send, key, value, partition)."""
        event = job.event
        span = start_span("large_group", job.trace_headers, event.msg_id)
        context = headers_of(span, dict(job.trace_headers))
        try:
            unique = dict.fromkeys(users)  # a plain set may repeat a member across SSCAN pages
            for name in excluded:
                unique.pop(name, None)
            chosen, refused = self._limits.split_ids(unique)
            if refused:
                await refuse_ids(self._dead_letters, record, event, refused, self._limits)
            out: list[tuple[SendRecord, bytes | None, bytes, int | None]] = []
            if not (event.push_only or job.read_diffusion):
                deliveries = DeliveryRecords(
                    partitions=self._partitions,
                    max_users=self._max_users,
                    max_bytes=self._max_bytes,
                )
                deliveries.add(
                    message, chosen, priority=event.priority, trace_headers=context, page=page
                )
                out += [(self._out.deliveries, None, v, p) for p, v in deliveries.records()]
                metrics.DELIVERIES.inc(deliveries.deliveries)
            if not event.persist_only:
                plan = self._router.plan()
                plan.add(
                    message,
                    chosen,
                    priority=event.priority,
                    trace_headers=context,
                    online_only=job.read_diffusion,
                )
                out += [(self._out.gateway_pushes, k, v, None) for k, v in plan.gateway_records()]
                out += [(self._out.offline_pushes, None, v, None) for v in plan.offline_records()]
                plan.count()
            metrics.RECIPIENTS.inc(len(chosen))
            return out
        finally:
            if span is not None:
                span.set_attribute("resonance.page", page)
                span.end()

    async def _save(self, key: str, partition: int, after: str, pages: int, *, done: bool) -> None:
        cursor = Cursor(
            after=after, pages=pages, done=done, at=int(time.time() * 1000), partition=partition
        )
        await self._save_cursor(key, cursor)

    def _prune(self, partition: int) -> None:
        """Forget finished jobs older than the keep time, at most once a minute.

        Only this event's partition: a table write goes to the changelog partition of the
        event being handled, so a tombstone for another partition's key would miss it.
        """
        now = time.monotonic()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        horizon = int(time.time() * 1000) - self._keep_done_ms
        stale = [
            key
            for key, cursor in self._cursors.items()
            if cursor["done"] and cursor["partition"] == partition and cursor["at"] < horizon
        ]
        for key in stale:
            del self._cursors[key]


def agent(groups: LargeGroups) -> Callable[[Any], Awaitable[None]]:
    async def large_group_agent(stream: Any) -> None:
        # One job at a time: the cursor table is written in the job's event context, and
        # the job's offset is committed only after its last page (auto-ack on the next).
        async for event in stream.events():
            await groups.handle(source_of(event))

    return large_group_agent
