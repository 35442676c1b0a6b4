"""The checkpoint: what makes a stage's done work durable, in the one order that is safe.

    effects acked -> dead letters acked -> commit        (every commit_interval, at idle)
    effects acked -> dead letters acked -> offset marks  (as the done prefix moves)

Effects acked: only the done prefix of each partition is offered (stage/offsets.py), and
`before_commit` may flush what the stage produced. Dead letters acked: what handling set
aside must be in its dead-letter topic before an offset says the record is done, or a
successor starting past it would never send it; a letter the broker refused fails the
commit, and the stage restarts and sends it again. Commit: one at a time, in order (an
older commit landing after a newer one would move the group's offset back), only for
partitions still owned. Marks: the done prefix (and, for per-record stages, the ranges
done past it) written to Redis between commits, so that a successor after a SIGKILL
redoes almost nothing; never for a partition given up since (it would overwrite its next
owner's mark).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from resonance_task.pipeline import metrics
from resonance_task.pipeline.offset_marks import Mark
from resonance_task.stage.offsets import Offsets
from resonance_task.stage.options import StageOptions

log = logging.getLogger(__name__)


class Checkpoint:
    def __init__(
        self,
        stage: str,
        options: StageOptions,
        *,
        per_record: bool,
        before_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._stage = stage
        self._topics = list(options.topics)
        self._group = options.group
        self._letters = options.letters
        self._marks = options.marks
        self._per_record = per_record
        self._before_commit = before_commit
        self._lock = asyncio.Lock()
        self._consumer: AIOKafkaConsumer | None = None
        self._offsets = Offsets()
        self.progress = False  # offsets committed since the last restart
        self._marked: dict[TopicPartition, Mark] = {}  # what was last posted to `marks`
        # Bumped whenever partitions are given up or the consumer is stopped: marks that
        # waited for dead letters since may no longer be ours to write.
        self._given_up = 0
        self._waiting = False  # for dead letters: one wait at a time
        self._scheduled = False

    def attach(self, consumer: AIOKafkaConsumer | None, offsets: Offsets) -> None:
        """The consumer and the offsets commits and marks are about from now on (None:
        stopped; its partitions may go elsewhere)."""
        if consumer is None:
            if self._marks is not None:
                self._marks.forget(self._group)
            self._marked.clear()
            self._given_up += 1
        self._consumer, self._offsets = consumer, offsets

    def give_up(self, tps: set[TopicPartition]) -> None:
        """These partitions are no longer ours: no mark of theirs is written from here."""
        if self._marks is not None:
            self._marks.forget(self._group, tps)
        self._given_up += 1
        for tp in tps:
            self._marked.pop(tp, None)

    async def load_marks(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Mark]:
        if self._marks is None or not assigned:
            return {}
        try:
            return await self._marks.load_marks(self._group, assigned)
        except Exception as exc:
            log.warning("%s: offset marks not read, from the commits: %r", self._stage, exc)
            return {}

    async def commit(self) -> None:
        async with self._lock:
            await self._commit()

    async def _commit(self) -> None:
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
            await self._letters.acked(self._topics)
        flushed = time.monotonic()
        try:
            await consumer.commit(offsets)
            self.progress = True
            durations = metrics.COMMIT_DURATION
            durations.labels(self._stage, "flush").observe(flushed - started)
            durations.labels(self._stage, "commit").observe(time.monotonic() - flushed)
        except (CommitFailedError, KafkaError) as exc:
            log.info("%s: commit skipped after a rebalance: %s", self._stage, exc)
        for tp, offset in offsets.items():
            try:
                highwater = consumer.highwater(tp)
            except KafkaError:
                continue
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(self._stage, str(tp.partition)).set(
                    max(0, highwater - offset)
                )

    def post_marks(self) -> None:
        """Soon (once per loop turn, however many records ended in it): hand the moved
        ends of the done prefix to `marks`, which writes them off the loop."""
        if self._marks is None or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._flush_marks)

    def _flush_marks(self) -> None:
        self._scheduled = False
        consumer = self._consumer
        if self._marks is None or consumer is None:
            return
        owned = consumer.assignment()
        # Done ranges past the prefix only where records end out of order, one by one.
        current = (
            self._offsets.done_marks()
            if self._per_record
            else {tp: Mark(end) for tp, end in self._offsets.done_ends().items()}
        )
        ends = {
            tp: mark for tp, mark in current.items() if tp in owned and self._marked.get(tp) != mark
        }
        if not ends or self._waiting:
            return  # a wait for dead letters under way flushes again when it ends
        letters = self._letters
        if letters is not None:
            if letters.failure(self._topics) is not None:
                return  # a letter not written: nothing past it is done (the commit fails)
            unacked = letters.unacked()
            if unacked:
                self._waiting = True
                waiting = asyncio.gather(*unacked)
                waiting.add_done_callback(functools.partial(self._lettered, ends, self._given_up))
                return
        self._marks.post(self._group, ends)
        self._marked.update(ends)

    def _lettered(
        self, ends: dict[TopicPartition, Mark], given_up: int, letters: asyncio.Future[list[Any]]
    ) -> None:
        """Post marks that waited for dead letters, now acknowledged, then flush what
        moved meanwhile (no mark was posted while they waited: these are the newest).
        Not if a letter failed (the commit fails too, and the stage restarts), nor once
        partitions were given up or the consumer replaced since."""
        self._waiting = False
        if letters.cancelled() or letters.exception() is not None:
            return  # DeadLetters keeps the failure: no mark until the stage restarts
        if self._marks is None or given_up != self._given_up:
            return
        self._marks.post(self._group, ends)
        self._marked.update(ends)
        self.post_marks()
