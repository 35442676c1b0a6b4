"""The leader's periodic tasks on a real worker: inbox_archive moves the oldest inbox
entries to PostgreSQL while /inbox still shows them all, and stats_report publishes each
period's counts, served at /api/v1/stats/hourly."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from resonance_task.commands.traffic import single_chat
from tests.harness import PipelineFactory, eventually

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("empty_redis")
async def test_the_leader_archives_inboxes_and_reports_every_period(
    pipeline_factory: PipelineFactory, postgres_dsn: str, pg_schema: str
) -> None:
    p = pipeline_factory(
        tasks_enabled=True,
        postgres_dsn=postgres_dsn,
        postgres_schema=pg_schema,
        inbox_archive_keep_entries=5,
        inbox_archive_interval_seconds=2,
        stats_report_interval_seconds=2,
    )
    worker = await p.start_worker()
    reader = p.user(0)
    events = [single_chat(p.user(i), reader, 1, f"hello {i}") for i in range(1, 13)]
    for event in events:
        # A record a request: Tansu's end offsets are exact for one-record batches only.
        await p.publish([event])

    redis = aioredis.from_url(p.redis_url)

    async def archived() -> bool:
        # Kept in Redis: the newest five of the reader's; every sender's own copy.
        kept = await redis.zcard(f"inbox:{{{reader}}}")
        return bool(kept == 5 and await redis.exists(f"inbox:{{{reader}}}:archived"))

    try:
        await eventually(archived, 60, "the reader's inbox archived down to 5")
    finally:
        await redis.aclose()
    status, body = await asyncio.to_thread(worker.get, f"/inbox/{reader}?limit=100")
    assert status == 200, body
    assert [e["cursor"] for e in body["entries"]] == list(range(1, 13))
    # Twelve sessions, so twelve partitions' order: every message once, in some order.
    assert sorted(e["message"]["content"] for e in body["entries"]) == sorted(
        e.content for e in events
    )
    status, body = await asyncio.to_thread(worker.get, f"/inbox/{reader}?after=4&limit=3")
    assert [e["cursor"] for e in body["entries"]] == [5, 6, 7]

    async def archive_ran() -> bool:
        # A pass SCANs every inbox of the database: it may still be going when the
        # reader's entries have moved.
        status, runs = await asyncio.to_thread(
            worker.get, "/api/v1/tasks?task_type=inbox_archive&status=succeeded"
        )
        assert status == 200, runs
        return bool(runs["tasks"])

    await eventually(archive_ran, 60, "an inbox_archive run to succeed")
    conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": pg_schema})
    try:
        moved = await conn.fetchval(
            "SELECT count(*) FROM t_inbox WHERE owner_username = $1", reader
        )
    finally:
        await conn.close()
    assert moved == 7

    reports: list[dict[str, Any]] = []

    async def counted() -> bool:
        nonlocal reports
        status, body = await asyncio.to_thread(worker.get, "/api/v1/stats/hourly?limit=1000")
        assert status == 200, body
        reports = body["reports"]
        events_in = sum(r["records"]["push_events"] for r in reports)
        finished = sum(r["tasks"]["succeeded"] for r in reports)  # archive and report runs
        return bool(events_in == len(events) and finished >= 2)

    await eventually(counted, 30, "stats reports counting every event and finished task")
    # Each period once, newest first; the spans counted chain without gap or overlap (in
    # the order they ran: a report that waited for another's lock counts after it).
    periods = [r["period"] for r in reports]
    assert periods == sorted(set(periods), reverse=True)
    spans = sorted((r["from"] or 0, r["to"]) for r in reports)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
    status, body = await asyncio.to_thread(worker.get, "/api/v1/stats/hourly?limit=0")
    assert status == 400 and body["field"] == "limit"
