"""The inbox archive against the real Redis and PostgreSQL: entries move, reads still see
every cursor once, in order, and nothing leaves Redis that PostgreSQL does not hold."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.archive import ArchivedInboxStore, InboxArchive
from resonance_task.stores.inbox import RedisInboxStore

BASE = 7_400_000_000_000_000_000
HOUR_MS = 3_600_000

MakeInbox = Callable[..., ArchivedInboxStore]


@pytest.fixture
async def make_inbox(
    redis_url: str, postgres_dsn: str, pg_schema: str, tag: str
) -> AsyncIterator[MakeInbox]:
    made: list[ArchivedInboxStore] = []

    def make(*, keep: int = 0, after_seconds: float = 0.0) -> ArchivedInboxStore:
        # A key prefix of this test's own: a pass over "every inbox" sees only these.
        redis = RedisInboxStore(redis_url, max_entries=1000, message_ttl=600, key_prefix=tag)
        archive = InboxArchive(
            redis,
            postgres_dsn,
            keep_entries=keep,
            after_seconds=after_seconds,
            search_path=pg_schema,
        )
        store = ArchivedInboxStore(redis, archive)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def msg(i: int, *, age_ms: int = 0, base: int = BASE) -> PushMessage:
    # Bodies are shared by msg_id across inboxes (and tests): a test that dates them
    # uses ids of its own.
    return PushMessage(
        msg_id=base + i,
        seq_id=i,
        session_id="s",
        content=f"m{i}",
        timestamp=int(time.time() * 1000) - age_ms,
    )


async def pg_rows(dsn: str, schema: str, user: str) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch(
            "SELECT inbox_cursor, msg_id FROM t_inbox WHERE owner_username = $1"
            " ORDER BY inbox_cursor",
            user,
        )
    finally:
        await conn.close()
    return [(r["inbox_cursor"], r["msg_id"]) for r in rows]


async def redis_cursors(store: ArchivedInboxStore, user: str) -> list[int]:
    return [e.cursor for e in await store.redis.read(user, 0, 1000)]


async def test_entries_beyond_keep_move_and_reads_see_every_cursor_once(
    make_inbox: MakeInbox, postgres_dsn: str, pg_schema: str, tag: str
) -> None:
    store = make_inbox(keep=4)
    big, small = f"{tag}-big", f"{tag}-small"
    await store.write([(msg(i), [big]) for i in range(1, 11)])
    await store.write([(msg(i), [small]) for i in range(1, 3)])

    run = await store.archive.run()  # every inbox under this prefix, found by SCAN

    assert (run.inboxes_scanned, run.inboxes_archived, run.entries_moved) == (2, 1, 6)
    assert run.conflicts == 0
    assert await redis_cursors(store, big) == [7, 8, 9, 10]
    assert await pg_rows(postgres_dsn, pg_schema, big) == [(c, BASE + c) for c in range(1, 7)]
    assert await redis_cursors(store, small) == [1, 2]
    every = await store.read(big, 0, 100)
    assert [e.cursor for e in every] == list(range(1, 11))
    assert [e.message.content for e in every if e.message] == [f"m{i}" for i in range(1, 11)]
    across = await store.read(big, 3, 5)  # starts in PostgreSQL, ends in Redis
    assert [e.cursor for e in across] == [4, 5, 6, 7, 8]
    assert [e.cursor for e in await store.read(big, 8, 5)] == [9, 10]

    # A replay of an archived message does not come back under a new cursor.
    again = await store.write([(msg(3), [big]), (msg(11), [big])])
    assert (again.new, again.duplicate) == (1, 1)
    assert [e.cursor for e in await store.read(big, 0, 100)] == list(range(1, 12))
    assert (await store.archive.run([big])).entries_moved == 1  # only the new excess


async def test_old_entries_and_expired_bodies_move_by_age(
    make_inbox: MakeInbox, postgres_dsn: str, pg_schema: str, tag: str
) -> None:
    store = make_inbox(after_seconds=3600)
    user, base = f"{tag}-aged", BASE + int(time.time() * 1000)
    ages = [3 * HOUR_MS, 2 * HOUR_MS, 0, 2 * HOUR_MS, 0]  # the fourth is old but after a new one
    await store.write([(msg(i, age_ms=age, base=base), [user]) for i, age in enumerate(ages, 1)])
    run = await store.archive.run([user])
    assert run.entries_moved == 2  # a prefix only: the inbox stays one run of cursors
    assert await redis_cursors(store, user) == [3, 4, 5]

    # A body whose TTL passed cannot be dated: it is older than any horizon.
    await store.redis.client.delete(f"msg:{{{base + 3}}}")
    run = await store.archive.run([user])
    assert (run.entries_moved, run.entries_without_body) == (2, 1)
    assert await redis_cursors(store, user) == [5]
    rows = await pg_rows(postgres_dsn, pg_schema, user)
    assert rows == [(c, base + c) for c in range(1, 5)]
    entries = await store.read(user, 0, 10)
    assert [(e.cursor, e.message is None) for e in entries] == [
        (1, False),
        (2, False),
        (3, True),
        (4, False),
        (5, False),
    ]


async def test_an_entry_postgres_holds_another_message_for_stays_in_redis(
    make_inbox: MakeInbox, postgres_dsn: str, pg_schema: str, tag: str
) -> None:
    store = make_inbox(keep=1)
    user = f"{tag}-reset"
    await store.write([(msg(i), [user]) for i in range(1, 4)])
    await store.archive.read(user, 0, 1)  # creates the schema
    # Cursor 1 is taken in PostgreSQL by an earlier life of this inbox (its Redis reset).
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        await conn.execute(
            "INSERT INTO t_inbox (owner_username, session_id, msg_id, seq_id, inbox_cursor)"
            " VALUES ($1, 'old', 42, 1, 1)",
            user,
        )
    finally:
        await conn.close()
    run = await store.archive.run([user])
    assert (run.entries_moved, run.conflicts) == (1, 1)
    assert await redis_cursors(store, user) == [1, 3]  # never dropped from both
    assert await pg_rows(postgres_dsn, pg_schema, user) == [(1, 42), (2, BASE + 2)]
    # Read, the live entry at cursor 1 is Redis's, not hidden behind the archived top.
    assert [e.msg_id for e in await store.read(user, 0, 10)] == [BASE + i for i in (1, 2, 3)]


async def test_a_pass_can_be_stopped_between_pages(make_inbox: MakeInbox, tag: str) -> None:
    store = make_inbox(keep=1)
    await store.write([(msg(i), [f"{tag}-u{u}"]) for u in range(3) for i in range(1, 4)])
    notes: list[tuple[float, str]] = []

    async def progress(percent: float, note: str) -> None:
        notes.append((percent, note))

    run = await store.archive.run(progress=progress, cancelled=lambda: True)
    assert run.cancelled and run.entries_moved == 0 and notes == []
    run = await store.archive.run(progress=progress)
    assert run.entries_moved == 6 and notes and notes[-1][1] == "3 inboxes scanned"
