"""The inbox store: the same tests against one real Redis, a real Redis Cluster (3 masters,
3 replicas) and the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resonance_task.embedded.redis import LocalRedisCluster
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.inbox import InboxStore, RedisInboxStore, Refusal
from resonance_task.stores.postgres import PostgresInboxStore

BASE = 7_300_000_000_000_000_000  # Snowflake-sized: beyond a double's exact range


BACKENDS = ["redis", "redis-cluster", "postgres"]
MakeStore = Callable[..., InboxStore]


@pytest.fixture
async def make_store(
    redis_url: str, redis_cluster: LocalRedisCluster, postgres_dsn: str, pg_schema: str
) -> AsyncIterator[MakeStore]:
    made: list[InboxStore] = []

    def make(backend: str, max_entries: int = 0) -> InboxStore:
        s: InboxStore
        if backend == "postgres":
            s = PostgresInboxStore(postgres_dsn, max_entries=max_entries, search_path=pg_schema)
        else:
            # A real Redis Cluster (3 masters, 3 replicas), named as an operator would.
            url = redis_cluster.url if backend == "redis-cluster" else redis_url
            s = RedisInboxStore(url, max_entries=max_entries, message_ttl=600)
        made.append(s)
        return s

    yield make
    for s in made:
        await s.close()


@pytest.fixture
async def raw(
    redis_client: aioredis.Redis, redis_cluster: LocalRedisCluster
) -> AsyncIterator[Callable[[str], Any]]:
    """The backend's own Redis client, to write what another service would."""
    cluster = AsyncRedisCluster.from_url(
        redis_cluster.url.replace("+cluster://", "://"), decode_responses=True
    )
    yield lambda backend: cluster if backend == "redis-cluster" else redis_client
    await cluster.aclose()


@pytest.fixture(params=BACKENDS)
def store(make_store: MakeStore, request: pytest.FixtureRequest) -> InboxStore:
    return make_store(request.param)


def msg(i: int, session: str = "s") -> PushMessage:
    return PushMessage(msg_id=BASE + i, seq_id=i, session_id=session, content=f"m{i}")


