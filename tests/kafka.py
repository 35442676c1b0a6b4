"""Kafka helpers the tests share: topics made and filled on the real broker, stage and
view configurations, and waiting on a condition (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.pipeline.topic_view import TopicView


async def make_topic(broker: EmbeddedBroker, name: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def produce(broker: EmbeddedBroker, topic: str, records: list[tuple[int, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    try:
        for partition, value in records:
            await producer.send(topic, value, key=value, partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def until(check: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {seconds}s")


def view_of(broker: EmbeddedBroker, topic: str, apply: Any, **kwargs: Any) -> TopicView:
    config = {"bootstrap_servers": broker.bootstrap, "fetch_max_wait_ms": 20}
    return TopicView(topic=topic, apply=apply, consumer_config=config, **kwargs)


def group_config(broker: EmbeddedBroker, group: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": broker.bootstrap,
        "group_id": group,
        "session_timeout_ms": 2000,
        "heartbeat_interval_ms": 500,
        "fetch_max_wait_ms": 20,
    }
