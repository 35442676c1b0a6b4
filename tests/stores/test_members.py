"""The member store against the real Redis and the real PostgreSQL.

The group service writes members, not us: most tests write them as it would (raw ZADD
with its own scores, SADD, INSERT into its own table) and page them with our store.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence

import asyncpg
import pytest
import redis.asyncio as aioredis

from resonance_task.stores.members import MemberStore, RedisMemberStore, UnpageableGroup
from resonance_task.stores.postgres import MemberTableError, PostgresMemberStore


@pytest.fixture(params=["redis", "postgres"])
async def members(
    request: pytest.FixtureRequest, redis_url: str, postgres_dsn: str, pg_schema: str
) -> AsyncIterator[MemberStore]:
    store: MemberStore
    if request.param == "postgres":
        store = PostgresMemberStore(postgres_dsn, search_path=pg_schema)
    else:
        store = RedisMemberStore(redis_url)
    yield store
    await store.close()


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisMemberStore]:
    store = RedisMemberStore(redis_url)
    yield store
    await store.close()


@pytest.fixture
async def pg_store(postgres_dsn: str, pg_schema: str) -> AsyncIterator[PostgresMemberStore]:
    store = PostgresMemberStore(postgres_dsn, search_path=pg_schema)
    await store.count("")  # creates t_group_member, which the raw INSERTs below need
    yield store
    await store.close()


@pytest.fixture
async def pg(postgres_dsn: str, pg_schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection in the test schema: the other service writing its tables."""
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    yield conn
    await conn.close()


async def read_pages(
    store: MemberStore, session_id: str, count: int, cursor: str = "", *, exact: bool = True
) -> list[list[str]]:
    """Every page to the end; `exact`: no page holds more than `count` (SSCAN's may)."""
    pages: list[list[str]] = []
    next_cursor: str | None = cursor
    while next_cursor is not None:
        page, next_cursor = await store.page(session_id, next_cursor, count)
        assert next_cursor is None or type(next_cursor) is str
        assert len(page) <= count or not exact
        pages.append(page)
        assert len(pages) < 10_000, "paging does not end"
    return pages


async def read_all(
    store: MemberStore, session_id: str, count: int, cursor: str = "", *, exact: bool = True
) -> list[str]:
    pages = await read_pages(store, session_id, count, cursor, exact=exact)
    return [m for page in pages for m in page]


def key(session_id: str) -> str:
    return f"group:{{{session_id}}}:members"


async def zadd(client: aioredis.Redis, session_id: str, scored: Sequence[tuple[str, str]]) -> None:
    """ZADD as another service sends it: the scores exactly as it spells them."""
    for start in range(0, len(scored), 1000):
        await client.zadd(key(session_id), dict(scored[start : start + 1000]))


# Names whose byte order differs from most locales' order, prefixes of one another, an
# empty one, one with NUL, and some that look like cursors.
ODD_NAMES = [
    "",
    "a",
    "ab",
    "abc",
    "B",
    "_",
    "é",
    "ß",
    "日本",
    "a\x00b",
    "zset:0:x",
    "set:12",
    "x:y",
]


def names(tag: str, n: int) -> list[str]:
    return ODD_NAMES + [f"{tag}-{random.Random(i).choice('aBz_')}{i:04d}" for i in range(n)]


