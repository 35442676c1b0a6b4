"""Own-group stages: offsets commit only after the effect, in order, and survive a failure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.dlq import H_ERROR, H_REASON, DeadLetters
from resonance_task.pipeline.offset_marks import MAX_RANGES, Mark, OffsetMarks
from resonance_task.stage import GroupConsumer, Offsets, Records, Replay, StageOptions, flow
from resonance_task.stage.flow import REFILL_SECONDS
from tests.kafka import group_config, make_topic, produce, until


def fetched(tp: TopicPartition, first: int, last: int) -> dict[TopicPartition, Records]:
    def record(offset: int) -> ConsumerRecord[Any, Any]:
        return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"", b"", None, 0, 0, ())

    return {tp: [record(first), record(last)]}


def test_only_a_done_prefix_of_a_partition_commits() -> None:
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    offsets = Offsets()
    first = offsets.open({**fetched(a, 0, 9), **fetched(b, 0, 4)})
    second = offsets.open(fetched(a, 10, 19))
    Offsets.close(second)  # the later batch finished first
    assert offsets.committable() == {}
    Offsets.close(first)
    assert offsets.committable() == {a: 20, b: 5}
    assert offsets.committable() == {}  # handed out once
    third = offsets.open(fetched(a, 20, 29))
    offsets.forget([a])  # revoked: its batch may still finish, it must not commit
    Offsets.close(third)
    assert offsets.committable() == {}


def test_a_mark_names_the_records_done_past_the_prefix() -> None:
    a = TopicPartition("t", 0)
    offsets = Offsets()
    # Records 0..9, one segment each, as a per-record stage opens them.
    segments = offsets.open_each({a: [fetched(a, o, o)[a][0] for o in range(10)]})
    for done in (0, 1, 3, 4, 5, 8):
        segments[done].done = True
    assert offsets.done_marks() == {a: Mark(2, ((3, 6), (8, 9)))}
    segments[2].done = True
    assert offsets.done_marks() == {a: Mark(6, ((8, 9),))}


def test_a_mark_keeps_at_most_its_share_of_ranges() -> None:
    a = TopicPartition("t", 0)
    offsets = Offsets()
    segments = offsets.open_each({a: [fetched(a, o, o)[a][0] for o in range(400)]})
    for segment in segments[1::2]:  # every other record, the first not
        segment.done = True
    (mark,) = offsets.done_marks().values()
    assert mark.below == 0 and len(mark.beyond) == MAX_RANGES
    assert mark.beyond[:2] == ((1, 2), (3, 4))


def test_marks_read_back_as_written_and_old_or_foreign_values_safely() -> None:
    mark = Mark(7, ((9, 12), (20, 21)))
    assert mark.encode() == "7;9-12,20-21"
    assert Mark.decode(mark.encode()) == mark
    assert Mark.decode("41") == Mark(41)  # as every mark was written before ranges
    assert Mark.decode("41;") == Mark(41)
    # Ranges that overlap, run backwards or are not numbers say nothing past the prefix.
    for broken in ("7;5-9", "7;9-9", "7;9-12,11-14", "7;x-9", "7;9"):
        assert Mark.decode(broken) == Mark(7), broken
    for foreign in ("", "-3", "abc", "1.5"):
        assert Mark.decode(foreign) is None, foreign
    assert mark.covers(6) and mark.covers(10) and mark.covers(20)
    assert not mark.covers(7) and not mark.covers(12) and not mark.covers(21)


class Held(GroupConsumer):
    """Each batch's effect is a future the test resolves (or fails) by hand."""

    def __init__(self, **kwargs: Any) -> None:
        self.seen: list[bytes] = []
        self.effects: list[asyncio.Future[None]] = []
        super().__init__(stage="test", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += [r.value for r in records]
        effect: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.effects.append(effect)
        return effect


async def committed(broker: EmbeddedBroker, group: str, tps: list[TopicPartition]) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group)
    await consumer.start()
    try:
        return sum([await consumer.committed(tp) or 0 for tp in tps])
    finally:
        await consumer.stop()


