"""A stage with a consumer group of its own inside the worker: batched, offsets after effect.

Two reasons a stage reads its topic through its own aiokafka consumer instead of a Faust
agent. Isolation: a Faust app is one consumer group, and its conductor stops feeding
every agent when one agent's buffer is full, so a stage that may be slow for long (a
stalled inbox store, a rate-limited push provider) would hold back the whole pipeline.
Cost: Faust hands records over one at a time (~155 us each here, issue 8's profile),
while a fetched batch handled at once costs a few microseconds a record.

`handle` takes a fetched batch toward its effect and either finishes it or returns an
awaitable that completes when the effect is done (records acknowledged by the broker);
the stage fetches on meanwhile, up to `max_pending_batches`. A stage whose records take
effect independently, some much later than others (pushes, each acknowledged by its own
gateway), implements `handle_each` instead: one awaitable (or None) per record, so one
slow record holds back neither the others' offsets nor the fetching, which then stops
only at `max_pending_bytes` or `max_pending_records` of records in hand.
Offsets are committed per partition only up to the first batch not yet done, every
`commit_interval` and whenever the topic is idle, one commit at a time in the background:
fetching goes on while the broker commits. What a SIGKILL makes the next owner do again
(pushes sent twice) is what took effect since the last commit: about one commit round
trip of work, unless `marks` (pipeline/offset_marks.py) keep the done prefix in Redis as
it moves (with, for `handle_each` stages, the records done out of order past it): a
successor then starts from the mark and skips what it names. A batch that fails restarts the
consumer, which resumes from the committed offsets: effects are idempotent, or their
repetition is what the stage promises (gateways dedupe pushes by msg_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from mode import Service

from resonance_task import errors
from resonance_task.errors import Backoff, is_transient
from resonance_task.pipeline import metrics
from resonance_task.pipeline.backlog import backlog
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.pipeline.fetch_wait import FetchWait
from resonance_task.pipeline.offset_marks import MAX_RANGES, Mark, OffsetMarks

log = logging.getLogger(__name__)

COMMIT_INTERVAL = 0.1  # seconds
REFILL_SECONDS = 1.0  # a full per-record stage fetches at least this often if room
# A stage with no room at all polls (taking nothing) at least this often: aiokafka leaves
# the group after max_poll_interval_ms (300 s by default) without a poll.
KEEPALIVE_SECONDS = 10.0
# Open records looked through for done ranges past a partition's done prefix, per mark:
# bounds the cost of a mark when many records are in hand.
SCAN_SEGMENTS = 512
RESTART_BACKOFF = Backoff(first=0.2, cap=5.0)
# After this many restarts in a row without progress, on an error that is not transient,
# the stage takes its next records one at a time and dead-letters the one that fails.
ISOLATE_AFTER = 3

Records = list[ConsumerRecord[Any, Any]]


def source_record(record: ConsumerRecord[Any, Any]) -> SourceRecord:
    return SourceRecord(
        record.topic, record.partition, record.offset, record.key, record.value, record.headers
    )


class _Segment:
    """The offsets [start, end) one batch fetched from one partition."""

    __slots__ = ("done", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = False


class _InFlight:
    """An effect being waited for: the partitions it is about, its bytes, its deadline."""

    __slots__ = ("deadline", "size", "tps")

    def __init__(self, tps: list[TopicPartition], size: int, deadline: float) -> None:
        self.tps = tps
        self.size = size
        self.deadline = deadline


class _Resume:
    """Where a partition taken by this stage resumes: known at its first fetch."""

    __slots__ = ("done_below", "mark")

    def __init__(self, mark: Mark | None) -> None:
        self.mark = mark  # from offset marks; valid only if within the partition
        self.done_below: int | None = None


class Offsets:
    """Which fetched offsets have taken effect; only a done prefix of a partition commits."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[_Segment]] = {}
        self._done: dict[TopicPartition, int] = {}  # end of each partition's done prefix
        self._taken: dict[TopicPartition, int] = {}  # what `committable` last handed out

    def open(self, fetched: dict[TopicPartition, Records]) -> list[_Segment]:
        segments = []
        for tp, records in fetched.items():
            segment = _Segment(records[0].offset, records[-1].offset + 1)
            self._open.setdefault(tp, deque()).append(segment)
            segments.append(segment)
        return segments

    def open_each(self, fetched: dict[TopicPartition, Records]) -> list[_Segment]:
        """One segment per record, in the order the records are handed to the stage."""
        segments = []
        for tp, records in fetched.items():
            opened = self._open.setdefault(tp, deque())
            for record in records:
                segment = _Segment(record.offset, record.offset + 1)
                opened.append(segment)
                segments.append(segment)
        return segments

    def skip(self, tp: TopicPartition, end: int) -> None:
        """Offsets below `end` are done without being handled here (an offset mark said so)."""
        segment = _Segment(end, end)
        segment.done = True
        self._open.setdefault(tp, deque()).append(segment)

    @staticmethod
    def close(segments: Iterable[_Segment]) -> None:
        for segment in segments:
            segment.done = True

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: each partition's end of its done prefix, where it moved."""
        ready = {tp: end for tp, end in self.done_ends().items() if self._taken.get(tp) != end}
        self._taken.update(ready)
        return ready

    def done_ends(self) -> dict[TopicPartition, int]:
        """Each partition's end of its done prefix (offset marks save these as they move)."""
        for tp, segments in self._open.items():
            while segments and segments[0].done:
                self._done[tp] = segments.popleft().end
        return dict(self._done)

    def done_marks(self) -> dict[TopicPartition, Mark]:
        """Each partition's done prefix and the done ranges past it (up to MAX_RANGES,
        looked for among the first SCAN_SEGMENTS records or batches still open)."""
        marks = {}
        ends = self.done_ends()
        for tp, segments in self._open.items():
            # Nothing done yet: where the stage began is where its done prefix ends.
            end = ends.get(tp, segments[0].start if segments else None)
            if end is None:
                continue
            beyond: list[tuple[int, int]] = []
            for segment in itertools.islice(segments, SCAN_SEGMENTS):
                if not segment.done or segment.start == segment.end:
                    continue
                if beyond and beyond[-1][1] == segment.start:
                    beyond[-1] = (beyond[-1][0], segment.end)
                elif len(beyond) < MAX_RANGES:
                    beyond.append((segment.start, segment.end))
                else:
                    break
            marks[tp] = Mark(end, tuple(beyond))
        return marks

    def waiting(self, tps: Iterable[TopicPartition]) -> bool:
        return any(self._open.get(tp) for tp in tps)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        # Batches of a partition we no longer own may still finish: they must not commit.
        for tp in tps:
            self._open.pop(tp, None)
            self._done.pop(tp, None)
            self._taken.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stage: GroupConsumer, consumer: AIOKafkaConsumer) -> None:
        self._stage = stage
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._stage._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._stage._on_assigned(assigned, self._consumer)
        self._stage.joined = True