# Score layouts a group service might use: member index -> the score string it writes.
LAYOUTS: dict[str, Callable[[int], str]] = {
    "all zero": lambda i: "0",
    "join times ms": lambda i: str(1_700_000_000_000 + 37 * i),
    "runs of equal scores": lambda i: str(1_700_000_000_000 + 1000 * (i // 25)),
    "negative": lambda i: str(-1_700_000_000_000 - 3 * (i % 11)),
    "infinities": lambda i: ("-inf", "+inf", "inf", "0", "-0")[i % 5],
    # Neighbouring doubles: a score that went through a Lua number or a 14-digit print
    # would merge them.
    "fractional": lambda i: (
        "0.1",
        "0.30000000000000004",
        "1",
        "1.0000000000000002",
        "0.99999999999999989",
        "1e-300",
        "5e-324",
        "0.3333333333333333",
        "1.7976931348623157e308",
    )[i % 9],
    "mixed": lambda i: (
        "-inf",
        "-1.5",
        "0",
        "1700000000123",
        "1700000000123",
        "1700000000123.5",
        "9007199254740993",
        "inf",
    )[(i * 7) % 8],
}


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_sorted_set_of_any_scores_is_paged_whole_in_redis_order(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str, layout: str
) -> None:
    users = names(tag, 200)
    score = LAYOUTS[layout]
    await zadd(redis_client, tag, [(u, score(i)) for i, u in enumerate(users)])
    redis_order = await redis_client.zrange(key(tag), 0, -1)
    assert sorted(redis_order) == sorted(users)
    assert await redis_store.count(tag) == len(users)
    for count in (1, 3, 25, 26, 1000):
        assert await read_all(redis_store, tag, count) == redis_order, count


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_removing_each_cursor_member_after_its_page_skips_no_one(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str, layout: str
) -> None:
    """Every cursor then names a member that is gone: the binary search path, every page."""
    users = names(tag, 120)
    score = LAYOUTS[layout]
    await zadd(redis_client, tag, [(u, score(i)) for i, u in enumerate(users)])
    redis_order = await redis_client.zrange(key(tag), 0, -1)
    for count in (1, 4):
        read: list[str] = []
        cursor: str | None = ""
        while cursor is not None:
            page, cursor = await redis_store.page(tag, cursor, count)
            read += page
            if cursor is not None:
                await redis_client.zrem(key(tag), page[-1])
        assert read == redis_order, count
        await zadd(redis_client, tag, [(u, score(i)) for i, u in enumerate(users)])


async def test_members_leaving_unread_are_not_paged_and_no_one_who_stays_is_skipped(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = [f"m{i:03d}" for i in range(60)]
    await zadd(redis_client, tag, [(u, str(1000 * (i // 10))) for i, u in enumerate(users)])
    first, cursor = await redis_store.page(tag, "", 15)
    assert first == users[:15] and cursor is not None
    gone = users[10:15] + users[15:17] + users[29:31] + users[59:]  # read, next, later, last
    await redis_client.zrem(key(tag), *gone)
    rest = await read_all(redis_store, tag, 15, cursor)
    assert rest == [u for u in users[15:] if u not in gone]


async def test_members_joining_ahead_of_the_cursor_are_reached_behind_it_are_not(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = [f"m{i:03d}" for i in range(40)]
    await zadd(
        redis_client, tag, [(u, str(1_700_000_000_000 + i // 4)) for i, u in enumerate(users)]
    )
    first, cursor = await redis_store.page(tag, "", 10)  # ends inside the run of score +2
    assert first == users[:10] and cursor is not None
    ahead = [("m009z", "1700000000002"), ("late", "1700000000099"), ("b", "1700000000003")]
    behind = [("a", "1700000000002"), ("early", "1"), ("m0", "-inf")]
    await zadd(redis_client, tag, ahead + behind)
    rest = await read_all(redis_store, tag, 10, cursor)
    assert rest == ["m009z", "m010", "m011", "b", *users[12:], "late"]


async def test_a_member_whose_score_changes_mid_paging_may_be_reached_twice(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = [f"m{i:03d}" for i in range(40)]
    await zadd(
        redis_client, tag, [(u, str(1_700_000_000_000 + i // 4)) for i, u in enumerate(users)]
    )
    first, cursor = await redis_store.page(tag, "", 10)
    assert first == users[:10] and cursor is not None
    # The cursor's own member moves ahead (read again), one unread moves behind (missed).
    await zadd(redis_client, tag, [("m009", "1700000000009"), ("m030", "1")])
    rest = await read_all(redis_store, tag, 10, cursor)
    assert rest == [*(u for u in users[10:36] if u != "m030"), "m009", *users[36:]]


async def test_pages_match_a_model_under_random_joins_leaves_and_score_changes(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    """Every page is exactly the first `count` elements after (cursor score, member) in
    (score, member bytes) order, whatever changed between pages."""
    pool = [LAYOUTS["fractional"](i) for i in range(9)]
    pool += ["-inf", "inf", "-0", "0", "-2.5", "1700000000123", "1700000000124"]
    for seed in range(12):
        rng = random.Random(seed)
        session = f"{tag}-{seed}"
        scores: dict[str, str] = {}

        def fresh_name(rng: random.Random = rng, scores: dict[str, str] = scores) -> str:
            while True:
                name = "".join(rng.choice("aBZ_é0 ") for _ in range(rng.randint(0, 4)))
                if name not in scores:
                    return name

        def order(scores: dict[str, str] = scores) -> list[str]:
            return sorted(scores, key=lambda name: (float(scores[name]), name.encode()))

        for _ in range(rng.randint(0, 80)):
            scores[fresh_name()] = rng.choice(pool)
        await zadd(redis_client, session, list(scores.items()))
        cursor: str | None = ""
        last: tuple[float, bytes] | None = None
        while cursor is not None:
            count = rng.randint(1, 7)
            page, cursor = await redis_store.page(session, cursor, count)
            after = [m for m in order() if last is None or (float(scores[m]), m.encode()) > last]
            assert page == after[:count], (seed, last)
            assert (cursor is not None) == (len(after) > count)
            if page:
                last = (float(scores[page[-1]]), page[-1].encode())
            for _ in range(rng.randint(0, 4)):
                op, existing = rng.random(), list(scores)
                if op < 0.4 or not existing:
                    member, scores_ = fresh_name(), rng.choice(pool)
                    scores[member] = scores_
                    await zadd(redis_client, session, [(member, scores_)])
                elif op < 0.75:
                    member = rng.choice([*existing, *page[-1:]])
                    scores.pop(member, None)
                    await redis_client.zrem(key(session), member)
                else:
                    member = rng.choice(existing)
                    scores[member] = rng.choice(pool)
                    await zadd(redis_client, session, [(member, scores[member])])
            assert await redis_client.zrange(key(session), 0, -1) == order()


async def test_plain_set_is_paged_whole_with_sscan(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = names(tag, 1000)
    await redis_client.sadd(key(tag), *users)
    small = [str(i) for i in range(100)]  # integers: an intset, scanned whole at once
    await redis_client.sadd(key(f"{tag}-small"), *small)
    assert await redis_store.count(tag) == len(users)
    assert await redis_store.count(f"{tag}-small") == len(small)
    for count in (1, 10, 1000):
        # The set only grew before paging, and SSCAN repeats nothing while a table grows.
        read = await read_all(redis_store, tag, count, exact=False)
        assert Counter(read) == Counter(users), count
        small_read = await read_all(redis_store, f"{tag}-small", count, exact=False)
        assert Counter(small_read) == Counter(small), count


async def test_plain_set_changing_mid_paging_reaches_everyone_who_stays(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = [f"u{i:04d}" for i in range(500)]
    await redis_client.sadd(key(tag), *users)
    first, cursor = await redis_store.page(tag, "", 50)
    assert cursor is not None and type(cursor) is str
    unread = [u for u in users if u not in first]
    gone = unread[:100]
    joined = [f"new{i:04d}" for i in range(300)]  # enough to make the table grow
    await redis_client.srem(key(tag), *gone)
    await redis_client.sadd(key(tag), *joined)
    read = first + await read_all(redis_store, tag, 50, cursor, exact=False)
    assert set(users) - set(gone) <= set(read)
    assert not set(gone) & set(read)
    assert set(read) <= set(users) | set(joined)


async def test_missing_key_is_an_empty_group(redis_store: RedisMemberStore, tag: str) -> None:
    for cursor in ("", "zset:1700000000000:someone", "set:1234", "legacy-name"):
        assert await redis_store.page(tag, cursor, 10) == ([], None)
    assert await redis_store.count(tag) == 0


@pytest.mark.parametrize("kind", ["string", "hash", "list", "stream"])
async def test_a_key_of_another_type_is_refused_loudly(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str, kind: str
) -> None:
    if kind == "string":
        await redis_client.set(key(tag), "u1,u2")
    elif kind == "hash":
        await redis_client.hset(key(tag), mapping={"u1": "1", "u2": "2"})
    elif kind == "list":
        await redis_client.rpush(key(tag), "u1", "u2")
    else:
        await redis_client.xadd(key(tag), {"user": "u1"})
    for cursor in ("", "zset:0:u1", "set:5"):
        with pytest.raises(UnpageableGroup) as refused:
            await redis_store.page(tag, cursor, 10)
        assert refused.value.reason == "member_store_wrong_type"
        assert key(tag) in str(refused.value) and kind in str(refused.value)
        assert isinstance(refused.value, ValueError)
    with pytest.raises(UnpageableGroup) as refused:
        await redis_store.count(tag)
    assert refused.value.reason == "member_store_wrong_type" and kind in str(refused.value)


async def test_a_legacy_bare_name_cursor_resumes_on_an_all_zero_set(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    users = sorted(["x:y", "zset:9", *(f"m{i:03d}" for i in range(30))])
    await zadd(redis_client, tag, [(u, "0") for u in users])
    for i in (0, 9, 15, len(users) - 2):
        # What the code before this one saved: the last member name read, nothing else.
        assert await read_all(redis_store, tag, 7, users[i]) == users[i + 1 :], users[i]
    await redis_client.zrem(key(tag), users[9])
    assert await read_all(redis_store, tag, 7, users[9]) == users[10:]


async def test_a_cursor_score_spelled_another_way_resumes_right_after_its_member(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    """Redis prints 1000 and inf; "1e3" and "+inf" name the same scores (slow path)."""
    users = [f"m{i}" for i in range(6)]
    await zadd(
        redis_client, tag, [(u, "1000") for u in users[:3]] + [(u, "inf") for u in users[3:]]
    )
    assert await redis_store.page(tag, "zset:1e3:m1", 2) == (["m2", "m3"], "zset:inf:m3")
    assert await redis_store.page(tag, "zset:+inf:m3", 5) == (["m4", "m5"], None)


async def test_cursors_are_plain_strings_a_fresh_store_resumes_from(
    redis_url: str, redis_client: aioredis.Redis, tag: str
) -> None:
    users = names(tag, 50)
    await zadd(
        redis_client, tag, [(u, str(1_700_000_000_000 + i % 3)) for i, u in enumerate(users)]
    )
    read: list[str] = []
    cursor: str | None = ""
    while cursor is not None:
        store = RedisMemberStore(redis_url)  # a restarted worker, each page
        page, cursor = await store.page(tag, cursor, 6)
        await store.close()
        read += page
        if cursor is not None:
            assert type(cursor) is str
            cursor = json.loads(json.dumps(cursor))  # as the changelogged table keeps it
    assert read == await redis_client.zrange(key(tag), 0, -1)


async def test_a_key_replaced_by_the_other_layout_is_paged_from_its_start(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    await zadd(redis_client, tag, [(f"u{i}", str(i)) for i in range(10)])
    _, cursor = await redis_store.page(tag, "", 4)
    assert cursor is not None
    await redis_client.delete(key(tag))
    await redis_client.sadd(key(tag), "s1", "s2", "s3")
    assert sorted(await read_all(redis_store, tag, 4, cursor, exact=False)) == ["s1", "s2", "s3"]


async def test_add_writes_the_join_time_as_the_score(
    redis_store: RedisMemberStore, redis_client: aioredis.Redis, tag: str
) -> None:
    await redis_store.add(tag, ["u1", "u2"], joined_at_ms=1_700_000_000_123)
    await redis_store.add(tag, ["u2", "u3"], joined_at_ms=1_700_000_000_999)
    assert await redis_client.zrange(key(tag), 0, -1, withscores=True) == [
        ("u1", 1_700_000_000_123),
        ("u2", 1_700_000_000_123),
        ("u3", 1_700_000_000_999),
    ]


async def test_pages_every_member_once_in_byte_order(members: MemberStore, tag: str) -> None:
    users = [f"{tag}-U{i:04d}" for i in range(1250)] + [f"{tag}-a{i:04d}" for i in range(1250)]
    await members.add(f"{tag}-g", users, joined_at_ms=1_700_000_000_000)
    await members.add(f"{tag}-g", users[:10])  # again: nothing changes
    assert await members.count(f"{tag}-g") == 2500
    # Byte order ("U" < "a"): Redis's order for equal scores, PostgreSQL's "C" collation.
    assert await read_all(members, f"{tag}-g", 1000) == sorted(users)
    page, cursor = await members.page(f"{tag}-g", "", 1000)
    assert len(page) == 1000 and type(cursor) is str
    _, last = await members.page(f"{tag}-g", cursor, 1500)
    assert last is None  # a page reaching the end says so: no empty page after it


async def test_members_leaving_mid_read_do_not_make_the_reader_skip(
    members: MemberStore, tag: str
) -> None:
    users = [f"{tag}-m{i:03d}" for i in range(30)]
    await members.add(f"{tag}-g", users)
    first, cursor = await members.page(f"{tag}-g", "", 10)
    assert cursor is not None
    await members.remove(f"{tag}-g", users[:5] + users[9:10] + users[12:13])  # incl. cursor
    rest = await read_all(members, f"{tag}-g", 10, cursor)
    assert first + rest == [u for u in users if u != users[12]]


async def test_sessions_of_a_user_with_join_times(members: MemberStore, tag: str) -> None:
    user = f"{tag}-someone"
    await members.add(f"{tag}-g1", [user], joined_at_ms=1000)
    await members.add(f"{tag}-g2", [user, f"{tag}-other"], joined_at_ms=2000)
    assert await members.sessions_of(user) == {f"{tag}-g1": 1000, f"{tag}-g2": 2000}
    await members.remove(f"{tag}-g1", [user])
    assert await members.sessions_of(user) == {f"{tag}-g2": 2000}


async def test_a_page_count_below_one_is_refused(members: MemberStore, tag: str) -> None:
    with pytest.raises(ValueError, match="count"):
        await members.page(tag, "", 0)


async def test_rows_inserted_by_another_service_are_paged_whole(
    pg_store: PostgresMemberStore, pg: asyncpg.Connection, tag: str
) -> None:
    users = [u.replace("\x00", "0") for u in names(tag, 300)]  # text holds no NUL
    await pg.executemany(
        "INSERT INTO t_group_member (session_id, username, joined_at) VALUES ($1, $2, $3)",
        [(tag, u, 1_700_000_000_000 + i) for i, u in enumerate(users)],
    )
    await pg.execute("INSERT INTO t_group_member VALUES ($1, 'another group', 0)", f"{tag}-other")
    assert await pg_store.count(tag) == len(users)
    for count in (1, 7, 299, 300, 1000):
        assert await read_all(pg_store, tag, count) == sorted(users), count


async def test_pages_reflect_inserts_and_deletes_between_pages(
    pg_store: PostgresMemberStore, pg: asyncpg.Connection, tag: str
) -> None:
    users = [f"m{i:03d}" for i in range(40)]
    insert = "INSERT INTO t_group_member VALUES ($1, unnest($2::text[]), 0)"
    await pg.execute(insert, tag, users)
    first, cursor = await pg_store.page(tag, "", 10)
    assert first == users[:10] and cursor is not None
    gone = [users[9], users[10], users[25], users[39]]  # the cursor, next, later, last
    await pg.execute(
        "DELETE FROM t_group_member WHERE session_id = $1 AND username = ANY($2)", tag, gone
    )
    await pg.execute(insert, tag, ["m009a", "m100", "a-behind"])
    rest = await read_all(pg_store, tag, 10, cursor)
    assert rest == sorted([u for u in users[10:] if u not in gone] + ["m009a", "m100"])


async def test_postgres_legacy_cursor_and_fresh_store(
    postgres_dsn: str, pg_schema: str, pg_store: PostgresMemberStore, tag: str
) -> None:
    users = [f"m{i:03d}" for i in range(30)]
    await pg_store.add(tag, users)
    assert await read_all(pg_store, tag, 8, "m009") == users[10:]  # a bare name: old cursor
    read: list[str] = []
    cursor: str | None = ""
    while cursor is not None:
        store = PostgresMemberStore(postgres_dsn, search_path=pg_schema)
        page, cursor = await store.page(tag, cursor, 7)
        await store.close()
        read += page
        cursor = json.loads(json.dumps(cursor))
    assert read == users


async def test_postgres_pages_match_a_model_under_random_inserts_and_deletes(
    pg_store: PostgresMemberStore, pg: asyncpg.Connection, tag: str
) -> None:
    for seed in range(6):
        rng = random.Random(seed)
        session = f"{tag}-{seed}"
        present: set[str] = set()

        def fresh(rng: random.Random = rng, present: set[str] = present) -> list[str]:
            made = {"".join(rng.choice("aBZ_é0 ") for _ in range(rng.randint(0, 4)))}
            return sorted(made - present)

        for _ in range(rng.randint(0, 60)):
            present.update(fresh())
        await pg.execute(
            "INSERT INTO t_group_member VALUES ($1, unnest($2::text[]), 0)",
            session,
            sorted(present),
        )
        cursor: str | None = ""
        last: str | None = None
        while cursor is not None:
            count = rng.randint(1, 7)
            page, cursor = await pg_store.page(session, cursor, count)
            after = sorted(m for m in present if last is None or m > last)
            assert page == after[:count], (seed, last)
            assert (cursor is not None) == (len(after) > count)
            last = page[-1] if page else last
            added = fresh()
            removed = rng.sample(sorted(present), min(len(present), rng.randint(0, 3)))
            present.update(added)
            present.difference_update(removed)
            await pg.execute(
                "INSERT INTO t_group_member VALUES ($1, unnest($2::text[]), 0)", session, added
            )
            await pg.execute(
                "DELETE FROM t_group_member WHERE session_id = $1 AND username = ANY($2)",
                session,
                removed,
            )


def their_table(tag: str) -> str:
    return f'{tag} "Group" Members'


def quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.fixture
async def their_store(
    postgres_dsn: str, pg_schema: str, pg: asyncpg.Connection, tag: str
) -> AsyncIterator[PostgresMemberStore]:
    """Another service's table: other names, a bigint group id, ICU collation, NULLs."""
    table = quoted(their_table(tag))
    await pg.execute(
        f'CREATE TABLE {table} ("GroupId" bigint NOT NULL, "Member Name" text'
        ' COLLATE "en-x-icu", "Joined" timestamptz NOT NULL DEFAULT now())'
    )
    await pg.execute(f'CREATE INDEX ON {table} ("GroupId", "Member Name")')
    store = PostgresMemberStore(
        postgres_dsn,
        search_path=pg_schema,
        table=their_table(tag),
        session_column="GroupId",
        user_column="Member Name",
        joined_at_column="Joined",
    )
    yield store
    await store.close()


async def test_another_services_table_with_a_bigint_group_column(
    their_store: PostgresMemberStore, pg: asyncpg.Connection, tag: str
) -> None:
    table = quoted(their_table(tag))
    users = [u.replace("\x00", "0") for u in names(tag, 200)] + ["Á", "á", "A"]
    await pg.execute(
        f'INSERT INTO {table} ("GroupId", "Member Name") SELECT 7, unnest($1::text[])', users
    )
    await pg.execute(
        f'INSERT INTO {table} ("GroupId", "Member Name") VALUES (7, NULL), (8, $1)', "x"
    )
    collated = [
        r[0]
        for r in await pg.fetch(
            f'SELECT "Member Name" FROM {table} WHERE "GroupId" = 7'
            ' AND "Member Name" IS NOT NULL ORDER BY "Member Name"'
        )
    ]
    assert collated != sorted(users)  # the collation's order is not byte order
    assert await their_store.count("7") == len(users)  # NULL members are not counted
    for count in (1, 2, 5, 1000):
        assert await read_all(their_store, "7", count) == collated, count
    assert await their_store.page("12345", "", 10) == ([], None)


@pytest.mark.parametrize("session_id", ["general", "99999999999999999999", "7 OR 1=1", ""])
async def test_a_session_id_the_group_column_cannot_hold_is_refused(
    their_store: PostgresMemberStore, tag: str, session_id: str
) -> None:
    for call in (
        lambda: their_store.page(session_id, "", 10),
        lambda: their_store.page(session_id, "pg:someone", 10),
        lambda: their_store.count(session_id),
    ):
        with pytest.raises(UnpageableGroup) as refused:
            await call()
        assert refused.value.reason == "member_session_id_invalid"
        assert "bigint" in str(refused.value) and "GroupId" in str(refused.value)


async def test_their_table_add_and_sessions_of_keep_ms_in_a_timestamp_column(
    their_store: PostgresMemberStore, pg: asyncpg.Connection, tag: str
) -> None:
    await their_store.add("7", ["alice", "bob"], joined_at_ms=1_700_000_000_123)
    await their_store.add("8", ["alice"], joined_at_ms=1_700_000_000_999)
    assert await their_store.sessions_of("alice") == {
        "7": 1_700_000_000_123,
        "8": 1_700_000_000_999,
    }
    await their_store.remove("7", ["alice"])
    assert await their_store.sessions_of("alice") == {"8": 1_700_000_000_999}
    assert await read_all(their_store, "7", 10) == ["bob"]


async def test_a_case_insensitive_collation_skips_no_one(
    postgres_dsn: str, pg_schema: str, pg: asyncpg.Connection, tag: str
) -> None:
    """Names its collation calls equal are still different users, each paged once."""
    await pg.execute(
        f"CREATE COLLATION IF NOT EXISTS {tag}_ci"
        " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
    )
    await pg.execute(f"CREATE TABLE {tag}_m (grp text, name text COLLATE {tag}_ci, at bigint)")
    users = ["alice", "Alice", "ALICE", "bob", "Bob", "carol", "aLiCe", "BOB"]
    await pg.execute(f"INSERT INTO {tag}_m SELECT 'g', unnest($1::text[]), 0", users)
    store = PostgresMemberStore(
        postgres_dsn,
        search_path=pg_schema,
        table=f"{tag}_m",
        session_column="grp",
        user_column="name",
        joined_at_column="at",
    )
    try:
        for count in (1, 2, 3, 100):
            assert Counter(await read_all(store, "g", count)) == Counter(users), count
    finally:
        await store.close()


async def test_a_missing_table_or_column_is_refused_and_not_created(
    postgres_dsn: str, pg_schema: str, pg: asyncpg.Connection, tag: str
) -> None:
    missing = PostgresMemberStore(postgres_dsn, search_path=pg_schema, table=f"{tag}_none")
    try:
        with pytest.raises(MemberTableError, match=f"{tag}_none"):
            await missing.page("g", "", 10)
        assert await pg.fetchval("SELECT to_regclass($1)", f"{tag}_none") is None
        await pg.execute(f"CREATE TABLE {tag}_none (session_id text, username text)")
        with pytest.raises(MemberTableError, match="joined_at"):
            await missing.count("g")
        await pg.execute(f"ALTER TABLE {tag}_none ADD COLUMN joined_at bigint")
        assert await missing.count("g") == 0  # fixed without a restart
    finally:
        await missing.close()


@pytest.mark.parametrize("name", ["", "a\x00b", "x" * 64])
def test_an_identifier_postgresql_would_not_keep_as_is_is_refused(
    postgres_dsn: str, name: str
) -> None:
    with pytest.raises(ValueError, match="identifier"):
        PostgresMemberStore(postgres_dsn, user_column=name)
