"""The whole pipeline with inboxes and members in PostgreSQL instead of Redis."""

from __future__ import annotations

import asyncio

from resonance_task.commands.traffic import group_chat, single_chat
from resonance_task.embedded.expectations import expected, received
from resonance_task.stores.postgres import PostgresInboxStore, PostgresMemberStore
from tests.harness import PipelineFactory, eventually


async def test_postgres_backends_store_every_inbox_entry_once(
    pipeline_factory: PipelineFactory, postgres_dsn: str, pg_schema: str
) -> None:
    p = pipeline_factory(
        inbox_backend="postgres",
        member_backend="postgres",
        postgres_dsn=postgres_dsn,
        postgres_schema=pg_schema,
        large_group_min_members=40,
    )
    members = PostgresMemberStore(postgres_dsn, search_path=pg_schema)
    inbox = PostgresInboxStore(postgres_dsn, max_entries=0, search_path=pg_schema)
    try:
        worker = await p.start_worker()
        users = [p.user(i) for i in range(60)]
        small, large = f"{p.tag}-small", f"{p.tag}-large"
        await members.add(small, users[:20])
        await members.add(large, users)  # paged by large_group, from PostgreSQL
        sim = await p.gateway("gw-pg", users[:30])
        await p.wait_routable(worker, 30)
        events = [single_chat(users[i], users[i + 1], 1, f"pg {i}") for i in range(0, 50, 2)]
        events += [group_chat(users[3], small, 1, "small"), group_chat(users[4], large, 1, "all")]
        await p.publish(events)
        want = expected(events, {small: users[:20], large: users}, set(users[:30]))

        async def stored() -> bool:
            return sum([await inbox.last_cursor(u) for u in users]) >= want.inbox_total

        await eventually(stored, 60, "every inbox entry in PostgreSQL")
        await eventually(
            lambda: _true(len(sim.recorder.deliveries) >= want.pushed_total), 30, "pushes"
        )
        await p.settled(jobs=[events[-1].msg_id], worker=worker)  # the large group's too
        for user in users:
            entries = await inbox.read(user, 0, 100)
            assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
            assert [e.cursor for e in entries] == list(range(1, len(entries) + 1))
        got = received([sim])
        assert {u: sorted(c.elements()) for u, c in got.items()} == {
            u: sorted(ids) for u, ids in want.pushed.items()
        }
        status, body = await asyncio.to_thread(worker.get, f"/inbox/{users[4]}")
        assert status == 200
        contents = sorted(e["message"]["content"] for e in body["entries"])
        assert contents == ["all", "pg 4", "small"]
    finally:
        await members.close()
        await inbox.close()


async def _true(value: bool) -> bool:
    return value
