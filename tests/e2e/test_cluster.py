"""The pipeline with its inboxes on a real Redis Cluster (3 masters, 3 replicas): every
recipient once, cursors gap-free, every online recipient pushed once, as on one Redis.
The worker is pointed at it as an operator would: INBOX_REDIS_URL=redis+cluster://..."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from resonance_task.commands.traffic import group_chat, single_chat
from resonance_task.embedded.expectations import expected, pushed_in_order, received
from resonance_task.embedded.redis import LocalRedisCluster
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.stores.inbox import RedisInboxStore
from tests.harness import PipelineFactory, eventually


async def test_inboxes_on_a_cluster_every_recipient_once_in_order(
    pipeline_factory: PipelineFactory, redis_cluster: LocalRedisCluster
) -> None:
    p = pipeline_factory(inbox_redis_url=redis_cluster.url)
    worker = await p.start_worker()
    users = [p.user(i) for i in range(80)]
    group = f"{p.tag}-group"
    await p.members.add(group, users[:60])
    sims = [await p.gateway("gw-c1", users[:25]), await p.gateway("gw-c2", users[25:50])]
    await p.wait_routable(worker, 50)

    rng = random.Random(27)
    seqs: Counter[str] = Counter()
    events: list[PushEvent] = []
    for i in range(200):
        sender, recipient = rng.sample(users, 2)
        event = single_chat(sender, recipient, 0, f"c {i}")
        seqs[event.session_id] += 1
        event.seq_id = seqs[event.session_id]
        events.append(event)
        if i % 10 == 0:
            seqs[group] += 1
            events.append(group_chat(rng.choice(users[:60]), group, seqs[group], f"g {i}"))
    await p.publish(events)
    want = expected(events, {group: users[:60]}, set(users[:50]))

    inbox = RedisInboxStore(redis_cluster.url, max_entries=0, message_ttl=600)
    try:

        async def stored() -> bool:
            cursors = await inbox.last_cursors(users)
            return sum(cursors.values()) >= want.inbox_total

        await eventually(stored, 90, f"{want.inbox_total} inbox entries on the cluster")
        await eventually(
            lambda: _pushed(sims, want.pushed_total), 60, f"{want.pushed_total} pushes"
        )
        await p.settled()  # nothing more is on its way: a duplicate would be here
        for user in users:
            entries = await inbox.read(user, 0, 1000)
            assert sorted(e.msg_id for e in entries) == sorted(want.inbox[user]), user
            assert [e.cursor for e in entries] == list(range(1, len(entries) + 1)), user
        got = received(sims)
        for user in users:
            assert got.get(user, Counter()) == Counter(want.pushed[user]), user
        assert pushed_in_order(sims)
        # /inbox reads the cluster too.
        status, body = await asyncio.to_thread(worker.get, f"/inbox/{users[0]}?limit=1000")
        assert status == 200 and len(body["entries"]) == len(want.inbox[users[0]])
    finally:
        await inbox.close()


async def _pushed(sims: list[GatewaySimulator], total: int) -> bool:
    return sum(len(s.recorder.deliveries) for s in sims) >= total
