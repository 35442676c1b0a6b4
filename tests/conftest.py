"""Session fixtures: the real broker (Tansu), the machine's Redis and PostgreSQL, factories."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.redis import LocalRedis, LocalRedisCluster, answers

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


# Databases of the machine's Redis the tests never take: the claims (0), the benchmarks'
# (12, 13) and the demo's (15).
_NOT_FOR_TESTS = {0, 12, 13, 15}
_CLAIM_SECONDS = 2 * 3600  # a run killed before its end frees its database by then


@contextlib.contextmanager
def _claimed_database(url: str) -> Iterator[str]:
    """A database of this Redis no other test process holds, from the one `url` names on:
    each pytest-xdist process, and each run on the machine (two checkouts' at once), gets
    its own, and flushing it wipes no one else's keys. The claim is a key in DB 0."""
    parts = urlsplit(url)
    first = int(parts.path.strip("/") or 0)
    claims = redis.Redis.from_url(urlunsplit(parts._replace(path="/0")))
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    order = [*range(first, 16), *range(1, first)]
    for db in (d for d in order if d not in _NOT_FOR_TESTS):
        key = f"resonance-task:tests:db{db}"
        if claims.set(key, token, nx=True, ex=_CLAIM_SECONDS):
            try:
                yield urlunsplit(parts._replace(path=f"/{db}"))
            finally:
                if claims.get(key) == token.encode():
                    claims.delete(key)
                claims.close()
            return
    raise RuntimeError(f"every test database of {url} is claimed (keys resonance-task:tests:*)")


TEST_POSTGRES_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_file=log) as running:
        yield running


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The machine's Redis (a database of this process's own, flushed), or a local
    redis-server."""
    if answers(TEST_REDIS_URL):
        with _claimed_database(TEST_REDIS_URL) as url:
            redis.Redis.from_url(url).flushdb()
            yield url
        return
    with LocalRedis() as local:
        yield local.url


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalRedisCluster]:
    """A real Redis Cluster, 3 masters and 3 replicas on loopback, started for the session
    (as Tansu is): what the cluster tests run against, never one server standing in."""
    with LocalRedisCluster() as cluster:
        yield cluster


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
