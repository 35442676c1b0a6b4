"""Faust's Kafka transport, adjusted for Tansu (select it with BROKER_PROFILE=tansu).

- Tansu does not answer a fetch early when records arrive: a fetch waits its whole
  `fetch_max_wait_ms` (measured: a median of ~390 ms a hop with Faust's hard-coded
  1500 ms, ~9 ms with 50 ms). Kafka does answer early, so only this profile shortens it;
  and, as the own-group stages do (pipeline/fetch_wait.py), only while records flow: a
  consumer at rest asks at the idle wait, not 50 times a second.
- Tansu's ListOffsets(latest) answers the first offset of the last batch + 1, so a table
  recovering from a changelog written in multi-record batches stops short (DESIGN.md
  section 6). Changelog records therefore go through a second producer whose batches
  hold one record each; every other topic keeps normal batching, which in this pipeline
  (several records per event, one changelog write per presence change) is most of them.
"""

from __future__ import annotations

from typing import Any

from faust.transport import drivers
from faust.transport.drivers import aiokafka as kafka_driver

from resonance_task import compat
from resonance_task.pipeline import transport
from resonance_task.pipeline.fetch_wait import FetchWait

SCHEME = "tansu"
FETCH_MAX_WAIT_MS = 20
_idle_fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # register() sets the worker's
CHANGELOG_SUFFIX = "-changelog"


class ConsumerThread(kafka_driver.AIOKafkaConsumerThread):
    _fetch_wait: FetchWait | None = None  # a worker's consumer's (not a client-only app's)

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        compat.set_initial_fetch_max_wait(consumer, FETCH_MAX_WAIT_MS)
        self._fetch_wait = FetchWait(FETCH_MAX_WAIT_MS, _idle_fetch_max_wait_ms)
        return consumer

    async def _fetch_records(self, consumer: Any, *args: Any, **kwargs: Any) -> Any:
        # Faust's own consumer reads the presence, route and large-group topics and the
        # tables' changelogs, at rest most of the time: in a task burst its fetches were
        # most of the cost of this thread, taken from the event loop under the GIL.
        records = await super()._fetch_records(consumer, *args, **kwargs)
        if self._fetch_wait is not None:
            self._fetch_wait.observe(consumer, any(records.values()) if records else False)
        return records


class Consumer(kafka_driver.Consumer):
    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Producer(transport.Producer):
    _changelog_producer: Any = None
    _changelog_tracked: set[str]

    async def on_start(self) -> None:
        self._changelog_tracked = set()
        await super().on_start()
        # One record a batch, so waiting to fill one only delays it.
        settings = {
            **self._settings_default(),
            **self._settings_auth(),
            "max_batch_size": 1,
            "linger_ms": 0,
        }
        self._changelog_producer = self._producer_type(**settings)
        await self._changelog_producer.start()

    async def on_stop(self) -> None:
        producer, self._changelog_producer = self._changelog_producer, None
        if producer is not None:
            await producer.stop()
        await super().on_stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: Any,
        *,
        transactional_id: str | None = None,
    ) -> Any:
        if self._changelog_producer is None or not topic.endswith(CHANGELOG_SUFFIX):
            return await super().send(
                topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
            )
        await transport.track(self._changelog_producer, topic, self._changelog_tracked)
        return await self._changelog_producer.send(
            topic,
            value,
            key=key,
            partition=partition,
            timestamp_ms=int(timestamp * 1000) if timestamp else None,
            headers=list(headers.items()) if isinstance(headers, dict) else headers,
        )

    async def flush(self) -> None:
        # Faust flushes before it commits offsets: both producers, or at-least-once breaks.
        await super().flush()
        if self._changelog_producer is not None:
            await self._changelog_producer.flush()


class Transport(transport.Transport):
    Consumer = Consumer
    Producer = Producer


def register(idle_fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS) -> None:
    """Make `tansu://host:port` broker URLs use this transport; Faust's own consumer waits
    `idle_fetch_max_wait_ms` on a fetch once its topics are at rest."""
    global _idle_fetch_max_wait_ms
    _idle_fetch_max_wait_ms = idle_fetch_max_wait_ms
    drivers.TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def broker_url(kafka_url: str) -> str:
    return transport.broker_url(kafka_url, SCHEME)
