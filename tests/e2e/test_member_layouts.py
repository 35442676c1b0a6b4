"""Groups written by the platform's group service, not by us: every recipient, counted.

A new user's first try: `ZADD group:{g}:members <join time in ms> <user>` for a 20,000
member group reached 2,283 of 45,000 pushes and 3,000 of 60,000 inbox entries, silently
(ZRANGE BYLEX is undefined unless every score is equal). Here the members are written
raw, the way that service would, in several layouts, and mutated while a large group is
paged; each inbox entry, push and offline push is counted exactly.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import asyncpg
import pytest
import redis.asyncio as aioredis

from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.expectations import Expected, expected, received
from resonance_task.embedded.worker import WorkerProcess
from resonance_task.pipeline.dlq import H_REASON
from tests.harness import Pipeline, PipelineFactory, eventually, inbox_msg_ids

pytestmark = pytest.mark.slow

JOINED = 1_700_000_000_000
Scores = Callable[[int, random.Random], float]


def joined_order(i: int) -> int:
    """The i-th member's place in join order: members did not join in name order."""
    return (i * 7919) % 10_007


LAYOUTS: dict[str, Scores] = {
    "join_time_ms": lambda i, rng: JOINED + joined_order(i) * 37 + rng.randrange(30),
    # runs of 250 equal scores (members imported in bulk)
    "repeated": lambda i, rng: float(JOINED + (joined_order(i) // 250) * 1000),
    "negative_and_infinite": lambda i, rng: (
        float("-inf") if i % 97 == 0 else float("inf") if i % 89 == 0 else -i * 1.5
    ),
    "all_zero": lambda i, rng: 0.0,
}


async def write_zset(redis_url: str, session_id: str, members: list[str], scores: Scores) -> None:
    """As the group service does: ZADD with its own scores, 1,000 at a time."""
    client = aioredis.from_url(redis_url)
    rng = random.Random(session_id)
    try:
        for start in range(0, len(members), 1000):
            chunk = members[start : start + 1000]
            await client.zadd(
                f"group:{{{session_id}}}:members",
                {m: scores(start + i, rng) for i, m in enumerate(chunk)},
            )
    finally:
        await client.aclose()


async def exact(p: Pipeline, members: list[str], want: Expected, *, seconds: float = 90) -> None:
    async def stored() -> bool:
        inboxes = await inbox_msg_ids(p.redis_url, members)
        return sum(len(ids) for ids in inboxes.values()) >= want.inbox_total

    async def pushed() -> bool:
        return sum(len(s.recorder.deliveries) for s in p.sims) >= want.pushed_total

    await eventually(stored, seconds, f"{want.inbox_total} inbox entries")
    await eventually(pushed, seconds, f"{want.pushed_total} pushes")

    async def offline() -> bool:
        return sum(len(o.users) for o in await p.offline()) >= want.offline_total

    await eventually(offline, 60, f"{want.offline_total} offline users")
    await p.settled(worker=p.workers[0])  # its large-group jobs too: a duplicate is in by now
    inboxes = await inbox_msg_ids(p.redis_url, members)
    assert {u: sorted(ids) for u, ids in inboxes.items() if ids} == {
        u: sorted(ids) for u, ids in want.inbox.items()
    }
    got = received(p.sims)
    assert {u: sorted(c.elements()) for u, c in got.items()} == {
        u: sorted(ids) for u, ids in want.pushed.items()
    }
    offline_users: dict[int, set[str]] = {}
    for record in await p.offline():
        offline_users.setdefault(record.message.msg_id, set()).update(record.users)
    assert offline_users == dict(want.offline)


async def online_on_two_gateways(p: Pipeline, worker: WorkerProcess, users: list[str]) -> None:
    await p.gateway("gw-1", users[: len(users) // 2])
    await p.gateway("gw-2", users[len(users) // 2 :])

    async def seen() -> bool:
        _, stats = await asyncio.to_thread(worker.get, "/stats")
        return int(stats["online_users"]) >= len(users)

    await eventually(seen, 60, f"{len(users)} online users")


async def test_every_member_reached_whatever_the_scores(pipeline_factory: PipelineFactory) -> None:
    """Every layout at once, on one worker: a large group (paged by large_group) and a
    small one (paged inline) per layout, the same members in each."""
    p = pipeline_factory()
    worker = await p.start_worker()
    large = [p.user(i) for i in range(6000)]  # paged by large_group (2000+ members)
    small = [p.user(i) for i in range(0, 6000, 4)]  # 1500: paged inline, 2 pages
    groups: dict[str, list[str]] = {}
    events = []
    for layout, scores in sorted(LAYOUTS.items()):
        group, chat = f"{p.tag}-large-{layout}", f"{p.tag}-small-{layout}"
        await write_zset(p.redis_url, group, large, scores)
        await write_zset(p.redis_url, chat, small, scores)
        groups.update({group: large, chat: small})
        events += [group_chat(large[1], group, s, f"{layout} large {s}") for s in (1, 2)]
        events += [group_chat(small[1], chat, s, f"{layout} small {s}") for s in (1, 2)]
    online = large[: len(large) * 3 // 4]
    await online_on_two_gateways(p, worker, online)
    await p.publish(events)
    # A member a layout lost shows in the diff under that layout's msg_ids.
    await exact(p, large, expected(events, groups, set(online)), seconds=120)
    _, stats = await asyncio.to_thread(worker.get, "/stats")
    assert stats["counters"]["resonance_large_group_jobs_total{diffusion=write}"] == 2 * len(
        LAYOUTS
    )


async def test_a_plain_set_of_members_is_paged_too(pipeline_factory: PipelineFactory) -> None:
    p = pipeline_factory()
    worker = await p.start_worker()
    members = [p.user(i) for i in range(3000)]
    group = f"{p.tag}-set"
    client = aioredis.from_url(p.redis_url)
    try:
        for start in range(0, len(members), 1000):
            await client.sadd(f"group:{{{group}}}:members", *members[start : start + 1000])
    finally:
        await client.aclose()
    online = members[::2]
    await online_on_two_gateways(p, worker, online)
    events = [group_chat(members[0], group, s, f"set {s}") for s in (1, 2)]
    await p.publish(events)
    await exact(p, members, expected(events, {group: members}, set(online)))


async def test_members_joining_and_leaving_while_a_large_group_is_paged(
    pipeline_factory: PipelineFactory,
) -> None:
    # 12 pages of 500 at 4 a second: the group changes while it is being read.
    p = pipeline_factory(large_group_page_size=500, large_group_pages_per_second=4)
    worker = await p.start_worker()
    members = [p.user(i) for i in range(6000)]
    group = f"{p.tag}-moving"
    await write_zset(p.redis_url, group, members, LAYOUTS["join_time_ms"])
    online = members[::3]
    await online_on_two_gateways(p, worker, online)
    event = group_chat(members[0], group, 1, "while you were joining")
    await p.publish([event])

    async def reading() -> bool:
        _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
        return any(j["pages"] >= 2 for j in jobs["in_progress"])

    await eventually(reading, 30, "two pages done")
    client = aioredis.from_url(p.redis_url)
    key = f"group:{{{group}}}:members"
    by_join = [members[i] for i in sorted(range(len(members)), key=joined_order)]
    left_read = by_join[:100]  # already read: they keep the message
    left_unread = by_join[-300:]  # the newest joiners, not reached yet
    joined = [p.user(10_000 + i) for i in range(200)]  # join now: ahead of the cursor
    try:
        await client.zrem(key, *left_read, *left_unread)
        await client.zadd(key, {u: JOINED + 10**9 + i for i, u in enumerate(joined)})
    finally:
        await client.aclose()

    async def finished() -> bool:
        _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
        return any(j["msg_id"] == event.msg_id for j in jobs["finished"])

    await eventually(finished, 60, "the job to finish")
    stayed = [u for u in members if u not in set(left_unread)]
    reached = stayed + joined
    want = expected([event], {group: reached}, set(online))
    await exact(p, members + joined, want)


async def test_a_group_we_cannot_page_is_dead_lettered_and_the_rest_flows(
    pipeline_factory: PipelineFactory,
) -> None:
    p = pipeline_factory()
    worker = await p.start_worker()
    client = aioredis.from_url(p.redis_url)
    bad, good = f"{p.tag}-bad", f"{p.tag}-good"
    members = [p.user(i) for i in range(10)]
    try:
        await client.hset(f"group:{{{bad}}}:members", mapping=dict.fromkeys(members, "1"))
    finally:
        await client.aclose()
    await write_zset(p.redis_url, good, members, LAYOUTS["join_time_ms"])
    lost, fine = group_chat(members[0], bad, 1, "lost?"), group_chat(members[0], good, 1, "ok")
    await p.publish([lost, fine])

    async def fine_stored() -> bool:
        inboxes = await inbox_msg_ids(p.redis_url, members)
        return all(ids == [fine.msg_id] for ids in inboxes.values())

    await eventually(fine_stored, 30, "the good group's inboxes")
    dead = await p.read_topic(p.topic("TOPIC_PUSH_EVENTS") + ".dlq")
    assert [dict(r.headers)[H_REASON] for r in dead] == [b"member_store_wrong_type"]
    _, stats = await asyncio.to_thread(worker.get, "/stats")
    refused = "resonance_member_store_refused_total{reason=member_store_wrong_type}"
    assert stats["counters"][refused] == 1


async def test_a_member_table_another_service_owns_in_postgresql(
    pipeline_factory: PipelineFactory, postgres_dsn: str, pg_schema: str
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    table = f"group_members_{pg_schema[-8:]}"
    try:
        await conn.execute(
            f"CREATE TABLE {pg_schema}.{table} (group_id bigint, member text, "
            "joined timestamptz DEFAULT now(), PRIMARY KEY (group_id, member))"
        )
        p = pipeline_factory(
            member_backend="postgres",
            postgres_dsn=postgres_dsn,
            postgres_schema=pg_schema,
            member_pg_table=table,
            member_pg_session_column="group_id",
            member_pg_user_column="member",
            member_pg_joined_at_column="joined",
            large_group_page_size=500,
            large_group_pages_per_second=4,
        )
        members = [p.user(i) for i in range(4000)]
        await conn.executemany(
            f"INSERT INTO {pg_schema}.{table} (group_id, member) VALUES ($1, $2)",
            [(7001, m) for m in members] + [(7002, m) for m in members[:300]],
        )
        worker = await p.start_worker()
        online = members[::4]
        await online_on_two_gateways(p, worker, online)
        events = [group_chat(members[2], "7001", 1, "big"), group_chat(members[3], "7002", 1, "s")]
        await p.publish(events)

        async def reading() -> bool:
            _, jobs = await asyncio.to_thread(worker.get, "/large-groups")
            return any(j["pages"] >= 2 for j in jobs["in_progress"])

        await eventually(reading, 30, "two pages done")
        # The group service removes the last 100 members and adds 50 mid-paging.
        await conn.execute(
            f"DELETE FROM {pg_schema}.{table} WHERE group_id = 7001 AND member = ANY($1)",
            members[-100:],
        )
        joined = [p.user(9000 + i) for i in range(50)]
        await conn.executemany(
            f"INSERT INTO {pg_schema}.{table} (group_id, member) VALUES ($1, $2)",
            [(7001, m) for m in joined],
        )
        want = expected(
            events, {"7001": members[:-100] + joined, "7002": members[:300]}, set(online)
        )
        await exact(p, members + joined, want)
    finally:
        await conn.close()
