"""The storage stage against a real Redis: a refused recipient costs only itself."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from resonance_task.agents.storage import StorageConsumer
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.redis import LocalRedisCluster
from resonance_task.pipeline import retry
from resonance_task.pipeline.dlq import H_ERROR, H_REASON, DeadLetters
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import DeliveryBatch
from resonance_task.settings import Settings
from resonance_task.stage import StageOptions
from resonance_task.stores.inbox import RedisInboxStore
from resonance_task.stores.postgres import PostgresInboxStore
from tests.kafka import group_config, make_topic, until
from tests.offline.fakes import DeadSink


def stage(inbox: RedisInboxStore, dead: DeadSink) -> StorageConsumer:
    return StorageConsumer(
        options=StageOptions(topics=("deliveries",), consumer_config={}, batch_max_records=100),
        inbox=inbox,
        dead_letters=DeadLetters(dead.send),
        retry_max_seconds=0.05,
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


@pytest.mark.parametrize("cluster", [False, True], ids=["one-redis", "redis-cluster"])
async def test_a_wrong_type_inbox_key_dead_letters_that_recipient_only(
    redis_url: str,
    redis_client: aioredis.Redis,
    redis_cluster: LocalRedisCluster,
    tag: str,
    cluster: bool,
) -> None:
    users = [f"{tag}-u{i}" for i in range(40)]
    broken = users[17]
    url = redis_cluster.url if cluster else redis_url
    raw = AsyncRedisCluster.from_url(url.replace("+cluster://", "://")) if cluster else redis_client
    await raw.set(f"inbox:{{{broken}}}", "x")  # a bug elsewhere, an operator's typo
    if cluster:
        await raw.aclose()
    inbox = RedisInboxStore(url, max_entries=0, message_ttl=600)
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
        assert (
            f"WRONGTYPE inbox:{{{broken}}} is a string, not a zset".encode()
            in (dead.records[0][2][H_ERROR])
        )
        stats = storage.stats()
        # Found in the one call that wrote everyone else: nothing retried, nothing redone.
        assert (stats["refused"], stats["new"], stats["duplicates"]) == (3, 40 + 20 + 5 - 3, 0)
        assert stats["batches_written"] == 1
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
        await until(lambda: retry.stalls().get("inbox write", 0) > 0.5)
        assert not task.done()  # transient: held, not dead-lettered
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


# 100,000 deliveries a run, in 40 records of five group messages each; every user gets
# PER_USER messages (each message goes to POISON_FANOUT users from a start a half-fanout on).
POISON_USERS, POISON_MESSAGES, POISON_FANOUT = 5000, 200, 500
PER_USER = POISON_MESSAGES * POISON_FANOUT // POISON_USERS


class Watched(StorageConsumer):
    """The stage, telling the test the moment its written pairs reach `target`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = 0
        self.reached = asyncio.Event()

    async def _store(self, batch: Any, refused: Any) -> None:
        await super()._store(batch, refused)
        if self.new + self.duplicates >= self.target:
            self.reached.set()


async def test_two_poisoned_inboxes_cost_the_others_nothing(
    broker: EmbeddedBroker, redis_url: str, redis_client: aioredis.Redis, tag: str
) -> None:
    """The same deliveries through the stage with and without two recipients' keys of the
    wrong type: the others' inboxes complete as fast, only those two are dead-lettered."""
    topic = f"{tag}.deliveries"
    await make_topic(broker, topic, 4)
    defaults = Settings.model_fields
    inbox = RedisInboxStore(
        redis_url,
        max_entries=defaults["inbox_max_entries"].default,
        message_ttl=600,
    )
    dead = DeadSink()
    storage = Watched(
        options=StageOptions(
            topics=(topic,),
            consumer_config=group_config(broker, f"{tag}-storage"),
            batch_max_records=defaults["storage_batch_max_records"].default,
        ),
        inbox=inbox,
        dead_letters=DeadLetters(dead.send),
        retry_max_seconds=defaults["storage_retry_max_seconds"].default,
    )
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
    await producer.start()
    await storage.start()
    msg_ids = itertools.count(1)

    async def run(name: str, poison: bool) -> tuple[float, list[str], list[str]]:
        """Seconds until every recipient but the poisoned ones has its messages."""
        users = [f"{tag}-{name}-u{i:04d}" for i in range(POISON_USERS)]
        poisoned = [users[17], users[1234]] if poison else []
        if poison:
            await redis_client.set(f"inbox:{{{poisoned[0]}}}", "not an inbox")
            await redis_client.hset(f"inbox:{{{poisoned[1]}}}:seq", "not", "a cursor")
        deliveries = []
        for k in range(POISON_MESSAGES):
            start = k * POISON_FANOUT // 2 % POISON_USERS
            to = [users[(start + i) % POISON_USERS] for i in range(POISON_FANOUT)]
            deliveries.append((next(msg_ids), to))
        others = sum(len([u for u in to if u not in poisoned]) for _, to in deliveries)
        values = []
        for first in range(0, len(deliveries), 5):  # fanout: a few deliveries a record
            batch = DeliveryBatch()
            for msg_id, to in deliveries[first : first + 5]:
                batch.deliveries.add(
                    message=PushMessage(msg_id=msg_id, session_id=name, seq_id=msg_id), users=to
                )
            values.append(batch.SerializeToString())
        storage.target = storage.new + storage.duplicates + others
        storage.reached.clear()
        started = time.monotonic()
        for i, value in enumerate(values):
            await producer.send(topic, value, partition=i % 4)
        await producer.flush()
        await asyncio.wait_for(storage.reached.wait(), 60)
        return time.monotonic() - started, users, poisoned

    try:
        # Warm up: the stage has joined its group and loaded its script.
        storage.target = 1
        await producer.send_and_wait(topic, record(0, (next(msg_ids), [f"{tag}-w"])).value)
        await asyncio.wait_for(storage.reached.wait(), 30)
        clean: list[float] = []
        poisoned_runs: list[float] = []
        checked: list[tuple[list[str], list[str]]] = []
        for round_ in range(3):  # interleaved: the machine's own noise hits both alike
            seconds, users, _ = await run(f"c{round_}", poison=False)
            clean.append(seconds)
            seconds, users, poisoned = await run(f"p{round_}", poison=True)
            poisoned_runs.append(seconds)
            checked.append((users, poisoned))
        print(f"others' inboxes complete: clean {clean}, two poisoned {poisoned_runs}")
        await until(lambda: storage.refused == 3 * 2 * PER_USER, seconds=30)
        # Every other recipient has its messages once, cursors 1..PER_USER without gaps.
        for users, poisoned in checked:
            others = [u for u in users if u not in poisoned]
            assert await inbox.last_cursors(others) == dict.fromkeys(others, PER_USER)
        assert {h[H_REASON] for _, _, h in dead.records} == {b"inbox_wrong_type"}
        letters = [DeliveryBatch.FromString(v or b"").deliveries[0] for _, v, _ in dead.records]
        assert sorted(u for d in letters for u in d.users) == sorted(
            u for _, poisoned in checked for u in poisoned for _ in range(PER_USER)
        )
        assert min(poisoned_runs) <= 1.1 * min(clean) + 0.05
    finally:
        await storage.stop()
        await producer.stop()
        await inbox.close()
