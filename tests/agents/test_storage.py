"""The storage stage against a real Redis: a refused recipient costs only itself."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord

from resonance_task.agents.storage import StorageConsumer
from resonance_task.pipeline import retry
from resonance_task.pipeline.dlq import H_ERROR, H_REASON, DeadLetters
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch
from resonance_task.stores.inbox import RedisInboxStore
from resonance_task.stores.postgres import PostgresInboxStore
from tests.offline.conftest import DeadSink


def stage(inbox: RedisInboxStore, dead: DeadSink) -> StorageConsumer:
    return StorageConsumer(
        inbox=inbox,
        dead_letters=DeadLetters(dead.send),
        retry_max_seconds=0.05,
        topic="deliveries",
        consumer_config={},
        batch_max_records=100,
    )


def record(offset: int, *deliveries: tuple[int, list[str]]) -> ConsumerRecord[Any, Any]:
    batch = DeliveryBatch()
    for msg_id, users in deliveries:
        batch.deliveries.add(
            message=PushMessage(msg_id=msg_id, session_id="s", seq_id=msg_id, content="hi"),
            users=users,
        )
    return ConsumerRecord(
        "deliveries", 0, offset, 0, 0, None, batch.SerializeToString(), None, 0, 0, ()
    )


async def test_a_wrong_type_inbox_key_dead_letters_that_recipient_only(
    redis_url: str, redis_client: aioredis.Redis, tag: str
) -> None:
    users = [f"{tag}-u{i}" for i in range(40)]
    broken = users[17]
    await redis_client.set(f"inbox:{{{broken}}}", "x")  # a bug elsewhere, an operator's typo
    inbox = RedisInboxStore(redis_url, max_entries=0, message_ttl=600)
    dead = DeadSink()
    storage = stage(inbox, dead)
    try:
        records = [record(0, (101, users), (102, users[10:30])), record(1, (103, users[15:20]))]
        await asyncio.wait_for(storage.handle(records), 10)
        sent = ((101, users), (102, users[10:30]), (103, users[15:20]))
        for user in users:
            if user != broken:
                got = [e.msg_id for e in await inbox.read(user, 0, 10)]
                assert got == [m for m, to in sent if user in to], user
        # One dead letter per message the broken inbox missed, holding just that user.
        assert [h[H_REASON] for _, _, h in dead.records] == [b"inbox_wrong_type"] * 3
        letters = [DeliveryBatch.FromString(v or b"").deliveries[0] for _, v, _ in dead.records]
        assert sorted(d.message.msg_id for d in letters) == [101, 102, 103]
        assert all(list(d.users) == [broken] for d in letters)
        assert b"WRONGTYPE" in dead.records[0][2][H_ERROR]
        stats = storage.stats()
        # Pairs a failed try wrote before its error count as duplicates when redone.
        assert stats["refused"] == 3 and stats["new"] + stats["duplicates"] == 40 + 20 + 5 - 3
        # The next batch is not held back by the broken key either.
        await asyncio.wait_for(storage.handle([record(2, (104, users[16:19]))]), 10)
        assert storage.stats()["refused"] == 4
    finally:
        await inbox.close()


async def test_a_store_away_is_retried_and_reported_as_a_stall(tag: str) -> None:
    inbox = RedisInboxStore("redis://127.0.0.1:1/0", max_entries=0, message_ttl=600, timeout=0.2)
    dead = DeadSink()
    storage = stage(inbox, dead)
    task = asyncio.create_task(storage.handle([record(0, (7, [f"{tag}-a"]))]))
    try:
        await asyncio.sleep(1.0)
        assert not task.done()  # transient: held, not dead-lettered
        assert retry.stalls()["inbox write"] > 0.5
        assert dead.records == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await inbox.close()
    assert "inbox write" not in retry.stalls()


async def test_postgres_refusing_a_long_or_nul_session_id_costs_only_that_message(
    postgres_dsn: str, pg_schema: str, tag: str
) -> None:
    """Records written before the id limits (or by another producer) reach PostgreSQL
    with values its columns refuse: those messages are dead-lettered, the rest stored."""
    inbox = PostgresInboxStore(postgres_dsn, max_entries=0, search_path=pg_schema)
    dead = DeadSink()
    storage = stage(inbox, dead)  # type: ignore[arg-type]
    users = [f"{tag}-p{i}" for i in range(5)]
    batch = DeliveryBatch()
    for msg_id, session in ((501, "ok"), (502, "s" * 300), (503, "nul\x00id"), (504, "ok")):
        batch.deliveries.add(
            message=PushMessage(msg_id=msg_id, session_id=session, seq_id=msg_id), users=users
        )
    value = batch.SerializeToString()
    try:
        await asyncio.wait_for(
            storage.handle([ConsumerRecord("d", 0, 0, 0, 0, None, value, None, 0, 0, ())]), 30
        )
        for user in users:
            assert [e.msg_id for e in await inbox.read(user, 0, 10)] == [501, 504]
        letters = [DeliveryBatch.FromString(v or b"").deliveries[0] for _, v, _ in dead.records]
        assert sorted(d.message.msg_id for d in letters) == [502, 503]
        assert all(sorted(d.users) == users for d in letters)  # one letter per message
        assert {h[H_REASON] for _, _, h in dead.records} == {b"inbox_refused"}
    finally:
        await inbox.close()