class GroupConsumer(Service):
    def __init__(
        self,
        *,
        topic: str | Sequence[str],
        consumer_config: dict[str, Any],
        batch_max_records: int,
        stage: str,
        before_commit: Callable[[], Awaitable[None]] | None = None,
        max_pending_batches: int = 1,
        max_pending_bytes: int = 64 * 1024 * 1024,
        max_pending_records: int | None = None,
        drain_seconds: float = 5.0,
        effect_timeout: float = 120.0,
        idle_fetch_wait_ms: int | None = None,
        commit_interval: float = COMMIT_INTERVAL,
        marks: OffsetMarks | None = None,
        dead_letters: DeadLetters | None = None,
        letters: DeadLetters | None = None,
        wait_before_consuming: Callable[[], Awaitable[object]] | None = None,
        replay_records: int = 0,
        **kwargs: Any,
    ) -> None:
        self.topics = [topic] if isinstance(topic, str) else list(topic)
        self._topic = ",".join(self.topics)  # for the logs
        self._wait_before_consuming = wait_before_consuming
        self._before_commit = before_commit
        self._consumer_config = consumer_config
        self._batch_max = batch_max_records
        self.stage = stage
        self._max_pending = max(1, max_pending_batches)
        self._max_pending_bytes = max_pending_bytes
        self._max_pending_records = max_pending_records
        self._pending_bytes = 0
        self._drain_seconds = drain_seconds
        self._effect_timeout = effect_timeout
        self._idle_fetch_wait_ms = idle_fetch_wait_ms
        self._fetch_wait: FetchWait | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets = Offsets()
        # Effects in flight, oldest first: what they are about, their size, their deadline.
        self._pending: dict[asyncio.Future[Any], _InFlight] = {}
        # What a full stage waits on: done by the effect that ends its being full. Waiting
        # on the effects themselves cost a callback added to and removed from each of them
        # (a thousand in hand: most of a task lane's own time) every time one ended.
        self._room: asyncio.Future[None] | None = None
        self._last_fetch = time.monotonic()
        self._last_poll = self._last_fetch
        self._consume_task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._stopping = False
        self._last_commit = time.monotonic()
        self._commit_interval = commit_interval
        # One commit at a time, in order: an older commit landing after a newer one would
        # move the group's offset back.
        self._commit_lock = asyncio.Lock()
        self._committing: asyncio.Task[None] | None = None
        self._marks = marks
        self._isolation_letters = dead_letters
        # Where handling sends what it cannot use: commits and marks wait for those
        # letters, or a successor starting past them would never send them.
        self._letters = letters or dead_letters
        self._isolate = 0  # records still to take one at a time
        self._marked: dict[TopicPartition, Mark] = {}  # what was last posted to `marks`
        # Bumped whenever partitions are given up or the consumer is stopped: marks that
        # waited for dead letters since may no longer be ours to write (the next owner's
        # would be overwritten).
        self._marks_given_up = 0
        self._marks_waiting = False  # for dead letters: one wait at a time
        self._marks_scheduled = False
        self._resuming: dict[TopicPartition, _Resume] = {}
        # Per partition taken over: what its mark says is done past where work resumes.
        self._done_past: dict[TopicPartition, Mark] = {}
        self._replay_records = replay_records
        self._progress = False  # offsets committed since the last restart
        self._deferred: dict[TopicPartition, int] = {}
        self.joined = False  # has been through a group join (possibly with no partitions)
        self.restarts = 0
        super().__init__(**kwargs)

    per_record = False  # True: the stage implements handle_each, not handle

    async def handle(self, records: Records) -> Awaitable[object] | None:
        """Take a batch toward its effect; None if done, else what completes when it is."""
        raise NotImplementedError

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        """Per record (same order): None if its effect is done, else what completes then."""
        raise NotImplementedError

    async def drain(self, deadline: float) -> None:
        """At shutdown, settle what is in flight by `deadline` (monotonic)."""
        await self._wait_pending(None, deadline)

    @property
    def assigned(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment()) if self._consumer else []

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        """The consuming loop runs (it only ends at stop, or through a bug: then not ready)."""
        return self._consume_task is not None and not self._consume_task.done()

    def stats(self) -> dict[str, Any]:
        return {
            "assigned": self.assigned_partitions(),
            "joined": self.joined,
            "alive": self.alive,
            "pending_batches": self.pending_batches,
            "restarts": self.restarts,
        }

    @property
    def kafka_consumer(self) -> AIOKafkaConsumer | None:
        return self._consumer

    async def backlog(self) -> list[dict[str, Any]]:
        """Each of its topics' depth and this stage's group's lag (pipeline/backlog.py)."""
        consumer = self._consumer
        if consumer is None:
            return [
                {"topic": t, "group": self._group, "partitions": 0, "depth": 0, "lag": None}
                for t in self.topics
            ]
        return [
            await backlog(consumer, t, consumer.partitions_for_topic(t) or (), group=self._group)
            for t in self.topics
        ]

    async def on_start(self) -> None:
        await self._start_consumer()
        self._consume_task = asyncio.create_task(self._consume(), name=f"stage:{self.stage}")

    async def on_stop(self) -> None:
        self._stopping = True
        deadline = time.monotonic() + self._drain_seconds
        task = self._consume_task
        if task is not None:
            # The loop ends after its current fetch or batch; whatever it handed on drains.
            # A batch that cannot end (its store is down and retried) is given up at the
            # deadline: not committed, it is done again by the partition's next owner.
            await asyncio.wait([task], timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                log.warning("%s: batch in hand did not finish by the deadline", self._topic)
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self._consume_task = None
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self.drain(max(deadline, time.monotonic() + 1.0))
            await self._commit()
            await self._stop_consumer()

    async def _start_consumer(self) -> None:
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False, auto_offset_reset="earliest", **self._consumer_config
        )
        consumer.subscribe(self.topics, listener=_Rebalance(self, consumer))
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._consumer = consumer
        if self._letters is not None:
            # From the committed offsets: whatever letter was not written is sent again.
            self._letters.clear(self.topics)
        busy = self._consumer_config.get("fetch_max_wait_ms")
        if busy is not None and self._idle_fetch_wait_ms is not None:
            self._fetch_wait = FetchWait(busy, self._idle_fetch_wait_ms)

    async def _stop_consumer(self) -> None:
        committing, self._committing = self._committing, None
        if committing is not None:
            # A commit under way finishes on the consumer it started with (bounded: a
            # commit waiting on a broker that is gone is given up).
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(committing, 5.0)
        consumer, self._consumer = self._consumer, None
        # Forgotten, not cancelled: the sends and pushes under them go on; what does not
        # commit here is done again from the committed offsets.
        self._pending.clear()
        self._pending_bytes = 0
        self._offsets = Offsets()
        self._resuming = {}
        self._done_past = {}
        if self._marks is not None:
            # Its partitions may go elsewhere: a mark written after that would overwrite
            # their next owner's (the committed offsets cover what is dropped here).
            self._marks.forget(self._group)
        self._marked.clear()
        self._marks_given_up += 1
        self.released(None)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _consume(self) -> None:
        if self._wait_before_consuming is not None:
            # Joined meanwhile (the group's coordinator runs on its own), but nothing is
            # fetched until what the stage decides with is in place (e.g. routes).
            waiter = asyncio.ensure_future(self._wait_before_consuming())
            while not waiter.done() and not self._stopping:
                await asyncio.wait([waiter], timeout=0.2)
            if not waiter.done():
                waiter.cancel()
                return
        failures = 0
        while not self._stopping:
            try:
                if self._consumer is None:
                    await self._start_consumer()
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed = exc
                errors.record(self.stage, exc)
            if self._progress:
                # Backoff grows only while a restart gets nowhere (a poison batch, a broker
                # that refuses): an empty fetch after a restart is not progress.
                failures, self._progress = 0, False
            if self._failed is not None and not self._stopping:
                # Crash-only recovery: a fresh consumer resumes from the committed offsets.
                failures += 1
                if (
                    failures >= ISOLATE_AFTER
                    and self._isolation_letters is not None
                    and not is_transient(self._failed)
                ):
                    # The same batch keeps failing for a reason retrying will not change:
                    # find the record it is about, one record at a time.
                    self._isolate = self._batch_max
                self.restarts += 1
                metrics.STAGE_RESTARTS.labels(self.stage).inc()
                delay = RESTART_BACKOFF.delay(failures)
                log.error(
                    "%s: batch failed, restarting the consumer in %.1fs: %r",
                    self._topic,
                    delay,
                    self._failed,
                    exc_info=self._failed,
                )
                self._failed = None
                await self._stop_consumer()
                await asyncio.sleep(delay)
                # The next turn starts a fresh consumer; if that fails, it is one more
                # failure of this loop, not the end of the stage.

    async def _step(self) -> None:
        assert self._consumer is not None
        self._check_overdue()
        fetched: dict[TopicPartition, Records] = {}
        if self._full():
            # Backpressure: Kafka is the buffer while the records in hand take effect.
            if time.monotonic() - self._last_poll >= KEEPALIVE_SECONDS:
                await self._poll_paused(self._consumer)
            self._room = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._room], timeout=0.2)
            self._room = None
        elif self._isolate and not self._pending:
            await self._step_isolated(self._consumer)
        else:
            fetched = await self._fetch(self._consumer, self._fetch_size())
            if self._fetch_wait is not None:
                self._fetch_wait.observe(self._consumer, bool(fetched))
            if fetched and self.per_record:
                records = [r for rs in fetched.values() for r in rs]
                segments = self._offsets.open_each(fetched)
                if self._done_past:
                    records, segments = self._skip_done_past(records, segments)
                effects = await self.handle_each(records)
                for record, segment, each in zip(records, segments, effects, strict=True):
                    if each is None:
                        segment.done = True
                    else:
                        tp = TopicPartition(record.topic, record.partition)
                        self._track(each, [segment], [tp], len(record.value or b""))
            elif fetched:
                segments = self._offsets.open(fetched)
                effect = await self.handle([r for rs in fetched.values() for r in rs])
                if self._deferred:
                    deferred, self._deferred = self._deferred, {}
                    for tp, segment in zip(fetched, segments, strict=True):
                        if tp in deferred:
                            segment.end = deferred[tp]  # fetched again when due
                if effect is None:
                    Offsets.close(segments)
                else:
                    self._track(effect, segments, list(fetched))
        if fetched:
            self._post_marks()
        idle = not fetched and not self._pending
        due = idle or time.monotonic() - self._last_commit >= self._commit_interval
        if due and (self._committing is None or self._committing.done()):
            if self._committing is not None:
                self._committing.result()  # a commit that failed fails the step: restart
            self._last_commit = time.monotonic()
            self._committing = asyncio.create_task(self._commit())

    def _full(self) -> bool:
        if not self.per_record:
            return len(self._pending) >= self._max_pending
        if self._pending_bytes >= self._max_pending_bytes:
            return True
        limit = self._max_pending_records
        if limit is None:
            return False
        if len(self._pending) >= limit:
            return True
        # Taken a quarter of the limit at a time: a record at a time would cost a fetch
        # and a step for each. Where records end slowly (long tasks in a lane given a
        # tenth of the slots) a quarter may take minutes: then whatever is free, at most
        # every REFILL_SECONDS, so that the consumer keeps polling (aiokafka leaves the
        # group after max_poll_interval_ms without a fetch).
        quarter = len(self._pending) > limit - max(1, limit // 4)
        return quarter and time.monotonic() - self._last_fetch < REFILL_SECONDS

    def _fetch_size(self) -> int:
        """Records to take in the next fetch: a batch, or what the records limit leaves."""
        if self.per_record and self._max_pending_records is not None:
            return min(self._batch_max, self._max_pending_records - len(self._pending))
        return self._batch_max

    def _wake_if_room(self) -> None:
        """A full stage waiting on `_room` fetches again once it is full no more."""
        if self._room is not None and not self._room.done() and not self._full():
            self._room.set_result(None)

    async def _poll_paused(self, consumer: AIOKafkaConsumer) -> None:
        """Poll with every partition paused: it takes nothing, and tells aiokafka this
        member is alive (a stage full for minutes, long tasks in every slot, would be
        dropped from its group after max_poll_interval_ms and its partitions moved away
        from the records in hand)."""
        self._last_poll = time.monotonic()
        mine = consumer.assignment() - consumer.paused()
        consumer.pause(*mine)
        try:
            got = await consumer.getmany(timeout_ms=0)
        finally:
            consumer.resume(*(mine & consumer.assignment()))
        for tp, records in got.items():
            if records:
                consumer.seek(tp, records[0].offset)  # not taken: fetched again later

    async def _fetch(
        self, consumer: AIOKafkaConsumer, max_records: int
    ) -> dict[TopicPartition, Records]:
        self._last_fetch = self._last_poll = time.monotonic()
        batch = await consumer.getmany(timeout_ms=200, max_records=max_records)
        fetched = {tp: rs for tp, rs in batch.items() if rs}
        return self._resume(consumer, fetched) if self._resuming else fetched

    async def _step_isolated(self, consumer: AIOKafkaConsumer) -> None:
        """One record, to its effect; one that fails for good is dead-lettered, and only it."""
        assert self._isolation_letters is not None
        for tp, records in (await self._fetch(consumer, 1)).items():
            for record in records:
                segments = self._offsets.open({tp: [record]})
                try:
                    if self.per_record:
                        (effect,) = await self.handle_each([record])
                    else:
                        effect = await self.handle([record])
                    if effect is not None:
                        await asyncio.wait_for(effect, self._effect_timeout)
                except Exception as exc:
                    if is_transient(exc):
                        raise  # not this record's fault: restart, isolation goes on
                    log.error(
                        "%s: %s[%d]@%d fails alone: dead-lettered",
                        self.stage,
                        record.topic,
                        record.partition,
                        record.offset,
                        exc_info=exc,
                    )
                    await self._isolation_letters.put(
                        source_record(record), "stage_failed", f"{type(exc).__name__}: {exc}"
                    )
                Offsets.close(segments)
                self._post_marks()
                self._isolate = max(0, self._isolate - 1)

    def _track(
        self,
        effect: Awaitable[object],
        segments: list[_Segment],
        tps: list[TopicPartition],
        size: int = 0,
    ) -> None:
        # The effect itself is tracked, never a wrapper: a task, a timer and a shield per
        # record were most of a task lane's own cost. Giving up on an effect (overdue,
        # revoked, restarted) only forgets it, so the sends or pushes under it go on.
        future = asyncio.ensure_future(effect)
        # Keyed by the effect: a stage returns one awaitable per record or batch, never
        # the same one twice.
        self._pending[future] = _InFlight(tps, size, time.monotonic() + self._effect_timeout)
        self._pending_bytes += size

        def finished(done: asyncio.Future[Any]) -> None:
            if self._pending.pop(done, None) is None:
                if not done.cancelled():
                    done.exception()  # forgotten meanwhile: its outcome no longer matters
                return
            self._pending_bytes -= size
            self._wake_if_room()
            if done.cancelled():
                return
            if done.exception() is not None:
                self._failed = done.exception()
            else:
                Offsets.close(segments)
                self._post_marks()

        future.add_done_callback(finished)

    def _check_overdue(self) -> None:
        """An effect that never ends (a send stuck on a broker that lost a partition)
        would hold the stage's backpressure shut for good: past its deadline the stage
        fails, and restarts from its committed offsets. Every effect has the same timeout,
        so the oldest one is the first due."""
        oldest = next(iter(self._pending.values()), None)
        if oldest is not None and time.monotonic() > oldest.deadline and self._failed is None:
            self._failed = TimeoutError(f"an effect took longer than {self._effect_timeout:g}s")

    def defer(self, tp: TopicPartition, offset: int, seconds: float) -> None:
        """From `handle`: `tp`'s records from `offset` on are not for now. The partition
        is paused for `seconds` (the other partitions go on) and fetched again from
        `offset` then; nothing of it from there on counts as done."""
        consumer = self._consumer
        assert consumer is not None and not self.per_record
        self._deferred[tp] = offset
        consumer.seek(tp, offset)
        consumer.pause(tp)
        asyncio.get_running_loop().call_later(max(0.0, seconds), self._undefer, consumer, tp)

    def _undefer(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        # Only on the consumer that paused it, and only if the partition is still ours.
        mine = self._consumer is consumer
        if mine and tp in consumer.assignment():
            consumer.resume(tp)

    @property
    def _group(self) -> str:
        return str(self._consumer_config.get("group_id"))

    def _post_marks(self) -> None:
        """Soon (once per loop turn, however many records ended in it): hand the moved
        ends of the done prefix to `marks`, which writes them off the loop."""
        if self._marks is None or self._marks_scheduled:
            return
        self._marks_scheduled = True
        asyncio.get_running_loop().call_soon(self._flush_marks)

    def _flush_marks(self) -> None:
        self._marks_scheduled = False
        consumer = self._consumer
        if self._marks is None or consumer is None:
            return
        owned = consumer.assignment()
        # Done ranges past the prefix only where records end out of order, one by one.
        current = (
            self._offsets.done_marks()
            if self.per_record
            else {tp: Mark(end) for tp, end in self._offsets.done_ends().items()}
        )
        ends = {
            tp: mark for tp, mark in current.items() if tp in owned and self._marked.get(tp) != mark
        }
        if not ends or self._marks_waiting:
            return  # a wait for dead letters under way flushes again when it ends
        letters = self._letters
        if letters is not None:
            if letters.failure(self.topics) is not None:
                return  # a letter not written: nothing past it is done (the commit fails)
            unacked = letters.unacked()
            if unacked:
                self._marks_waiting = True
                waiting = asyncio.gather(*unacked)
                waiting.add_done_callback(
                    functools.partial(self._post_lettered, ends, self._marks_given_up)
                )
                return
        self._marks.post(self._group, ends)
        self._marked.update(ends)

    def _post_lettered(
        self,
        ends: dict[TopicPartition, Mark],
        given_up: int,
        letters: asyncio.Future[list[Any]],
    ) -> None:
        """Post marks that waited for dead letters, now acknowledged, then flush what
        moved meanwhile (no mark was posted while they waited: these are the newest).
        Not if a letter failed (the commit fails too, and the stage restarts), nor once
        partitions were given up or the consumer replaced since."""
        self._marks_waiting = False
        if letters.cancelled() or letters.exception() is not None:
            return  # DeadLetters keeps the failure: no mark until the stage restarts
        if self._marks is None or given_up != self._marks_given_up:
            return
        self._marks.post(self._group, ends)
        self._marked.update(ends)
        self._post_marks()

    def replayed(self, tp: TopicPartition, records: Records) -> None:
        """Records before where this stage resumes a partition: done already, not to redo.

        Fed, with `replay_records`, when a partition is taken: the last that many records
        before its resume point, then those its mark names done past it as they are
        fetched, so a stage can tell a repeat of done work (the same push fanned out again
        by a successor of a killed fanout) from new work.
        """

    def released(self, tps: set[TopicPartition] | None) -> None:
        """These partitions (None: all) are no longer handled here from where they were."""

    def given(self, tps: set[TopicPartition]) -> None:
        """These partitions are handled here now: the whole assignment, at every rebalance."""

    async def _on_assigned(self, assigned: set[TopicPartition], consumer: AIOKafkaConsumer) -> None:
        """Load the marks of what we were given; each applies at its partition's first fetch.

        Not here, against `end_offsets`: a mark past the partition's end means the topic was
        recreated (and on Tansu a seek past the end waits there for ever, skipping what is
        produced below it), but Tansu's ListOffsets(latest) answers the first offset of the
        last batch + 1, short of the end a mark usually is. A fetch's high watermark is right
        on both brokers.
        """
        metrics.STAGE_REBALANCES.labels(self.stage).inc()
        self.given(assigned)
        marks: dict[TopicPartition, Mark] = {}
        if self._marks is not None and assigned:
            try:
                marks = await self._marks.load_marks(self._group, assigned)
            except Exception as exc:
                log.warning("%s: offset marks not read, from the commits: %r", self.stage, exc)
        self._resuming = {
            tp: _Resume(marks.get(tp)) for tp in assigned if tp in marks or self._replay_records
        }

    def _resume(
        self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, Records]
    ) -> dict[TopicPartition, Records]:
        """Of a partition's first records since it was taken, keep only what is to be done.

        The first fetch starts at the committed offset; a valid mark moves the point where
        work resumes further. What lies before that point is handed to `replayed` (the
        `replay_records` before it, fetched again for the purpose) and never handled again.
        """
        for tp, records in list(fetched.items()):
            resume = self._resuming.get(tp)
            if resume is None:
                continue
            if resume.done_below is None:
                start = records[0].offset
                mark = self._valid_mark(consumer, tp, start, resume.mark)
                resume.done_below = start
                if mark is not None and mark.below > start:
                    metrics.OFFSETS_SKIPPED.labels(self.stage).inc(mark.below - start)
                    self._offsets.skip(tp, mark.below)
                    resume.done_below = mark.below
                if mark is not None and self.per_record:
                    past = tuple((s, e) for s, e in mark.beyond if e > resume.done_below)
                    if past:
                        self._done_past[tp] = Mark(resume.done_below, past)
                wanted = max(0, resume.done_below - self._replay_records)
                if wanted != start:
                    # Back for the records to replay, or on past what is done: the consumer
                    # drops what it prefetched from elsewhere.
                    consumer.seek(tp, wanted)
                    del fetched[tp]
                    continue
            before = [r for r in records if r.offset < resume.done_below]
            if before and self._replay_records:
                self.replayed(tp, before)
            if len(before) < len(records):
                fetched[tp] = records[len(before) :]
                del self._resuming[tp]
            else:
                del fetched[tp]
        return fetched

    def _valid_mark(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, mark: Mark | None
    ) -> Mark | None:
        """The mark, if it says more than the committed offset `start` and lies within the
        partition."""
        if mark is None:
            return None
        if mark.end <= start:
            return None
        highwater = consumer.highwater(tp)
        if highwater is None or mark.end > highwater:
            log.warning(
                "%s: %s mark %s is past its end %s: ignored",
                self.stage,
                tp,
                mark.encode(),
                highwater,
            )
            return None
        return mark

    def _skip_done_past(
        self, records: Records, segments: list[_Segment]
    ) -> tuple[Records, list[_Segment]]:
        """Of records just fetched, leave out those a taken partition's mark says are done
        past its prefix: done, in their place, and handed to `replayed` as done work."""
        kept: Records = []
        kept_segments: list[_Segment] = []
        skipped: dict[TopicPartition, Records] = {}
        for record, segment in zip(records, segments, strict=True):
            tp = TopicPartition(record.topic, record.partition)
            past = self._done_past.get(tp)
            if past is not None and record.offset >= past.end:
                del self._done_past[tp]  # fetched beyond them all
                past = None
            if past is not None and past.covers(record.offset):
                segment.done = True
                skipped.setdefault(tp, []).append(record)
            else:
                kept.append(record)
                kept_segments.append(segment)
        for tp, done in skipped.items():
            metrics.OFFSETS_SKIPPED.labels(self.stage).inc(len(done))
            if self._replay_records:
                self.replayed(tp, done)
        return kept, kept_segments

    async def _wait_pending(self, tps: set[TopicPartition] | None, deadline: float) -> None:
        while True:
            waiting = [f for f, held in self._pending.items() if tps is None or tps & set(held.tps)]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            await asyncio.wait(waiting, timeout=left)

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Settle and commit what we did on these partitions before their next owner starts
        # from our offsets; what is still in flight after the deadline is done again there.
        if self._offsets.waiting(revoked):
            await self._wait_pending(revoked, time.monotonic() + self._drain_seconds)
        await self._commit()
        self._offsets.forget(revoked)
        if self._marks is not None:
            self._marks.forget(self._group, revoked)
        self._marks_given_up += 1
        for tp in revoked:
            self._resuming.pop(tp, None)
            self._done_past.pop(tp, None)
            self._marked.pop(tp, None)
        self.released(revoked)
        # What is still in flight there will not commit here: stop counting it against
        # backpressure (the work itself goes on, and its repeat by the next owner is fine).
        for future, held in list(self._pending.items()):
            if set(held.tps) <= revoked:
                del self._pending[future]
                self._pending_bytes -= held.size
        self._wake_if_room()

    async def _commit(self) -> None:
        async with self._commit_lock:
            await self._commit_now()

    async def _commit_now(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets = self._offsets.committable()
        # Only partitions still ours: a rebalance may have taken some since they were handled.
        owned = consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return
        started = time.monotonic()
        if self._before_commit is not None:
            await self._before_commit()
        if self._letters is not None:
            # What handling dead-lettered is out before the offsets say done; a letter the
            # broker refused fails the commit (the stage restarts and sends it again).
            await self._letters.acked(self.topics)
        flushed = time.monotonic()
        try:
            await consumer.commit(offsets)
            self._progress = True
            durations = metrics.COMMIT_DURATION
            durations.labels(self.stage, "flush").observe(flushed - started)
            durations.labels(self.stage, "commit").observe(time.monotonic() - flushed)
        except (CommitFailedError, KafkaError) as exc:
            log.info("%s: commit skipped after a rebalance: %s", self._topic, exc)
        for tp, offset in offsets.items():
            try:
                highwater = consumer.highwater(tp)
            except KafkaError:
                continue
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(self.stage, str(tp.partition)).set(
                    max(0, highwater - offset)
                )