async def test_offsets_after_effect_and_a_failed_batch_is_done_again(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.stage", f"{tag}-group"
    await make_topic(broker, topic, 2)
    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(100)])
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    stage = Held(
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, group),
            batch_max_records=30,
            max_pending_batches=2,
        )
    )
    await stage.start()
    try:
        # Two batches in hand, no more: the stage waits for their effects (backpressure).
        await until(lambda: len(stage.effects) == 2)
        await asyncio.sleep(0.5)
        assert len(stage.effects) == 2 and len(stage.seen) == 60
        assert await committed(broker, group, tps) == 0
        stage.effects[0].set_exception(ConnectionError("the effect failed"))
        # The consumer restarts from the committed offsets (none yet): all is read again.
        await until(lambda: stage.restarts == 1)

        def settle_all() -> bool:
            for effect in stage.effects:
                if not effect.done():
                    effect.set_result(None)
            return len(stage.seen) >= 160 and stage.pending_batches == 0

        await until(settle_all)
        assert sorted(stage.seen[60:]) == sorted(f"r{i}".encode() for i in range(100))
    finally:
        await stage.stop()
    assert await committed(broker, group, tps) == 100


class OneSlow(GroupConsumer):
    """Per-record effects: the first record of partition 0 is held, the rest settle."""

    per_record = True

    def __init__(self, **kwargs: Any) -> None:
        self.seen = 0
        self.held: asyncio.Future[None] | None = None
        super().__init__(stage="test-each", **kwargs)

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        effects: list[Awaitable[object] | None] = []
        for record in records:
            self.seen += 1
            if record.partition == 0 and record.offset == 0:
                self.held = asyncio.get_running_loop().create_future()
                effects.append(self.held)
            else:
                effects.append(None)
        return effects


async def test_one_slow_record_holds_back_only_its_own_partition(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.each", f"{tag}-each"
    await make_topic(broker, topic, 2)
    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(100)])
    config = group_config(broker, group)
    stage = OneSlow(
        options=StageOptions(topics=(topic,), consumer_config=config, batch_max_records=10)
    )
    await stage.start()
    try:
        await until(lambda: stage.seen == 100)  # the held record stopped no fetch
        p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        await until(lambda: stage.pending_batches == 1)
        # Partition 1 commits all of its records while partition 0 commits none of them.
        await until_async(lambda: _committed_is(broker, group, p1, 50))
        assert await committed(broker, group, [p0]) == 0
        assert stage.held is not None
        stage.held.set_result(None)
        await until_async(lambda: _committed_is(broker, group, p0, 50))
    finally:
        await stage.stop()


class HoldsAll(GroupConsumer):
    """Per-record effects, each held until the test settles it."""

    per_record = True

    def __init__(self, **kwargs: Any) -> None:
        self.held: list[asyncio.Future[None]] = []
        super().__init__(stage="test-holds", **kwargs)

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        loop = asyncio.get_running_loop()
        effects = [loop.create_future() for _ in records]
        self.held += effects
        return list(effects)

    def settle(self, count: int) -> None:
        for effect in [f for f in self.held if not f.done()][:count]:
            effect.set_result(None)


async def test_a_per_record_stage_holds_at_most_its_records_limit(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.holds", f"{tag}-holds"
    await make_topic(broker, topic, 2)
    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(100)])
    config = group_config(broker, group)
    stage = HoldsAll(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=25, max_pending_records=40
        )
    )
    await stage.start()
    try:
        await until(lambda: len(stage.held) == 40)  # fetches stop at the limit, not past it
        # One ended is not room enough for a fetch (a record at a time would cost a fetch
        # each), not soon after the last one; a quarter of the limit is.
        stage.settle(1)
        await asyncio.sleep(0.3)
        assert len(stage.held) == 40
        stage.settle(9)
        await until(lambda: len(stage.held) == 50)
        assert stage.pending_batches == 40
        # Records that end slowly: once REFILL_SECONDS passed, whatever is free is fetched.
        stage.settle(1)
        started = time.monotonic()
        await until(lambda: len(stage.held) == 51)
        assert time.monotonic() - started >= REFILL_SECONDS - 0.3
        assert stage.pending_batches == 40
        while len(stage.held) < 100:
            stage.settle(40)
            await asyncio.sleep(0.05)
        stage.settle(40)
        p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
        await until_async(lambda: _committed_is(broker, group, p0, 50))
        await until_async(lambda: _committed_is(broker, group, p1, 50))
    finally:
        await stage.stop()


