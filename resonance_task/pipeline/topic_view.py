"""A worker's own copy of a whole topic's state, read without a consumer group.

Faust's GlobalTable does not reliably reach every worker (faust-streaming #283; here one
of two workers kept an empty gateways table for a whole run and sent every online user
of its partitions to offline push). A TopicView instead assigns itself every partition of
its topic, reads from the start (or from a lookback time, for topics whose old records
no longer matter), and hands each record to `apply`. Every worker builds the same view.
It says when it has caught up with what the topic held when it started, judged by the
high watermark of the broker's own fetch responses (Tansu's ListOffsets is wrong, DESIGN.md
section 6): until then the worker is not ready. `wait_positions` waits for it to reach
given offsets (what the routes stage and the presence fence ask, pipeline/fence.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from mode import Service

from resonance_task import compat
from resonance_task.errors import BACKOFF, Backoff
from resonance_task.pipeline.fetch_wait import FetchWait

log = logging.getLogger(__name__)
# A view consumer that failed starts again after this: soon, yet not in a tight loop.
RESTART_BACKOFF = Backoff(first=0.2, cap=5.0)

Apply = Callable[[ConsumerRecord[Any, Any]], None]
_YIELD_EVERY = 1000
# One record in this many (by offset) is timed: an observation per record was 7% of the
# routes view's cost in a presence burst, and a sample keeps the quantiles.
DELAY_SAMPLE = 8


class TopicView(Service):
    def __init__(
        self,
        *,
        topic: str,
        apply: Apply,
        consumer_config: dict[str, Any],
        lookback_seconds: float | None = None,
        idle_fetch_wait_ms: int | None = None,
        delay: Any = None,
        **kwargs: Any,
    ) -> None:
        self.topic = topic
        # A histogram's child: now minus a record's timestamp as it is applied (a sample,
        # once caught up: before, it would only measure how old the topic's history is).
        self._delay = delay
        self._apply = apply
        self._consumer_config = {k: v for k, v in consumer_config.items() if k != "group_id"}
        self._lookback = lookback_seconds
        self._since_ms = 0
        busy = consumer_config.get("fetch_max_wait_ms")
        self._fetch_wait = (
            FetchWait(busy, idle_fetch_wait_ms)
            if busy is not None and idle_fetch_wait_ms is not None
            else None
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        # Per partition: the first high watermark seen, then the next offset to read.
        self._target: dict[TopicPartition, int] = {}
        self._position: dict[TopicPartition, int] = {}
        self._caught_up = asyncio.Event()
        # (partition -> offset, done when the view has read up to them), checked per fetch.
        self._waiters: list[tuple[dict[int, int], asyncio.Future[None]]] = []
        self.records = 0
        self.errors = 0
        self.restarts = 0
        super().__init__(**kwargs)

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    async def wait_caught_up(self) -> None:
        await self._caught_up.wait()

    def position(self, partition: int) -> int | None:
        """The next offset this view reads of `partition` (None: not assigned yet)."""
        return self._position.get(TopicPartition(self.topic, partition))

    async def wait_positions(self, offsets: Mapping[int, int]) -> None:
        """Until this view has applied every record below `offsets` (partition -> offset)."""
        wanted = dict(offsets)
        if self._reached(wanted):
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((wanted, future))
        await future  # cancelled with its waiter: then dropped at the next check

    def _reached(self, offsets: dict[int, int]) -> bool:
        return all((self.position(p) or 0) >= offset for p, offset in offsets.items())

    def _wake_waiters(self) -> None:
        waiting = []
        for wanted, future in self._waiters:
            if future.done():
                continue
            if self._reached(wanted):
                future.set_result(None)
            else:
                waiting.append((wanted, future))
        self._waiters = waiting

    @property
    def alive(self) -> bool:
        """Following its topic (it only stops at stop, or through a bug: then not ready)."""
        return self._task is not None and not self._task.done()

    def stats(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "caught_up": self.caught_up,
            "alive": self.alive,
            "records": self.records,
            "errors": self.errors,
            "restarts": self.restarts,
            "partitions": len(self._position),
        }

    async def on_start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"topic-view:{self.topic}")

    async def on_stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._close_consumer()

    async def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()

    async def _partitions(self, consumer: AIOKafkaConsumer) -> list[TopicPartition]:
        # The topic may be created by another worker or the first producer a moment later.
        attempt = 0
        while True:
            partitions = consumer.partitions_for_topic(self.topic)
            if partitions:
                return [TopicPartition(self.topic, p) for p in sorted(partitions)]
            with contextlib.suppress(Exception):
                await compat.refresh_metadata(consumer)
            attempt += 1
            await asyncio.sleep(BACKOFF.capped(1.0).delay(attempt))

    async def _seek(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        await consumer.seek_to_beginning(*tps)
        if self._lookback is None:
            return
        since = self._since_ms = int((time.time() - self._lookback) * 1000)
        try:
            # Tansu answers every time lookup with offset 0: the timestamp filter in _run
            # keeps the view right either way, this only saves reading.
            found = await consumer.offsets_for_times(dict.fromkeys(tps, since))
        except Exception as exc:  # a broker without the API: read it all, still correct
            log.info("%s: no offsets by time (%r); reading from the start", self.topic, exc)
            return
        for tp, at in found.items():
            if at is not None:
                consumer.seek(tp, at.offset)

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                consumer, tps = await self._open()
                while True:
                    if await self._fetch(consumer, tps):
                        failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A view that stops following its topic would route with stale state for
                # the rest of the worker's life: start a fresh consumer where it stood.
                failures += 1
                self.restarts += 1
                delay = RESTART_BACKOFF.delay(failures)
                log.error(
                    "%s: view consumer failed, restarting in %.1fs: %r", self.topic, delay, exc
                )
                await self._close_consumer()
                await asyncio.sleep(delay)

    async def _open(self) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        consumer = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, **self._consumer_config
        )
        self._consumer = consumer
        await consumer.start()
        tps = await self._partitions(consumer)
        consumer.assign(tps)
        if self._position:  # a restart: go on from where this view stood
            for tp in tps:
                consumer.seek(tp, self._position.setdefault(tp, 0))
        else:
            await self._seek(consumer, tps)
            for tp in tps:
                self._position[tp] = await consumer.position(tp)
        return consumer, tps

    async def _fetch(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> bool:
        batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
        fetched = any(batch.values())
        if self._fetch_wait is not None:
            self._fetch_wait.observe(consumer, fetched)
        since = 0 if self.caught_up else self._since_ms
        delay = self._delay if self.caught_up else None
        now = time.time() * 1000
        applied = 0
        for tp, records in batch.items():
            for record in records:
                applied += 1
                if applied % _YIELD_EVERY == 0:
                    # A catch-up fetch holds up to 10,000 records: let the stages run.
                    await asyncio.sleep(0)
                if record.timestamp < since:
                    continue
                if delay is not None and not record.offset % DELAY_SAMPLE:
                    delay.observe(max(0.0, now - record.timestamp) / 1000)
                try:
                    self._apply(record)
                except Exception:
                    # A bad record is the writer's bug, not a reason to stop the view.
                    self.errors += 1
                    log.exception("%s: cannot apply record at %s", self.topic, record.offset)
            self.records += len(records)
            if records:
                self._position[tp] = records[-1].offset + 1
        if not self.caught_up:
            self._check_caught_up(consumer, tps)
        if self._waiters and fetched:
            self._wake_waiters()
        return fetched

    def _check_caught_up(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        for tp in tps:
            if tp not in self._target:
                highwater = consumer.highwater(tp)
                if highwater is None:
                    return  # no fetch response for this partition yet
                self._target[tp] = highwater
            if self._position[tp] < self._target[tp]:
                return
        self._caught_up.set()
        log.info("%s: view caught up (%d records)", self.topic, self.records)
