"""Which fetched offsets have taken effect: a partition commits only its done prefix.

A batch (or, for a per-record stage, a record) is a segment of offsets; it is done when
its effect is (records acknowledged by the broker, a push acked by its gateway). Segments
end out of order; what commits is each partition's prefix of done segments, so a crash
redoes only what had not taken effect, and never skips what had not.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition

from resonance_task.pipeline.offset_marks import MAX_RANGES, Mark

# Open records looked through for done ranges past a partition's done prefix, per mark:
# bounds the cost of a mark when many records are in hand.
SCAN_SEGMENTS = 512

Records = list[ConsumerRecord[Any, Any]]


class Segment:
    """The offsets [start, end) one batch fetched from one partition."""

    __slots__ = ("done", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = False


class Offsets:
    """Which fetched offsets have taken effect; only a done prefix of a partition commits."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[Segment]] = {}
        self._done: dict[TopicPartition, int] = {}  # end of each partition's done prefix
        self._taken: dict[TopicPartition, int] = {}  # what `committable` last handed out

    def open(self, fetched: dict[TopicPartition, Records]) -> list[Segment]:
        segments = []
        for tp, records in fetched.items():
            segment = Segment(records[0].offset, records[-1].offset + 1)
            self._open.setdefault(tp, deque()).append(segment)
            segments.append(segment)
        return segments

    def open_each(self, fetched: dict[TopicPartition, Records]) -> list[Segment]:
        """One segment per record, in the order the records are handed to the stage."""
        segments = []
        for tp, records in fetched.items():
            opened = self._open.setdefault(tp, deque())
            for record in records:
                segment = Segment(record.offset, record.offset + 1)
                opened.append(segment)
                segments.append(segment)
        return segments

    def skip(self, tp: TopicPartition, end: int) -> None:
        """Offsets below `end` are done without being handled here (an offset mark said so)."""
        segment = Segment(end, end)
        segment.done = True
        self._open.setdefault(tp, deque()).append(segment)

    @staticmethod
    def close(segments: Iterable[Segment]) -> None:
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