class Poisoned(GroupConsumer):
    """Every batch fails: a poison record no restart gets past."""

    def __init__(self, **kwargs: Any) -> None:
        self.seen = 0
        self.start_failures = 0
        super().__init__(stage="test-poison", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += len(records)
        raise ValueError("poison")

    async def _start_consumer(self) -> None:
        if self.restarts and self.start_failures < 2:
            # The broker refuses the fresh consumer twice: the stage must not die of it.
            self.start_failures += 1
            raise ConnectionError("broker unreachable")
        await super()._start_consumer()


async def test_a_stage_that_cannot_get_past_a_batch_backs_off_and_stays_alive(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.poison", f"{tag}-poison"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"poison")])
    config = group_config(broker, group)
    stage = Poisoned(
        options=StageOptions(topics=(topic,), consumer_config=config, batch_max_records=10)
    )
    await stage.start()
    try:
        await until(lambda: stage.restarts >= 1)
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(4.0)
        # Backoff steps 0.2, 0.4, 0.8, 1.6, ... s, each wait at least half its step: at most
        # 7 restarts in 4 s. Empty fetches between two failures (a fresh consumer's first
        # ones) must not reset it to a restart every 0.1 s (40 of them).
        assert stage.restarts <= 8, (stage.restarts, asyncio.get_running_loop().time() - started)
        # The broker refused the fresh consumer twice; the third reads the poison again
        # (once it has joined: on a busy box that takes seconds).
        await until(lambda: stage.seen >= 2, 30)
        assert stage.start_failures == 2 and stage.alive
    finally:
        await stage.stop()
    assert not stage.alive


class Gated(GroupConsumer):
    def __init__(self, **kwargs: Any) -> None:
        self.seen = 0
        super().__init__(stage="test-gated", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += len(records)
        return None


async def test_nothing_is_consumed_before_what_the_stage_decides_with_is_in_place(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.gated", f"{tag}-gated"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"r")])
    views_current = asyncio.Event()
    config = group_config(broker, group)
    stage = Gated(
        options=StageOptions(topics=(topic,), consumer_config=config, batch_max_records=10),
        gate=views_current.wait,
    )
    await stage.start()
    try:
        await until(lambda: stage.joined)  # the group join does not wait
        await asyncio.sleep(1.0)
        assert stage.seen == 0
        views_current.set()
        await until(lambda: stage.seen == 1)
    finally:
        await stage.stop()
    # A stage stopped while still waiting stops at once.
    never = Gated(
        options=StageOptions(
            topics=(topic,),
            consumer_config={**config, "group_id": f"{group}-2"},
            batch_max_records=10,
        ),
        gate=asyncio.Event().wait,
    )
    await never.start()
    await asyncio.wait_for(never.stop(), 10)


class Stuck(GroupConsumer):
    """A batch whose store never answers: handle retries for ever."""

    def __init__(self, **kwargs: Any) -> None:
        self.seen = 0
        super().__init__(stage="test-stuck", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += len(records)
        await asyncio.Event().wait()
        return None


async def test_stop_ends_by_the_drain_deadline_even_with_a_batch_that_cannot_finish(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.stuck", f"{tag}-stuck"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"r")])
    stage = Stuck(
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, group),
            batch_max_records=10,
            drain_seconds=1.0,
        )
    )
    await stage.start()
    await until(lambda: stage.seen == 1)
    started = time.monotonic()
    await asyncio.wait_for(stage.stop(), 10)
    assert time.monotonic() - started < 5  # the 1 s deadline, and the consumer's close
    assert await committed(broker, group, [TopicPartition(topic, 0)]) == 0  # never done


class Done(GroupConsumer):
    """Every batch takes effect at once; commits wait on `commits_open` (shut: a worker
    killed before its next Kafka commit)."""

    def __init__(self, replay_records: int = 0, **kwargs: Any) -> None:
        self.seen: list[bytes] = []
        self.replays: dict[int, list[int]] = {}
        self.commits_open = asyncio.Event()
        super().__init__(
            stage="test-marks",
            before_commit=self._commit_allowed,
            replay=Replay(replay_records, self.replayed),
            **kwargs,
        )

    async def _commit_allowed(self) -> None:
        await self.commits_open.wait()

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += [r.value for r in records]
        return None

    def replayed(self, tp: TopicPartition, records: Records) -> None:
        self.replays.setdefault(tp.partition, []).extend(r.offset for r in records)

    async def kill(self) -> None:
        await _kill(self)


async def _kill(stage: GroupConsumer) -> None:
    """What SIGKILL leaves: no drain, no final commit, the group left uncommitted."""
    for task in (stage._consume_task, stage._committing):
        if task is not None:
            task.cancel()
    if stage._consumer is not None:
        await stage._consumer.stop()


async def test_a_successor_starts_from_the_marks_not_the_older_commit(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    topic, group = f"{tag}.marked", f"{tag}-group"
    tps, marks, config = await _done_marked_and_killed(broker, tag, redis_url, topic, group)
    assert await committed(broker, group, tps) == 0  # Kafka never heard of the work

    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(100, 110)])
    second = Done(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=30, marks=marks
        )
    )
    await _handles_only(second, range(100, 110))
    assert await committed(broker, group, tps) == 110
    await marks.close()


async def test_a_mark_at_the_end_of_the_last_producer_batch_is_honoured(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    # What a SIGKILL leaves when nothing new arrives before the successor starts: the
    # mark is the partition's end. Tansu's ListOffsets(latest) answers the first offset of
    # the last batch + 1, so a check of the mark against it threw the mark away whenever
    # the producer had batched (every partition here is one batch of 50).
    topic, group = f"{tag}.caught-up", f"{tag}-group"
    tps, marks, config = await _done_marked_and_killed(broker, tag, redis_url, topic, group)

    second = Done(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=30, marks=marks
        )
    )
    await _handles_only(second, range(100, 104), produce_once_assigned=(broker, topic))
    assert await committed(broker, group, tps) == 104
    await marks.close()


async def test_a_successor_replays_the_records_before_its_resume_point_without_redoing_them(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    topic, group = f"{tag}.replayed", f"{tag}-group"
    _, marks, config = await _done_marked_and_killed(broker, tag, redis_url, topic, group)

    second = Done(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=30, marks=marks
        ),
        replay_records=10,
    )
    await _handles_only(second, range(100, 104), produce_once_assigned=(broker, topic))
    # The ten records before the mark of each partition, in order, once.
    assert second.replays == {0: list(range(40, 50)), 1: list(range(40, 50))}
    await marks.close()


async def test_a_mark_beyond_the_end_of_a_partition_is_ignored(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    topic, group = f"{tag}.recreated", f"{tag}-group"
    await make_topic(broker, topic, 2)
    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(20)])
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    marks = OffsetMarks(redis_url, tag)
    await marks.save(group, dict.fromkeys(tps, 5_000))  # left by an older incarnation
    stage = Done(
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, group),
            batch_max_records=30,
            marks=marks,
        )
    )
    stage.commits_open.set()
    await stage.start()
    try:
        await until(lambda: len(stage.seen) == 20)
    finally:
        await stage.stop()
        await marks.close()


