"""Flow control: the effects a stage has in hand, and when it may fetch more.

A batch stage holds up to `max_pending_batches` effects; a per-record stage up to
`max_pending_bytes` and `max_pending_records` of records. Past that the stage stops
fetching and Kafka is the buffer, while it still polls now and then so that its group
does not drop it. An effect that outlives `effect_timeout` fails the stage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from resonance_task.stage.options import StageOptions

REFILL_SECONDS = 1.0  # a full per-record stage fetches at least this often if room
# A stage with no room at all polls (taking nothing) at least this often: aiokafka leaves
# the group after max_poll_interval_ms (300 s by default) without a poll.
KEEPALIVE_SECONDS = 10.0


class InFlight:
    """An effect being waited for: the partitions it is about, its bytes, its deadline."""

    __slots__ = ("deadline", "size", "tps")

    def __init__(self, tps: list[TopicPartition], size: int, deadline: float) -> None:
        self.tps = tps
        self.size = size
        self.deadline = deadline


class FlowControl:
    def __init__(self, options: StageOptions, *, per_record: bool) -> None:
        self._per_record = per_record
        self._batch_max = options.batch_max_records
        self._max_pending = max(1, options.max_pending_batches)
        self._max_bytes = options.max_pending_bytes
        self._max_records = options.max_pending_records
        self._effect_timeout = options.effect_timeout
        # Effects in flight, oldest first: what they are about, their size, their deadline.
        self.pending: dict[asyncio.Future[Any], InFlight] = {}
        self._bytes = 0
        # What a full stage waits on: done by the effect that ends its being full. Waiting
        # on the effects themselves cost a callback added to and removed from each of them
        # (a thousand in hand: most of a task lane's own time) every time one ended.
        self._room: asyncio.Future[None] | None = None
        self.last_fetch = time.monotonic()
        self.last_poll = self.last_fetch

    def full(self) -> bool:
        if not self._per_record:
            return len(self.pending) >= self._max_pending
        if self._bytes >= self._max_bytes:
            return True
        limit = self._max_records
        if limit is None:
            return False
        if len(self.pending) >= limit:
            return True
        # Taken a quarter of the limit at a time: a record at a time would cost a fetch
        # and a step for each. Where records end slowly (long tasks in a lane given a
        # tenth of the slots) a quarter may take minutes: then whatever is free, at most
        # every REFILL_SECONDS, so that the consumer keeps polling (aiokafka leaves the
        # group after max_poll_interval_ms without a fetch).
        quarter = len(self.pending) > limit - max(1, limit // 4)
        return quarter and time.monotonic() - self.last_fetch < REFILL_SECONDS

    def fetch_size(self) -> int:
        """Records to take in the next fetch: a batch, or what the records limit leaves."""
        if self._per_record and self._max_records is not None:
            return min(self._batch_max, self._max_records - len(self.pending))
        return self._batch_max

    async def wait_for_room(self, consumer: AIOKafkaConsumer) -> None:
        """Backpressure: Kafka is the buffer while the records in hand take effect."""
        if time.monotonic() - self.last_poll >= KEEPALIVE_SECONDS:
            await self._poll_paused(consumer)
        self._room = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._room], timeout=0.2)
        self._room = None

    def _wake_if_room(self) -> None:
        if self._room is not None and not self._room.done() and not self.full():
            self._room.set_result(None)

    async def _poll_paused(self, consumer: AIOKafkaConsumer) -> None:
        """Poll with every partition paused: it takes nothing, and tells aiokafka this
        member is alive (a stage full for minutes, long tasks in every slot, would be
        dropped from its group after max_poll_interval_ms and its partitions moved away
        from the records in hand)."""
        self.last_poll = time.monotonic()
        mine = consumer.assignment() - consumer.paused()
        consumer.pause(*mine)
        try:
            got = await consumer.getmany(timeout_ms=0)
        finally:
            consumer.resume(*(mine & consumer.assignment()))
        for tp, records in got.items():
            if records:
                consumer.seek(tp, records[0].offset)  # not taken: fetched again later

    def fetched(self) -> None:
        self.last_fetch = self.last_poll = time.monotonic()

    def track(
        self,
        effect: Awaitable[object],
        tps: list[TopicPartition],
        size: int,
        ended: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        """Hold `effect` against the limits until it ends, then call `ended` with it (not
        if it was forgotten meanwhile, nor if it was cancelled)."""
        # The effect itself is tracked, never a wrapper: a task, a timer and a shield per
        # record were most of a task lane's own cost. Giving up on an effect (overdue,
        # revoked, restarted) only forgets it, so the sends or pushes under it go on.
        future = asyncio.ensure_future(effect)
        # Keyed by the effect: a stage returns one awaitable per record or batch, never
        # the same one twice.
        self.pending[future] = InFlight(tps, size, time.monotonic() + self._effect_timeout)
        self._bytes += size

        def finished(done: asyncio.Future[Any]) -> None:
            if self.pending.pop(done, None) is None:
                if not done.cancelled():
                    done.exception()  # forgotten meanwhile: its outcome no longer matters
                return
            self._bytes -= size
            self._wake_if_room()
            if not done.cancelled():
                ended(done)

        future.add_done_callback(finished)

    def overdue(self) -> bool:
        """An effect that never ends (a send stuck on a broker that lost a partition)
        would hold backpressure shut for good. Every effect has the same timeout, so the
        oldest one is the first due."""
        oldest = next(iter(self.pending.values()), None)
        return oldest is not None and time.monotonic() > oldest.deadline

    async def wait(self, tps: set[TopicPartition] | None, deadline: float) -> None:
        """Until the effects about `tps` (None: all) have ended, or `deadline` (monotonic)."""
        while True:
            waiting = [f for f, held in self.pending.items() if tps is None or tps & set(held.tps)]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            await asyncio.wait(waiting, timeout=left)

    def forget(self, tps: Iterable[TopicPartition] | None) -> None:
        """What is in flight on these partitions (None: all) will not commit here: stop
        counting it against backpressure (the work itself goes on, and its repeat by the
        next owner is fine)."""
        if tps is None:
            self.pending.clear()
            self._bytes = 0
        else:
            revoked = set(tps)
            for future, held in list(self.pending.items()):
                if set(held.tps) <= revoked:
                    del self.pending[future]
                    self._bytes -= held.size
        self._wake_if_room()
