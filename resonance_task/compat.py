"""Every private part of aiokafka this project reaches into, in one place, each with why.

pyproject bounds aiokafka and faust-streaming to the minor versions these were read
against, and requirements.lock pins what CI installs; tests/test_compat.py fails on an
upgrade that removed one of them. The Faust driver subclasses (pipeline/transport.py,
embedded/tansu.py) override Faust's protected hooks `_create_worker_consumer`,
`_fetch_records`, `_new_consumer_thread`, `_ensure_producer`, `_settings_default`,
`_settings_auth` and `_producer_type`; that test checks those too.
"""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer


async def refresh_metadata(consumer: AIOKafkaConsumer) -> None:
    """Ask the broker for metadata now: a topic another worker is creating shows up
    without waiting for aiokafka's next periodic refresh (metadata_max_age_ms)."""
    await consumer._client.force_metadata_update()


async def cluster_metadata(consumer: AIOKafkaConsumer) -> Any:
    """Metadata of every topic, not only those the consumer reads (its own view holds
    only its subscriptions): the partitions of topics a report or a fence asks about."""
    return await consumer._client.fetch_all_metadata()


def set_fetch_max_wait(consumer: Any, wait_ms: int) -> bool:
    """Change how long the consumer's fetches wait for records, while it runs. aiokafka
    reads it from its fetcher each time it builds a fetch request; there is no public
    setter. False if the consumer has no fetcher yet (not started)."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None:
        return False
    fetcher._fetch_max_wait_ms = wait_ms
    return True


def set_initial_fetch_max_wait(consumer: Any, wait_ms: int) -> None:
    """The fetch wait of a consumer not started yet (Faust builds its consumer with a
    hard-coded 1500 ms); aiokafka hands it to its fetcher in start()."""
    consumer._fetch_max_wait_ms = wait_ms