class EachHeld(GroupConsumer):
    """Per record; the effects of the records in `held` wait for the test, the rest end at
    once; commits wait on `commits_open`, as `Done`'s do."""

    per_record = True

    def __init__(self, held: set[bytes], replay_records: int = 0, **kwargs: Any) -> None:
        self.seen: list[bytes] = []
        self.held = held
        self.replays: dict[int, list[int]] = {}
        self.commits_open = asyncio.Event()
        super().__init__(
            stage="test-each-marks",
            before_commit=self._commit_allowed,
            replay=Replay(replay_records, self.replayed),
            **kwargs,
        )

    async def _commit_allowed(self) -> None:
        await self.commits_open.wait()

    async def handle_each(self, records: Records) -> list[Awaitable[object] | None]:
        self.seen += [r.value for r in records]
        loop = asyncio.get_running_loop()
        return [loop.create_future() if r.value in self.held else None for r in records]

    def replayed(self, tp: TopicPartition, records: Records) -> None:
        self.replays.setdefault(tp.partition, []).extend(r.offset for r in records)

    async def kill(self) -> None:
        await _kill(self)


async def test_a_successor_skips_what_was_done_past_the_prefix_of_out_of_order_records(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    # Pushes settle when their own gateway answers: records behind a slow one are done
    # before it. Their successor must not push them again, only the one still waiting.
    topic, group = f"{tag}.out-of-order", f"{tag}-group"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, f"r{i}".encode()) for i in range(50)])
    tp = TopicPartition(topic, 0)
    marks = OffsetMarks(redis_url, tag)
    config = group_config(broker, group)
    first = EachHeld(
        {b"r10", b"r30"},
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=20, marks=marks
        ),
    )
    await first.start()
    await until(lambda: len(first.seen) == 50)
    want = Mark(10, ((11, 30), (31, 50)))

    async def marked() -> bool:
        return (await marks.load_marks(group, [tp])).get(tp) == want

    await until_async(marked)
    await first.kill()

    second = EachHeld(
        set(),
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=20, marks=marks
        ),
        replay_records=5,
    )
    second.commits_open.set()
    await second.start()
    try:
        await until(lambda: len(second.seen) >= 2)
        await asyncio.sleep(1.0)  # what it would redo, it would have fetched by now
        assert second.seen == [b"r10", b"r30"]
        # The records before the prefix it replays, then those it skipped past it.
        assert second.replays == {0: [5, 6, 7, 8, 9, *range(11, 30), *range(31, 50)]}
        await until_async(lambda: _committed_is(broker, group, tp, 50))
    finally:
        await second.stop()
        await marks.close()


