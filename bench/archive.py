"""Benchmark: one inbox_archive pass (stores/archive.py) over many Redis inboxes.

    python -m bench.archive [--inboxes 20000] [--entries 10] [--old 0.05]

Inboxes are written through the inbox store, as the storage stage writes them; a share
`--old` of them hold entries older than the age rule, the rest only young ones (the
usual case: most inboxes have nothing to move). Prints one JSON document: the pass's
seconds, inboxes scanned and archived, entries moved, and the Redis commands it sent
(INFO commandstats, before and after), so two versions compare by round trips as well
as by time. Redis (database 12, flushed) and PostgreSQL (database `test`, a schema of
its own) share this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.archive import InboxArchive
from resonance_task.stores.inbox import RedisInboxStore

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
POSTGRES_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
HOUR_MS = 3_600_000


async def _commands(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))


async def run(inboxes: int, entries: int, old_share: float) -> dict[str, Any]:
    schema = "bench_archive_" + uuid.uuid4().hex[:6]
    conn = await asyncpg.connect(POSTGRES_DSN)
    await conn.execute(f"CREATE SCHEMA {schema}")
    client = aioredis.from_url(REDIS_URL)
    await client.flushdb()
    store = RedisInboxStore(REDIS_URL, max_entries=1000, message_ttl=3600)
    archive = InboxArchive(store, POSTGRES_DSN, keep_entries=0, after_seconds=1800,
                           search_path=schema)  # fmt: skip
    try:
        now = int(time.time() * 1000)
        old_every = max(1, round(1 / old_share)) if old_share > 0 else 0
        batch: list[tuple[PushMessage, list[str]]] = []
        for i in range(inboxes):
            old = old_every and i % old_every == 0
            for e in range(entries):
                msg_id = 1_000_000_000 + i * entries + e
                age = 2 * HOUR_MS if old and e < entries // 2 else 0
                message = PushMessage(msg_id=msg_id, seq_id=e, session_id=f"s{i}",
                                      timestamp=now - age, content="x" * 64)  # fmt: skip
                batch.append((message, [f"u{i:07d}"]))
            if len(batch) >= 5000:
                await store.write(batch)
                batch = []
        if batch:
            await store.write(batch)
        await archive.read("nobody", 0, 1)  # the schema, outside the measurement
        before = await _commands(client)
        started = time.monotonic()
        result = await archive.run()
        seconds = time.monotonic() - started
        sent = await _commands(client) - before
        return {
            "inboxes": inboxes,
            "entries_each": entries,
            "old_share": old_share,
            "pass_s": round(seconds, 2),
            "inboxes_per_s": round(inboxes / seconds),
            "redis_commands": sent,
            **result.as_dict(),
        }
    finally:
        await archive.close()
        await store.close()
        await client.flushdb()
        await client.aclose()
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inboxes", type=int, default=20_000)
    parser.add_argument("--entries", type=int, default=10)
    parser.add_argument("--old", type=float, default=0.05)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.inboxes, args.entries, args.old)), indent=2))


if __name__ == "__main__":
    main()