async def test_cursors_have_no_gaps_and_writes_are_idempotent(store: InboxStore, tag: str) -> None:
    users = [f"{tag}-a", f"{tag}-b"]
    first = await store.write([(msg(i), users) for i in range(1, 6)])
    again = await store.write([(msg(i), users) for i in (3, 1, 5)] + [(msg(6), users[:1])])
    assert (first.new, first.duplicate, first.refused) == (10, 0, ())
    assert (again.new, again.duplicate, again.refused) == (1, 6, ())
    entries = await store.read(users[0], 0, 100)
    assert [e.cursor for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.msg_id for e in entries] == [BASE + i for i in range(1, 7)]
    assert entries[0].message is not None and entries[0].message.content == "m1"
    assert await store.last_cursor(users[1]) == 5
    assert [e.cursor for e in await store.read(users[0], 4, 1)] == [5]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_capped_inbox_does_not_readmit_trimmed_messages(
    make_store: MakeStore, backend: str, tag: str
) -> None:
    store = make_store(backend, max_entries=3)
    user = f"{tag}-capped"
    await store.write([(msg(i), [user]) for i in range(1, 8)])
    before = [(e.cursor, e.msg_id) for e in await store.read(user, 0, 10)]
    replay = await store.write([(msg(i), [user]) for i in range(1, 8)])
    after = [(e.cursor, e.msg_id) for e in await store.read(user, 0, 10)]
    assert before == after == [(5, BASE + 5), (6, BASE + 6), (7, BASE + 7)]
    assert replay.new == 0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_concurrent_writers_keep_cursors_gap_free(
    make_store: MakeStore, backend: str, tag: str
) -> None:
    # Two stores, as two workers during a rebalance, writing overlapping batches at once.
    a, b = make_store(backend), make_store(backend)
    users = [f"{tag}-c{i}" for i in range(20)]
    await asyncio.gather(
        *(
            store.write([(msg(i), users) for i in range(start, start + 10)])
            for store in (a, b, a, b)
            for start in (1, 6)
        )
    )
    for user in users:
        entries = await a.read(user, 0, 100)
        assert [e.cursor for e in entries] == list(range(1, 16)), user
        assert sorted(e.msg_id for e in entries) == [BASE + i for i in range(1, 16)], user


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_group_sized_batch_round_trips(
    make_store: MakeStore, backend: str, tag: str
) -> None:
    store = make_store(backend)
    users = [f"{tag}-g{i:04d}" for i in range(2000)]
    result = await store.write([(msg(i, "group"), users) for i in (1, 2, 3)])
    assert (result.new, result.duplicate) == (6000, 0)
    entries = await store.read(users[1999], 0, 10)
    assert [(e.cursor, e.msg_id) for e in entries] == [(c, BASE + c) for c in (1, 2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_one_user_with_ten_thousand_messages_in_a_batch(
    make_store: MakeStore, backend: str, tag: str
) -> None:
    # A backlog of one busy chat: more of one user's ids than a Lua script may `unpack`
    # (~8,000); the write must neither fail nor reorder them.
    store = make_store(backend)
    user = f"{tag}-busy"
    result = await store.write([(msg(i), [user]) for i in range(1, 10_001)])
    again = await store.write([(msg(i), [user]) for i in range(9_990, 10_011)])
    assert (result.new, result.duplicate) == (10_000, 0)
    assert (again.new, again.duplicate) == (10, 11)
    entries = await store.read(user, 9_995, 100)
    assert [(e.cursor, e.msg_id) for e in entries] == [(c, BASE + c) for c in range(9_996, 10_011)]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_busy_user_among_many_keeps_message_order(
    make_store: MakeStore, backend: str, tag: str
) -> None:
    # Redis writes a batch's calls on two connections side by side: the calls of a user
    # who needs several (1,200 messages here) must still run in order.
    store = make_store(backend)
    quiet = [f"{tag}-q{i:04d}" for i in range(3000)]
    busy = f"{tag}-busy"
    batch = [(msg(i), [quiet[i % 3000], busy, quiet[(i + 1500) % 3000]]) for i in range(1, 1201)]
    result = await store.write(batch)
    assert (result.new, result.duplicate) == (3600, 0)
    entries = await store.read(busy, 0, 2000)
    assert [(e.cursor, e.msg_id) for e in entries] == [(c, BASE + c) for c in range(1, 1201)]
    cursors = await store.last_cursors(quiet)
    assert sum(cursors.values()) == 2400


async def test_resonance_delta_sync_query_still_works(
    make_store: MakeStore, postgres_dsn: str, pg_schema: str, tag: str
) -> None:
    store = make_store("postgres")
    user = f"{tag}-legacy"
    await store.write([(msg(i), [user]) for i in (1, 2, 3)])
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        first = await conn.fetchval("SELECT min(id) FROM t_inbox WHERE owner_username = $1", user)
        rows = await conn.fetch(
            "SELECT msg_id, seq_id, is_read FROM t_inbox WHERE owner_username = $1 AND id > $2"
            " ORDER BY id",
            user,
            first,
        )
    finally:
        await conn.close()
    assert [(r["msg_id"], r["seq_id"], r["is_read"]) for r in rows] == [
        (BASE + 2, 2, False),
        (BASE + 3, 3, False),
    ]


async def test_last_cursors_of_many_users_in_one_call(store: InboxStore, tag: str) -> None:
    users = [f"{tag}-l{i}" for i in range(3)]
    await store.write([(msg(i), users[: 3 - i]) for i in range(3)])
    assert await store.last_cursors([*users, f"{tag}-never"]) == {
        users[0]: 3,
        users[1]: 2,
        users[2]: 1,
        f"{tag}-never": 0,
    }


REDIS_BACKENDS = ["redis", "redis-cluster"]


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_keys_of_the_wrong_type_refuse_their_user_and_no_one_else(
    make_store: MakeStore, backend: str, raw: Callable[[str], Any], tag: str
) -> None:
    redis_client = raw(backend)
    # Enough users for several packed calls, the broken ones in different calls.
    users = [f"{tag}-k{i:04d}" for i in range(1200)]
    inbox_string, seq_hash, trim_list, seq_text = users[3], users[600], users[1100], users[1199]
    broken = {inbox_string, seq_hash, trim_list, seq_text}
    await redis_client.set(f"inbox:{{{inbox_string}}}", "not an inbox")
    await redis_client.hset(f"inbox:{{{seq_hash}}}:seq", "not", "a cursor")
    await redis_client.rpush(f"inbox:{{{trim_list}}}:trim", "not a watermark")
    await redis_client.set(f"inbox:{{{seq_text}}}:seq", "twelve")
    store = make_store(backend, max_entries=5)
    batch = [(msg(i), users) for i in (1, 2, 3)]

    result = await store.write(batch)
    assert (result.new, result.duplicate) == (3 * 1196, 0)
    assert sorted(result.refused, key=lambda r: (r.user, r.msg_id)) == sorted(
        (
            Refusal(user, BASE + i, error)
            for user, error in (
                (inbox_string, f"WRONGTYPE inbox:{{{inbox_string}}} is a string, not a zset"),
                (seq_hash, f"WRONGTYPE inbox:{{{seq_hash}}}:seq is a hash, not a string"),
                (trim_list, f"WRONGTYPE inbox:{{{trim_list}}}:trim is a list, not a string"),
                (
                    seq_text,
                    f"ERR inbox:{{{seq_text}}}:seq holds no cursor:"
                    " value is not an integer or out of range",
                ),
            )
            for i in (1, 2, 3)
        ),
        key=lambda r: (r.user, r.msg_id),
    )
    others = [u for u in users if u not in broken]
    assert await store.last_cursors(others) == dict.fromkeys(others, 3)
    # Nothing of a refused user was written: no cursor taken, no inbox made.
    assert await redis_client.get(f"inbox:{{{inbox_string}}}") == "not an inbox"
    assert await redis_client.hgetall(f"inbox:{{{seq_hash}}}:seq") == {"not": "a cursor"}
    assert await redis_client.get(f"inbox:{{{seq_text}}}:seq") == "twelve"
    assert not await redis_client.exists(
        f"inbox:{{{seq_hash}}}", f"inbox:{{{seq_text}}}", f"inbox:{{{trim_list}}}"
    )
    assert not await redis_client.exists(f"inbox:{{{trim_list}}}:seq")

    # A replay writes no one twice and refuses the same pairs.
    replay = await store.write(batch)
    assert (replay.new, replay.duplicate) == (0, 3 * 1196)
    assert sorted(replay.refused, key=lambda r: (r.user, r.msg_id)) == sorted(
        result.refused, key=lambda r: (r.user, r.msg_id)
    )
    # Once the keys are mended, the refused users get their messages, cursors from 1.
    await redis_client.delete(
        f"inbox:{{{inbox_string}}}",
        f"inbox:{{{seq_hash}}}:seq",
        f"inbox:{{{trim_list}}}:trim",
        f"inbox:{{{seq_text}}}:seq",
    )
    mended = await store.write(batch)
    assert (mended.new, mended.duplicate, mended.refused) == (12, 3 * 1196, ())
    for user in (inbox_string, seq_hash, trim_list, seq_text, others[0]):
        entries = await store.read(user, 0, 10)
        assert [(e.cursor, e.msg_id) for e in entries] == [(c, BASE + c) for c in (1, 2, 3)]


@pytest.mark.parametrize("backend", REDIS_BACKENDS)
async def test_a_body_key_of_the_wrong_type_refuses_its_message_for_everyone(
    make_store: MakeStore, backend: str, raw: Callable[[str], Any], tag: str
) -> None:
    redis_client = raw(backend)
    users = [f"{tag}-b{i}" for i in range(3)]
    first = BASE + 10**12 + int(tag[1:], 16) * 10  # bodies are shared: this test's own ids
    messages = [PushMessage(msg_id=first + i, seq_id=i, session_id="s") for i in (1, 2, 3)]
    await redis_client.hset(f"msg:{{{first + 2}}}", "not", "a body")
    store = make_store(backend)
    result = await store.write([(m, users) for m in messages])
    assert (result.new, result.duplicate) == (6, 0)
    error = f"WRONGTYPE msg:{{{first + 2}}} is a hash, not a string"
    assert sorted(result.refused, key=lambda r: r.user) == [
        Refusal(user, first + 2, error) for user in users
    ]
    for user in users:  # the other messages, without a gap where the refused one was
        entries = await store.read(user, 0, 10)
        assert [(e.cursor, e.msg_id) for e in entries] == [(1, first + 1), (2, first + 3)]
    assert await redis_client.hgetall(f"msg:{{{first + 2}}}") == {"not": "a body"}