async def _committed_is(broker: EmbeddedBroker, group: str, tp: TopicPartition, want: int) -> bool:
    return await committed(broker, group, [tp]) == want


async def _done_marked_and_killed(
    broker: EmbeddedBroker, tag: str, redis_url: str, topic: str, group: str
) -> tuple[list[TopicPartition], OffsetMarks, dict[str, Any]]:
    """100 records over 2 partitions, done and marked by a stage then killed uncommitted."""
    await make_topic(broker, topic, 2)
    await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in range(100)])
    tps = [TopicPartition(topic, p) for p in (0, 1)]
    marks = OffsetMarks(redis_url, tag)
    config = group_config(broker, group)
    first = Done(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=30, marks=marks
        )
    )
    await first.start()
    await until(lambda: len(first.seen) == 100)
    await until_async(lambda: _marked(marks, group, tps, 100))
    await first.kill()
    return tps, marks, config


async def _handles_only(
    stage: Done, new: range, produce_once_assigned: tuple[EmbeddedBroker, str] | None = None
) -> None:
    """Run a successor until it has handled `new` (produced already, or to the given
    broker and topic once it has its partitions); it must handle nothing else."""
    stage.commits_open.set()
    await stage.start()
    try:
        if produce_once_assigned is not None:
            await until(lambda: stage.assigned)
            await asyncio.sleep(1.0)  # what it would redo, it would have fetched by now
            broker, topic = produce_once_assigned
            await produce(broker, topic, [(i % 2, f"r{i}".encode()) for i in new])
        await until(lambda: len(stage.seen) >= len(new))
        await asyncio.sleep(0.5)
        assert sorted(stage.seen) == sorted(f"r{i}".encode() for i in new)
    finally:
        await stage.stop()


async def _marked(marks: OffsetMarks, group: str, tps: list[TopicPartition], total: int) -> bool:
    return sum((await marks.load(group, tps)).values()) == total


