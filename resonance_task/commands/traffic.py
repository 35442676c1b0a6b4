"""Publish PushEvents the way a logic service would: one (`send`) or many (`loadgen`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Iterator
from typing import Any

from aiokafka import AIOKafkaProducer
from faust.cli import option

from resonance_task.commands.progress import progress
from resonance_task.pipeline.kafka_security import aiokafka_auth
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.settings import Settings
from resonance_task.stores.members import RedisMemberStore

_EPOCH_MS = 1_700_000_000_000
_sequence = itertools.count()


def snowflake() -> int:
    """A Snowflake-shaped id: ms since a custom epoch, then a per-process sequence."""
    return ((int(time.time() * 1000) - _EPOCH_MS) << 22) | (next(_sequence) & 0x3FFFFF)


def single_chat(sender: str, recipient: str, seq_id: int, content: str) -> PushEvent:
    a, b = sorted((sender, recipient))
    return PushEvent(
        msg_id=snowflake(),
        seq_id=seq_id,
        session_id=f"single:{a}:{b}",
        from_username=sender,
        to_username=recipient,
        content=content,
        type="text",
        timestamp=int(time.time() * 1000),
        session_type=1,
    )


def group_chat(sender: str, session_id: str, seq_id: int, content: str) -> PushEvent:
    return PushEvent(
        msg_id=snowflake(),
        seq_id=seq_id,
        session_id=session_id,
        from_username=sender,
        content=content,
        type="text",
        timestamp=int(time.time() * 1000),
        session_name=session_id,
        session_type=2,
    )


def mixed_traffic(
    users: list[str], groups: dict[str, list[str]], count: int, group_ratio: float, seed: int = 7
) -> Iterator[PushEvent]:
    rng = random.Random(seed)
    seqs: dict[str, int] = {}
    group_ids = sorted(groups)
    for i in range(count):
        if group_ids and rng.random() < group_ratio:
            session = rng.choice(group_ids)
            seqs[session] = seqs.get(session, 0) + 1
            yield group_chat(
                rng.choice(groups[session]), session, seqs[session], f"group message {i}"
            )
        else:
            sender, recipient = rng.sample(users, 2)
            event = single_chat(sender, recipient, 0, f"hello {i}")
            seqs[event.session_id] = seqs.get(event.session_id, 0) + 1
            event.seq_id = seqs[event.session_id]
            yield event


async def publish(settings: Settings, events: list[PushEvent]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers, linger_ms=5, **aiokafka_auth(settings)
    )
    await producer.start()
    try:
        with progress() as bar:
            task = bar.add_task("published", total=len(events))
            futures = []
            for e in events:
                ack = await producer.send(
                    settings.topic_push_events, e.SerializeToString(), key=e.session_id.encode()
                )
                ack.add_done_callback(lambda _: bar.advance(task))
                futures.append(ack)
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


def register(app: Any, settings: Settings) -> None:
    @app.command(
        option("--sender", default="alice", help="from_username"),
        option("--to", "to", default="", help="recipient of a 1:1 message"),
        option("--group", default="", help="group session_id (members from the member store)"),
        option("--members", default="", help="comma-separated members to add to --group first"),
        option("--content", default="hello", help="message text"),
    )
    async def send(self: Any, sender: str, to: str, group: str, members: str, content: str) -> None:
        """Publish one PushEvent."""
        if bool(to) == bool(group):
            raise SystemExit("give exactly one of --to or --group")
        if group and members:
            store = RedisMemberStore(settings.redis_url.get_secret_value())
            await store.add(group, [m for m in members.split(",") if m])
            await store.close()
        event = single_chat(sender, to, 1, content) if to else group_chat(sender, group, 1, content)
        await publish(settings, [event])
        print(json.dumps({"msg_id": event.msg_id, "session_id": event.session_id}))

    @app.command(
        option("--messages", type=int, default=2000, help="events to publish"),
        option("--users", type=int, default=1000, help="distinct users user-0000..."),
        option("--groups", type=int, default=5, help="group sessions"),
        option("--group-size", type=int, default=100, help="members per group"),
        option("--group-ratio", type=float, default=0.2, help="share of group messages"),
    )
    async def loadgen(
        self: Any, messages: int, users: int, groups: int, group_size: int, group_ratio: float
    ) -> None:
        """Publish a mix of 1:1 and group messages; group members go to the member store."""
        names = [f"user-{i:05d}" for i in range(users)]
        rng = random.Random(11)
        group_members = {
            f"group-{g}": rng.sample(names, min(group_size, users)) for g in range(groups)
        }
        store = RedisMemberStore(settings.redis_url.get_secret_value())
        for session_id, members_ in group_members.items():
            await store.add(session_id, members_)
        await store.close()
        started = time.monotonic()
        events = list(mixed_traffic(names, group_members, messages, group_ratio))
        await publish(settings, events)
        elapsed = time.monotonic() - started
        print(json.dumps({"published": len(events), "seconds": round(elapsed, 3)}))
