"""Offline push fixtures: the local provider server and the providers pointed at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from resonance_task.embedded.providers import ProviderServer
from resonance_task.offline.tokens import RedisDeviceTokenStore
from tests.offline.fakes import SECRET, Providers, make_providers


@pytest.fixture
async def server() -> AsyncIterator[ProviderServer]:
    async with ProviderServer(webhook_secret=SECRET) as running:
        yield running


@pytest.fixture
async def providers(server: ProviderServer) -> AsyncIterator[Providers]:
    made, clients = make_providers(server)
    yield made
    for client in clients:
        await client.aclose()


@pytest.fixture
async def tokens(redis_url: str) -> AsyncIterator[RedisDeviceTokenStore]:
    store = RedisDeviceTokenStore(redis_url)
    yield store
    await store.close()
