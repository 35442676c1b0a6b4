"""GroupConsumer: a stage's loop. Fetch, hand the batch over, track its effect, checkpoint.

Crash-only: a batch that fails restarts the consumer, which resumes from the committed
offsets (effects are idempotent, or their repetition is what the stage promises). A batch
that keeps failing for a reason retrying will not change is taken one record at a time,
and the record that fails alone is dead-lettered; the rest flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from mode import Service

from resonance_task import errors
from resonance_task.errors import Backoff, is_transient
from resonance_task.pipeline import metrics
from resonance_task.pipeline.backlog import backlog
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.pipeline.fetch_wait import FetchWait
from resonance_task.stage.checkpoint import Checkpoint
from resonance_task.stage.deferral import Deferral
from resonance_task.stage.flow import FlowControl
from resonance_task.stage.offsets import Offsets, Records, Segment
from resonance_task.stage.options import Gate, Replay, StageOptions
from resonance_task.stage.resume import Resumption

log = logging.getLogger(__name__)

RESTART_BACKOFF = Backoff(first=0.2, cap=5.0)
# After this many restarts in a row without progress, on an error that is not transient,
# the stage takes its next records one at a time and dead-letters the one that fails.
ISOLATE_AFTER = 3


def source_record(record: ConsumerRecord[Any, Any]) -> SourceRecord:
    return SourceRecord(
        record.topic, record.partition, record.offset, record.key, record.value, record.headers
    )


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
    """`handle` takes a fetched batch toward its effect and either finishes it or returns
    an awaitable that completes when the effect is done; the stage fetches on meanwhile,
    within its flow control. A stage whose records take effect independently, some much
    later than others (pushes, each acknowledged by its own gateway), sets `per_record`
    and implements `handle_each`: one awaitable (or None) per record."""

    per_record = False

    def __init__(
        self,
        options: StageOptions,
        *,
        stage: str,
        dead_letters: DeadLetters | None = None,
        gate: Gate | None = None,
        replay: Replay | None = None,
        deferral: Deferral | None = None,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        # Letters of handling and of isolation are one topic's unless told otherwise.
        options = replace(options, letters=options.letters or dead_letters)
        self.options = options
        self.stage = stage
        self.topics = list(options.topics)
        self._topic = ",".join(self.topics)  # for the logs
        self._gate = gate
        self._deferral = deferral
        self._isolation_letters = dead_letters
        self._letters = options.letters
        self._fetch_wait: FetchWait | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets = Offsets()
        self._flow = FlowControl(options, per_record=self.per_record)
        self._checkpoint = Checkpoint(
            stage, options, per_record=self.per_record, before_commit=before_commit
        )
        self._resumption = Resumption(stage, per_record=self.per_record, replay=replay)
        self._consume_task: asyncio.Task[None] | None = None
        self._committing: asyncio.Task[None] | None = None
        self._last_commit = time.monotonic()
        self._failed: BaseException | None = None
        self._stopping = False
        self._isolate = 0  # records still to take one at a time
        self.joined = False  # has been through a group join (possibly with no partitions)
        self.restarts = 0
        super().__init__()

    async def handle(self, records: Records) -> Awaitable[object] | None:
        """Take a batch toward its effect; None if done, else what completes when it is."""
        raise NotImplementedError

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        """Per record (same order): None if its effect is done, else what completes then."""
        raise NotImplementedError

    def released(self, tps: set[TopicPartition] | None) -> None:
        """These partitions (None: all) are no longer handled here from where they were."""

    def given(self, tps: set[TopicPartition]) -> None:
        """These partitions are handled here now: the whole assignment, at every rebalance."""

    async def drain(self, deadline: float) -> None:
        """At shutdown, settle what is in flight by `deadline` (monotonic)."""
        await self._flow.wait(None, deadline)

    @property
    def assigned(self) -> bool:
        return self._consumer is not None and bool(self._consumer.assignment())

    def assigned_partitions(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment()) if self._consumer else []

    @property
    def pending_batches(self) -> int:
        return len(self._flow.pending)

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
        consumer, group = self._consumer, self.options.group
        if consumer is None:
            return [
                {"topic": t, "group": group, "partitions": 0, "depth": 0, "lag": None}
                for t in self.topics
            ]
        return [
            await backlog(consumer, t, consumer.partitions_for_topic(t) or (), group=group)
            for t in self.topics
        ]

    async def on_start(self) -> None:
        await self._start_consumer()
        self._consume_task = asyncio.create_task(self._consume(), name=f"stage:{self.stage}")

    async def on_stop(self) -> None:
        self._stopping = True
        deadline = time.monotonic() + self.options.drain_seconds
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
            await self._checkpoint.commit()
            await self._stop_consumer()

    async def _start_consumer(self) -> None:
        consumer = AIOKafkaConsumer(
            enable_auto_commit=False, auto_offset_reset="earliest", **self.options.consumer_config
        )
        consumer.subscribe(self.topics, listener=_Rebalance(self, consumer))
        try:
            await consumer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        self._consumer = consumer
        self._checkpoint.attach(consumer, self._offsets)
        if self._deferral is not None:
            self._deferral.bind(consumer)
        if self._letters is not None:
            # From the committed offsets: whatever letter was not written is sent again.
            self._letters.clear(self.topics)
        busy = self.options.consumer_config.get("fetch_max_wait_ms")
        if busy is not None and self.options.idle_fetch_wait_ms is not None:
            self._fetch_wait = FetchWait(busy, self.options.idle_fetch_wait_ms)

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
        self._flow.forget(None)
        self._offsets = Offsets()
        self._resumption.forget(None)
        # Its partitions may go elsewhere: a mark written after that would overwrite
        # their next owner's (the committed offsets cover what is dropped here).
        self._checkpoint.attach(None, self._offsets)
        if self._deferral is not None:
            self._deferral.bind(None)
        self.released(None)
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _consume(self) -> None:
        if self._gate is not None:
            # Joined meanwhile (the group's coordinator runs on its own), but nothing is
            # fetched until what the stage decides with is in place (e.g. routes).
            waiter = asyncio.ensure_future(self._gate())
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
            if self._checkpoint.progress:
                # Backoff grows only while a restart gets nowhere (a poison batch, a broker
                # that refuses): an empty fetch after a restart is not progress.
                failures, self._checkpoint.progress = 0, False
            if self._failed is not None and not self._stopping:
                await self._restart(failures := failures + 1)

    async def _restart(self, failures: int) -> None:
        """Crash-only recovery: a fresh consumer resumes from the committed offsets."""
        failed, self._failed = self._failed, None
        assert failed is not None
        errors.record(self.stage, failed)
        isolating = self._isolation_letters is not None and not is_transient(failed)
        if failures >= ISOLATE_AFTER and isolating:
            # The same batch keeps failing for a reason retrying will not change: find
            # the record it is about, one record at a time.
            self._isolate = self.options.batch_max_records
        self.restarts += 1
        metrics.STAGE_RESTARTS.labels(self.stage).inc()
        delay = RESTART_BACKOFF.delay(failures)
        log.error(
            "%s: batch failed, restarting the consumer in %.1fs: %r",
            self._topic,
            delay,
            failed,
            exc_info=failed,
        )
        await self._stop_consumer()
        await asyncio.sleep(delay)
        # The next turn starts a fresh consumer; if that fails, it is one more failure of
        # this loop, not the end of the stage.

    async def _step(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        if self._flow.overdue() and self._failed is None:
            # Past its deadline the stage fails, and restarts from its committed offsets.
            timeout = self.options.effect_timeout
            self._failed = TimeoutError(f"an effect took longer than {timeout:g}s")
        fetched: dict[TopicPartition, Records] = {}
        if self._flow.full():
            await self._flow.wait_for_room(consumer)
        elif self._isolate and not self._flow.pending:
            await self._step_isolated(consumer)
        else:
            fetched = await self._fetch(consumer, self._flow.fetch_size())
            if self._fetch_wait is not None:
                self._fetch_wait.observe(consumer, bool(fetched))
            if fetched and self.per_record:
                await self._hand_each(fetched)
            elif fetched:
                await self._hand_batch(fetched)
        if fetched:
            self._checkpoint.post_marks()
        idle = not fetched and not self._flow.pending
        due = idle or time.monotonic() - self._last_commit >= self.options.commit_interval
        if due and (self._committing is None or self._committing.done()):
            if self._committing is not None:
                self._committing.result()  # a commit that failed fails the step: restart
            self._last_commit = time.monotonic()
            self._committing = asyncio.create_task(self._checkpoint.commit())

    async def _hand_each(self, fetched: dict[TopicPartition, Records]) -> None:
        records = [r for rs in fetched.values() for r in rs]
        segments = self._offsets.open_each(fetched)
        if self._resumption.skipping:
            records, segments = self._resumption.skip_done_past(records, segments)
        effects = await self.handle_each(records)
        for record, segment, each in zip(records, segments, effects, strict=True):
            if each is None:
                segment.done = True
            else:
                tp = TopicPartition(record.topic, record.partition)
                self._track(each, [segment], [tp], len(record.value or b""))

    async def _hand_batch(self, fetched: dict[TopicPartition, Records]) -> None:
        segments = self._offsets.open(fetched)
        effect = await self.handle([r for rs in fetched.values() for r in rs])
        if self._deferral is not None:
            self._deferral.cut(dict(zip(fetched, segments, strict=True)))
        if effect is None:
            Offsets.close(segments)
        else:
            self._track(effect, segments, list(fetched))

    def _track(
        self,
        effect: Awaitable[object],
        segments: list[Segment],
        tps: list[TopicPartition],
        size: int = 0,
    ) -> None:
        def ended(done: asyncio.Future[Any]) -> None:
            if done.exception() is not None:
                self._failed = done.exception()
            else:
                Offsets.close(segments)
                self._checkpoint.post_marks()

        self._flow.track(effect, tps, size, ended)

    async def _fetch(
        self, consumer: AIOKafkaConsumer, max_records: int
    ) -> dict[TopicPartition, Records]:
        self._flow.fetched()
        batch = await consumer.getmany(timeout_ms=200, max_records=max_records)
        fetched = {tp: rs for tp, rs in batch.items() if rs}
        if self._resumption.resuming:
            return self._resumption.resume(consumer, self._offsets, fetched)
        return fetched

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
                        await asyncio.wait_for(effect, self.options.effect_timeout)
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
                self._checkpoint.post_marks()
                self._isolate = max(0, self._isolate - 1)

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
        self._resumption.assigned(assigned, await self._checkpoint.load_marks(assigned))

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Settle and commit what we did on these partitions before their next owner starts
        # from our offsets; what is still in flight after the deadline is done again there.
        if self._offsets.waiting(revoked):
            await self._flow.wait(revoked, time.monotonic() + self.options.drain_seconds)
        await self._checkpoint.commit()
        self._offsets.forget(revoked)
        self._checkpoint.give_up(revoked)
        self._resumption.forget(revoked)
        self.released(revoked)
        self._flow.forget(revoked)
