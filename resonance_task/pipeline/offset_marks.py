"""Where each stage's done work ends, per partition, kept in Redis between Kafka commits.

A Kafka offset commit costs a broker round trip (~50 ms on Tansu), so the group's
committed offsets trail what a stage has finished, and a SIGKILLed worker's successor
redoes that tail: pushes a gateway sees twice. A Redis write costs a fraction of a
millisecond, so each stage also marks here the end of its done prefix as soon as it
moves; a worker that takes a partition starts from the later of the two.

A mark only ever says "everything before this offset took effect" and, for a stage whose
records take effect out of order (pushes, each acknowledged by its own gateway), "and so
did these ranges past it", so starting from it skips nothing undone (a stage posts a
mark once the broker has the dead letters of the records it names). It is a hint:
without Redis the stage runs on Kafka's offsets alone, and a mark beyond the partition's
end (the topic was recreated) is ignored.

Why the ranges: a push record waits for its gateway's acknowledgement, and the records
behind it, for gateways that answered sooner, are done but not part of the prefix. A
successor killed in would push them all again: at a replacement's catch-up rate, about a
gateway round trip's worth of pushes per kill.

Marks are written by a thread of their own, with a blocking client. On the event loop a
write waits for a loop turn to be sent and another for its reply, and a worker catching
up runs turns of 20-90 ms (measured): a push acknowledged 150 ms before a SIGKILL was
still unmarked, and the next owner pushed it again. The thread writes as soon as a mark
moves; the latest mark of each partition wins, so a burst of moves is one write.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis
from aiokafka import TopicPartition

from resonance_task.stores.redis_client import connect, connect_sync

log = logging.getLogger(__name__)

MARK_TTL_SECONDS = 7 * 24 * 3600
RETRY_SECONDS = 1.0  # between writes while Redis fails: marks are hints, Kafka commits hold
# Between two writes: a burst of moves is one write, and the thread takes the GIL at most
# this often (woken per move, it cost the 1:1 pipeline a fifth of its throughput).
WRITE_INTERVAL_SECONDS = 0.005
# Ranges kept past the prefix: bounds a mark's size (a few hundred bytes); what does not fit
# is redone by a successor, as without ranges.
MAX_RANGES = 64


@dataclass(frozen=True, slots=True)
class Mark:
    """Offsets below `below` are done, and so are the [start, end) `beyond` ranges past it."""

    below: int
    beyond: tuple[tuple[int, int], ...] = ()

    def encode(self) -> str:
        if not self.beyond:
            return str(self.below)  # what every mark was before ranges: readers of old marks
        return f"{self.below};" + ",".join(f"{s}-{e}" for s, e in self.beyond)

    @classmethod
    def decode(cls, text: str) -> Mark | None:
        """None for anything else than a mark (a field written by hand, another version)."""
        below, _, ranges = text.partition(";")
        if not below.isdigit():
            return None
        beyond: list[tuple[int, int]] = []
        floor = int(below)
        for part in filter(None, ranges.split(",")):
            start, _, end = part.partition("-")
            if not (start.isdigit() and end.isdigit()) or not floor < int(start) < int(end):
                return cls(int(below))  # the prefix holds alone; ranges are only a hint
            beyond.append((int(start), int(end)))
            floor = int(end)
        return cls(int(below), tuple(beyond))

    @property
    def end(self) -> int:
        """Where what it says ends: everything from here on is not known to be done."""
        return self.beyond[-1][1] if self.beyond else self.below

    def covers(self, offset: int) -> bool:
        return offset < self.below or any(s <= offset < e for s, e in self.beyond)


def _as_mark(offset: int | Mark) -> Mark:
    return Mark(offset) if isinstance(offset, int) else offset


class OffsetMarks:
    def __init__(self, url: str, prefix: str, *, timeout: float = 2.0) -> None:
        self._redis = connect(url, timeout=timeout, decode_responses=True)
        self._prefix = prefix
        self._url = url
        self._timeout = timeout
        self._lock = threading.Lock()
        self._due: dict[tuple[str, TopicPartition], Mark] = {}
        self._wake = threading.Event()
        self._closing = False
        self._failing = False  # the last write failed: closing does not wait for Redis
        self._writer: threading.Thread | None = None

    def _key(self, group: str, topic: str) -> str:
        return f"{self._prefix}:offsets:{{{group}}}:{topic}"

    def post(self, group: str, offsets: Mapping[TopicPartition, int | Mark]) -> None:
        """Save these marks soon, off the event loop; returns at once."""
        with self._lock:
            for tp, offset in offsets.items():
                self._due[(group, tp)] = _as_mark(offset)
            if self._writer is None and not self._closing:
                self._writer = threading.Thread(
                    target=self._write_loop, name="offset-marks", daemon=True
                )
                self._writer.start()
        self._wake.set()

    def forget(self, group: str, tps: Iterable[TopicPartition] | None = None) -> None:
        """Drop `group`'s marks not yet written, of `tps` (all without): partitions given
        up. Written late, a mark would overwrite the newer one of their next owner."""
        with self._lock:
            gone = set(tps) if tps is not None else None
            self._due = {
                (g, tp): offset
                for (g, tp), offset in self._due.items()
                if g != group or (gone is not None and tp not in gone)
            }

    def _write_loop(self) -> None:
        client = connect_sync(self._url, timeout=self._timeout)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    due, self._due = self._due, {}
                if due:
                    try:
                        self._write(client, due)
                        self._failing = False
                    except Exception as exc:
                        self._failing = True
                        log.warning("offset marks not saved: %r", exc)
                        with self._lock:
                            self._due = {**due, **self._due}  # newer marks win
                        time.sleep(RETRY_SECONDS)
                        self._wake.set()
                with self._lock:
                    if self._closing and (not self._due or self._failing):
                        return
                time.sleep(WRITE_INTERVAL_SECONDS)
        finally:
            client.close()

    def _fields(self, due: Mapping[tuple[str, TopicPartition], Mark]) -> dict[str, dict[str, str]]:
        """Marks by Redis key: one hash per (group, topic), a field per partition."""
        by_key: dict[str, dict[str, str]] = {}
        for (group, tp), mark in due.items():
            by_key.setdefault(self._key(group, tp.topic), {})[str(tp.partition)] = mark.encode()
        return by_key

    def _write(self, client: redis.Redis, due: Mapping[tuple[str, TopicPartition], Mark]) -> None:
        pipe = client.pipeline(transaction=False)
        for key, fields in self._fields(due).items():
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, MARK_TTL_SECONDS)
        pipe.execute()

    async def save(self, group: str, offsets: Mapping[TopicPartition, int | Mark]) -> None:
        """Save these marks now (a test's or a tool's; stages post theirs)."""
        due = {(group, tp): _as_mark(o) for tp, o in offsets.items()}
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, fields in self._fields(due).items():
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, MARK_TTL_SECONDS)
            await pipe.execute()

    async def load(self, group: str, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Each partition's done prefix."""
        return {tp: mark.below for tp, mark in (await self.load_marks(group, tps)).items()}

    async def load_marks(
        self, group: str, tps: Iterable[TopicPartition]
    ) -> dict[TopicPartition, Mark]:
        tps = list(tps)
        out: dict[TopicPartition, Mark] = {}
        for topic in {tp.topic for tp in tps}:
            mine = [tp for tp in tps if tp.topic == topic]
            values = await self._redis.hmget(
                self._key(group, topic), [str(tp.partition) for tp in mine]
            )
            for tp, value in zip(mine, values, strict=True):
                if isinstance(value, bytes):
                    value = value.decode(errors="replace")
                mark = Mark.decode(value) if value is not None else None
                if mark is not None:
                    out[tp] = mark
        return out

    async def close(self) -> None:
        # What was posted is written before the thread ends (bounded by the timeouts).
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join, 2 * self._timeout + RETRY_SECONDS)
        await self._redis.aclose()
