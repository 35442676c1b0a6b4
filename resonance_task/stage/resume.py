"""Where a partition taken over resumes: the committed offset, or further where its offset
mark says work was done since, without redoing what the mark names done."""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from resonance_task.pipeline import metrics
from resonance_task.pipeline.offset_marks import Mark
from resonance_task.stage.offsets import Offsets, Records, Segment
from resonance_task.stage.options import Replay

log = logging.getLogger(__name__)


class _Resume:
    """Where a partition taken by this stage resumes: known at its first fetch."""

    __slots__ = ("done_below", "mark")

    def __init__(self, mark: Mark | None) -> None:
        self.mark = mark  # from offset marks; valid only if within the partition
        self.done_below: int | None = None


class Resumption:
    """Applies at a taken partition's first fetches, then steps aside."""

    def __init__(self, stage: str, *, per_record: bool, replay: Replay | None) -> None:
        self._stage = stage
        self._per_record = per_record
        self._replay = replay
        self._resuming: dict[TopicPartition, _Resume] = {}
        # Per partition taken over: what its mark says is done past where work resumes.
        self._done_past: dict[TopicPartition, Mark] = {}

    @property
    def resuming(self) -> bool:
        return bool(self._resuming)

    @property
    def skipping(self) -> bool:
        return bool(self._done_past)

    def assigned(self, assigned: set[TopicPartition], marks: dict[TopicPartition, Mark]) -> None:
        replaying = self._replay is not None and self._replay.records > 0
        self._resuming = {tp: _Resume(marks.get(tp)) for tp in assigned if tp in marks or replaying}

    def forget(self, tps: set[TopicPartition] | None) -> None:
        if tps is None:
            self._resuming, self._done_past = {}, {}
            return
        for tp in tps:
            self._resuming.pop(tp, None)
            self._done_past.pop(tp, None)

    def resume(
        self, consumer: AIOKafkaConsumer, offsets: Offsets, fetched: dict[TopicPartition, Records]
    ) -> dict[TopicPartition, Records]:
        """Of a partition's first records since it was taken, keep only what is to be done.

        The first fetch starts at the committed offset; a valid mark moves the point where
        work resumes further. What lies before that point is shown to the replay policy
        (its `records` before it, fetched again for the purpose) and never handled again.
        """
        replay = self._replay.records if self._replay is not None else 0
        for tp, records in list(fetched.items()):
            resume = self._resuming.get(tp)
            if resume is None:
                continue
            if resume.done_below is None:
                start = records[0].offset
                mark = self._valid_mark(consumer, tp, start, resume.mark)
                resume.done_below = start
                if mark is not None and mark.below > start:
                    metrics.OFFSETS_SKIPPED.labels(self._stage).inc(mark.below - start)
                    offsets.skip(tp, mark.below)
                    resume.done_below = mark.below
                if mark is not None and self._per_record:
                    past = tuple((s, e) for s, e in mark.beyond if e > resume.done_below)
                    if past:
                        self._done_past[tp] = Mark(resume.done_below, past)
                wanted = max(0, resume.done_below - replay)
                if wanted != start:
                    # Back for the records to replay, or on past what is done: the consumer
                    # drops what it prefetched from elsewhere.
                    consumer.seek(tp, wanted)
                    del fetched[tp]
                    continue
            before = [r for r in records if r.offset < resume.done_below]
            if before and self._replay is not None and replay:
                self._replay.replayed(tp, before)
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
                self._stage,
                tp,
                mark.encode(),
                highwater,
            )
            return None
        return mark

    def skip_done_past(
        self, records: Records, segments: list[Segment]
    ) -> tuple[Records, list[Segment]]:
        """Of records just fetched, leave out those a taken partition's mark says are done
        past its prefix: done, in their place, and shown to the replay policy as done."""
        kept: Records = []
        kept_segments: list[Segment] = []
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
            metrics.OFFSETS_SKIPPED.labels(self._stage).inc(len(done))
            if self._replay is not None and self._replay.records:
                self._replay.replayed(tp, done)
        return kept, kept_segments
