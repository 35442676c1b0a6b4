"""The private parts of aiokafka and Faust the project touches still exist, as used
(resonance_task/compat.py): an upgrade that moves one fails here, not in production."""

from __future__ import annotations

import inspect

from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient
from aiokafka.consumer.fetcher import Fetcher
from faust.transport.drivers import aiokafka as kafka_driver

from resonance_task import compat


def test_aiokafkas_private_parts_are_where_compat_reaches() -> None:
    # Awaited by compat: a coroutine function, or one returning a future.
    assert callable(AIOKafkaClient.force_metadata_update)
    assert inspect.iscoroutinefunction(AIOKafkaClient.fetch_all_metadata)
    # The fetcher reads its wait from this attribute for every fetch request it builds.
    assert "_fetch_max_wait_ms" in inspect.getsource(Fetcher.__init__)
    assert "self._fetch_max_wait_ms" in inspect.getsource(Fetcher)
    # The consumer hands its own to the fetcher in start().
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(AIOKafkaConsumer)


async def test_set_fetch_max_wait_reports_a_consumer_not_started() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9")
    assert not compat.set_fetch_max_wait(consumer, 20)
    compat.set_initial_fetch_max_wait(consumer, 20)
    assert consumer._fetch_max_wait_ms == 20


def test_fausts_driver_hooks_our_subclasses_override_exist() -> None:
    thread = kafka_driver.AIOKafkaConsumerThread
    assert callable(thread._create_worker_consumer) and callable(thread._fetch_records)
    assert callable(kafka_driver.Consumer._new_consumer_thread)
    producer = kafka_driver.Producer
    for hook in ("_ensure_producer", "_settings_default", "_settings_auth", "_producer_type"):
        assert hasattr(producer, hook), hook
