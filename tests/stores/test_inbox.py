"""The Redis inbox store against the real Redis."""

from __future__ import annotations

import pytest

from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from stores.inbox import RedisInboxStore

BASE = 7_300_000_000_000_000_000  # Snowflake-sized: beyond a double's exact range


@pytest.fixture(params=[False, True], ids=["multi-user-calls", "cluster-safe"])
async def store(redis_url: str, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    s = RedisInboxStore(redis_url, max_entries=0, message_ttl=600, cluster=request.param)
    yield s
    await s.close()


def msg(i: int, session: str = "s") -> PushMessage:
    return PushMessage(msg_id=BASE + i, seq_id=i, session_id=session, content=f"m{i}")


async def test_cursors_have_no_gaps_and_writes_are_idempotent(
    store: RedisInboxStore, tag: str
) -> None:
    users = [f"{tag}-a", f"{tag}-b"]
    first = await store.write([(msg(i), users) for i in range(1, 6)])
    again = await store.write([(msg(i), users) for i in (3, 1, 5)] + [(msg(6), users[:1])])
    assert (first.new, first.duplicate) == (10, 0)
    assert (again.new, again.duplicate) == (1, 6)
    entries = await store.read(users[0], 0, 100)
    assert [e.cursor for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.msg_id for e in entries] == [BASE + i for i in range(1, 7)]
    assert entries[0].message is not None and entries[0].message.content == "m1"
    assert await store.last_cursor(users[1]) == 5
    assert [e.cursor for e in await store.read(users[0], 4, 1)] == [5]


async def test_capped_inbox_does_not_readmit_trimmed_messages(redis_url: str, tag: str) -> None:
    store = RedisInboxStore(redis_url, max_entries=3, message_ttl=600)
    user = f"{tag}-capped"
    await store.write([(msg(i), [user]) for i in range(1, 8)])
    before = [(e.cursor, e.msg_id) for e in await store.read(user, 0, 10)]
    replay = await store.write([(msg(i), [user]) for i in range(1, 8)])
    after = [(e.cursor, e.msg_id) for e in await store.read(user, 0, 10)]
    await store.close()
    assert before == after == [(5, BASE + 5), (6, BASE + 6), (7, BASE + 7)]
    assert replay.new == 0
