"""Faust's Kafka transport with one fix: every topic a producer sends to stays tracked.

aiokafka asks the broker for metadata of its tracked topics only, once it tracks any.
A topic it learnt from an earlier full metadata fetch (at bootstrap) is sent to without
being tracked, so the first metadata refresh after another topic is tracked drops it:
its partitions lose their leader and records already queued for it wait forever
(faust's producer request timeout is 20 minutes). Seen here as a large group whose
second page never left the worker. Tracking each topic on its first send closes that.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from faust.transport import drivers
from faust.transport.drivers import aiokafka as kafka_driver

# What a stage sends records of one topic with: (key, value, partition or None) -> the
# broker's acknowledgement, once the record is queued (app.py's _producer_for).
SendRecord = Callable[[bytes | None, bytes, int | None], Awaitable[Awaitable[object]]]

SCHEME = "rtkafka"


async def track(producer: Any, topic: str, tracked: set[str]) -> None:
    """Add `topic` to an aiokafka producer's metadata topics, once."""
    if topic not in tracked:
        tracked.add(topic)
        await producer.client.add_topic(topic)


class Producer(kafka_driver.Producer):
    _tracked: set[str]

    async def on_start(self) -> None:
        self._tracked = set()
        await super().on_start()

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
        await track(self._ensure_producer(), topic, self._tracked)
        return await super().send(
            topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
        )


class Transport(kafka_driver.Transport):
    Producer = Producer


def register() -> None:
    drivers.TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def broker_url(kafka_url: str, scheme: str = SCHEME) -> str:
    """KAFKA_BROKER_URL (kafka://a;kafka://b) with the scheme that selects a transport."""
    return ";".join(scheme + "://" + url.split("://", 1)[1] for url in kafka_url.split(";"))
