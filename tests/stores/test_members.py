"""The member store: the same tests against the real Redis and the real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from stores.members import MemberStore, RedisMemberStore
from stores.postgres import PostgresMemberStore


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


async def read_all(store: MemberStore, session_id: str, count: int) -> list[str]:
    out: list[str] = []
    cursor: str | None = ""
    while cursor is not None:
        page, cursor = await store.page(session_id, cursor, count)
        out += page
    return out


async def test_pages_every_member_once_in_byte_order(members: MemberStore, tag: str) -> None:
    users = [f"{tag}-U{i:04d}" for i in range(1250)] + [f"{tag}-a{i:04d}" for i in range(1250)]
    await members.add(f"{tag}-g", users)
    await members.add(f"{tag}-g", users[:10])  # again: nothing changes
    assert await members.count(f"{tag}-g") == 2500
    # Byte order ("U" < "a"), as Redis BYLEX and PostgreSQL's "C" collation both give.
    assert await read_all(members, f"{tag}-g", 1000) == sorted(users)
    page, cursor = await members.page(f"{tag}-g", "", 1000)
    assert len(page) == 1000 and cursor == page[-1]


async def test_members_leaving_mid_read_do_not_make_the_reader_skip(
    members: MemberStore, tag: str
) -> None:
    users = [f"{tag}-m{i:03d}" for i in range(30)]
    await members.add(f"{tag}-g", users)
    first, cursor = await members.page(f"{tag}-g", "", 10)
    await members.remove(f"{tag}-g", users[:5] + users[12:13])  # some read, one not yet
    rest = []
    while cursor is not None:
        page, cursor = await members.page(f"{tag}-g", cursor, 10)
        rest += page
    assert first + rest == [u for u in users if u != users[12]]


async def test_sessions_of_a_user_with_join_times(members: MemberStore, tag: str) -> None:
    user = f"{tag}-someone"
    await members.add(f"{tag}-g1", [user], joined_at_ms=1000)
    await members.add(f"{tag}-g2", [user, f"{tag}-other"], joined_at_ms=2000)
    assert await members.sessions_of(user) == {f"{tag}-g1": 1000, f"{tag}-g2": 2000}
    await members.remove(f"{tag}-g1", [user])
    assert await members.sessions_of(user) == {f"{tag}-g2": 2000}