async def until_async(check: Callable[[], Awaitable[bool]], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


class Letters:
    """A DeadLetters' send that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, dict[str, bytes]]] = []

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> None:
        self.sent.append((topic, value, dict(headers)))


class PoisonInBatch(GroupConsumer):
    """A batch holding b"poison" fails with `error` every time (a bug, bad data)."""

    def __init__(self, error: Exception, fails: int = 1_000_000, **kwargs: Any) -> None:
        self.done: set[bytes] = set()
        self.error = error
        self.fails = fails
        super().__init__(stage="test-poison", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        values = [r.value for r in records]
        if b"poison" in values and self.fails > 0:
            self.fails -= 1
            raise self.error
        self.done.update(values)
        return None


async def test_a_record_that_fails_every_batch_it_is_in_is_dead_lettered_alone(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.poison", f"{tag}-group"
    await make_topic(broker, topic, 2)
    values = [f"r{i}".encode() for i in range(60)]
    values[21] = b"poison"
    await produce(broker, topic, [(i % 2, v) for i, v in enumerate(values)])
    letters = Letters()
    stage = PoisonInBatch(
        ValueError("cannot handle this"),
        options=StageOptions(
            topics=(topic,), consumer_config=group_config(broker, group), batch_max_records=30
        ),
        dead_letters=DeadLetters(letters),
    )
    await stage.start()
    try:
        await until(lambda: len(stage.done) == 59, seconds=30)
    finally:
        await stage.stop()
    assert stage.done == set(values) - {b"poison"}
    ((dlq, value, headers),) = letters.sent
    assert dlq == f"{topic}.dlq" and value == b"poison"
    assert headers[H_REASON] == b"stage_failed" and b"cannot handle this" in headers[H_ERROR]
    assert await committed(broker, group, [TopicPartition(topic, p) for p in (0, 1)]) == 60


async def test_a_transient_error_is_never_dead_lettered(broker: EmbeddedBroker, tag: str) -> None:
    topic, group = f"{tag}.flaky", f"{tag}-group"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"a"), (0, b"poison"), (0, b"b")])
    letters = Letters()
    stage = PoisonInBatch(
        ConnectionError("the store is away"),
        fails=5,  # more restarts than ISOLATE_AFTER, then the store is back
        options=StageOptions(
            topics=(topic,), consumer_config=group_config(broker, group), batch_max_records=30
        ),
        dead_letters=DeadLetters(letters),
    )
    await stage.start()
    try:
        await until(lambda: stage.done == {b"a", b"poison", b"b"}, seconds=30)
    finally:
        await stage.stop()
    assert letters.sent == [] and stage.restarts == 5


class NeverAcked(GroupConsumer):
    """The first batch's effect never ends (a send to a broker that lost the partition);
    later ones end at once."""

    def __init__(self, **kwargs: Any) -> None:
        self.seen = 0
        self.stuck: asyncio.Future[None] | None = None
        super().__init__(stage="test-overdue", **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        self.seen += len(records)
        if self.stuck is None:
            self.stuck = asyncio.get_running_loop().create_future()
            return self.stuck
        return None


async def test_an_effect_past_its_timeout_restarts_the_stage_without_cancelling_it(
    broker: EmbeddedBroker, tag: str
) -> None:
    topic, group = f"{tag}.overdue", f"{tag}-overdue"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"r")])
    stage = NeverAcked(
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, group),
            batch_max_records=10,
            effect_timeout=1.0,
        )
    )
    await stage.start()
    try:
        # Past the timeout the stage restarts from its committed offset: the record again.
        await until(lambda: stage.seen >= 2, 20)
        await until(lambda: stage.restarts >= 1)
        assert stage.stuck is not None and not stage.stuck.cancelled()  # forgotten only
        tp = TopicPartition(topic, 0)

        async def done() -> bool:  # the second time the record took effect
            return await committed(broker, group, [tp]) == 1

        await until_async(done)
    finally:
        await stage.stop()


class DeadLettersBad(Done):
    """Dead-letters every record whose value is b"bad"; the rest take effect at once."""

    def __init__(self, letters: DeadLetters, options: StageOptions, **kwargs: Any) -> None:
        self.bad = letters
        super().__init__(options=replace(options, letters=letters), **kwargs)

    async def handle(self, records: Records) -> Awaitable[object] | None:
        for record in records:
            if record.value == b"bad":
                await self.bad.put(record, "decode_error", "not a record")
        return await super().handle(records)


async def _lettering(
    broker: EmbeddedBroker, tag: str, redis_url: str, name: str, send: Any
) -> tuple[DeadLettersBad, OffsetMarks, str, TopicPartition]:
    """A stage (not started) over ok, bad, ok, whose letters go to `send`, with marks."""
    topic, group = f"{tag}.{name}", f"{tag}-group"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, b"ok"), (0, b"bad"), (0, b"ok")])
    marks = OffsetMarks(redis_url, tag)
    stage = DeadLettersBad(
        DeadLetters(send),
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, group),
            batch_max_records=10,
            marks=marks,
        ),
    )
    return stage, marks, group, TopicPartition(topic, 0)


async def test_a_mark_waits_for_the_dead_letters_of_what_it_says_is_done(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    # A successor starting from a mark never reads what lies before it again: a letter
    # the broker did not have yet would be lost with a SIGKILL.
    broker_ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(topic: str, key: bytes | None, value: bytes | None, headers: Any) -> Any:
        return broker_ack  # queued; acknowledged when the test says

    stage, marks, group, tp = await _lettering(broker, tag, redis_url, "lettered", send)
    await stage.start()
    try:
        await until(lambda: len(stage.seen) == 3)
        await asyncio.sleep(0.5)  # a mark would have been written by now
        assert await marks.load(group, [tp]) == {}
        broker_ack.set_result(None)
        await until_async(lambda: _marked(marks, group, [tp], 3))
    finally:
        stage.commits_open.set()
        await stage.stop()
        await marks.close()


async def test_a_letter_the_broker_refused_holds_back_commits_and_marks_until_sent_again(
    broker: EmbeddedBroker, tag: str, redis_url: str
) -> None:
    # Refused before any commit awaited it: neither the commit nor a mark may go past the
    # record; the stage restarts from its committed offset and sends the letter again.
    tries: list[bytes | None] = []

    async def send(topic: str, key: bytes | None, value: bytes | None, headers: Any) -> Any:
        tries.append(value)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if len(tries) == 1:
            ack.set_exception(ConnectionError("the broker refused the letter"))
        else:
            ack.set_result(None)
        return ack

    stage, marks, group, tp = await _lettering(broker, tag, redis_url, "refused", send)
    stage.commits_open.set()
    await stage.start()
    try:
        await until(lambda: len(tries) == 2)
        await until_async(lambda: _marked(marks, group, [tp], 3))
        assert stage.restarts >= 1
        assert stage.seen.count(b"bad") == 2  # redone from the committed offset
    finally:
        await stage.stop()
        await marks.close()
    assert await committed(broker, group, [tp]) == 3


class CountsAssignments(HoldsAll):
    def __init__(self, **kwargs: Any) -> None:
        self.assignments = 0
        super().__init__(**kwargs)

    def given(self, tps: set[TopicPartition]) -> None:
        self.assignments += 1


async def test_a_stage_full_for_longer_than_the_poll_interval_keeps_its_partitions(
    broker: EmbeddedBroker, tag: str, monkeypatch: Any
) -> None:
    # Every slot taken by a task that runs for minutes: the stage fetches nothing, yet it
    # must poll, or aiokafka leaves the group after max_poll_interval_ms and the
    # partitions move away from the records in hand.
    monkeypatch.setattr(flow, "KEEPALIVE_SECONDS", 0.3)
    topic, group = f"{tag}.full", f"{tag}-full"
    await make_topic(broker, topic, 1)
    await produce(broker, topic, [(0, f"r{i}".encode()) for i in range(6)])
    config = {**group_config(broker, group), "max_poll_interval_ms": 1500}
    stage = CountsAssignments(
        options=StageOptions(
            topics=(topic,), consumer_config=config, batch_max_records=2, max_pending_records=2
        )
    )
    await stage.start()
    try:
        await until(lambda: len(stage.held) == 2)
        await asyncio.sleep(4)  # well past the poll interval, full all along
        assert len(stage.held) == 2, "a full stage fetched"
        while len(stage.held) < 6:
            stage.settle(2)
            await asyncio.sleep(0.05)
        stage.settle(2)
        await until_async(lambda: _committed_is(broker, group, TopicPartition(topic, 0), 6))
        assert stage.assignments == 1, "the stage left its group and joined again"
    finally:
        await stage.stop()
