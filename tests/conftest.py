"""Session fixtures: the real broker (Tansu), the machine's Redis and PostgreSQL, factories."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.redis import LocalRedis, answers

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


def _worker_redis_url(url: str) -> str:
    """The test database, one further per pytest-xdist worker (gw0: 9, gw1: 10, ...), so
    parallel workers never flush each other's keys."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    offset = int(worker.removeprefix("gw") or 0)
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0) + offset
    return urlunsplit(parts._replace(path=f"/{db}"))


TEST_POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log) as running:
        yield running


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis (a test database, flushed), or a local redis-server."""
    url = _worker_redis_url(TEST_REDIS_URL)
    if answers(url):
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    with LocalRedis() as local:
        yield local.url


@pytest.fixture
def private_redis() -> Iterator[str]:
    """A redis-server of the test's own, for a test that pauses every client of its Redis
    (CLIENT PAUSE ... ALL): on the shared one it would stall the tests running beside it."""
    with LocalRedis() as local:
        yield local.url


@pytest.fixture
def empty_redis(redis_url: str) -> str:
    """The test database emptied first, for a test whose subject is every key in it (an
    archive pass SCANs every inbox: the tens of thousands earlier tests left would make
    its pass minutes long)."""
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def tag() -> str:
    """A fresh name for this test's topics, consumer groups and users."""
    return "t" + uuid.uuid4().hex[:8]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    try:
        asyncio.run(_execute(TEST_POSTGRES_DSN, "SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(
            f"PostgreSQL does not answer at {TEST_POSTGRES_DSN} ({exc}); set TEST_POSTGRES_DSN"
        )
    return TEST_POSTGRES_DSN


@pytest.fixture(scope="session")
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A fresh schema for this session's tables, dropped afterwards."""
    schema = "rt_test_" + uuid.uuid4().hex[:8]
    asyncio.run(_execute(postgres_dsn, f"CREATE SCHEMA {schema}"))
    yield schema
    asyncio.run(_execute(postgres_dsn, f"DROP SCHEMA {schema} CASCADE"))
