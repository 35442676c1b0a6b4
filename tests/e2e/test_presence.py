"""Presence end to end: users online when a message is routed are pushed, not diverted.

Gateways here are built only from proto/ (a PushService that acks what it receives, and a
Kafka producer of SyncStatusRequests of 50 users and heartbeats), not our simulator. The
scenario is issue 25's: 15,000 of 20,000 users announced before any worker starts, then
at once after /ready messages to a 20,000-member group (join-time scores, as a group
service writes them) and a burst to 20 groups of 900; 2,000 more users connect while
that load runs, and two more group messages follow once the burst is pushed. Every
online member is pushed live, once; `not_online` counts exactly the offline members.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.worker import WorkerProcess
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import (
    GatewayHeartbeat,
    PushBatch,
    PushBatchAck,
    PushRequest,
    PushResponse,
)
from resonance_task.proto.resonance.gateway.v1.gateway_pb2_grpc import (
    PushServiceServicer,
    add_PushServiceServicer_to_server,
)
from resonance_task.proto.resonance.logic.v1.presence_pb2 import SyncStatusRequest, UserOnline
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from tests.harness import Pipeline, PipelineFactory, eventually

NOT_ONLINE = "resonance_offline_users_total{reason=not_online}"
# Once the burst is pushed, how long the last users' presence has been in Kafka before
# the messages to them: well over the view delay the bench measures (p99 ~0.1 s).
PRESENCE_LEAD_SECONDS = 1.5


class ContractGateway(PushServiceServicer):
    """A gateway as a team would write it from gateway.proto and presence.proto alone."""

    def __init__(self, gateway_id: str, bootstrap: str, presence: str, heartbeats: str) -> None:
        self.gateway_id = gateway_id
        self._bootstrap = bootstrap
        self._presence = presence
        self._heartbeats = heartbeats
        self.received: Counter[tuple[int, str]] = Counter()
        self._server = grpc.aio.server()
        add_PushServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._producer: AIOKafkaProducer | None = None
        self._beating: asyncio.Task[None] | None = None
        self._seq = 0

    async def start(self) -> None:
        await self._server.start()
        self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, linger_ms=5)
        await self._producer.start()
        await self._beat()
        self._beating = asyncio.create_task(self._beat_forever())

    async def stop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        if self._producer is not None:
            await self._producer.stop()
        await self._server.stop(None)

    async def announce(self, users: list[str]) -> None:
        """Report `users` connected, 50 a SyncStatusRequest, as a gateway batches them."""
        assert self._producer is not None
        for start in range(0, len(users), 50):
            self._seq += 1
            batch = SyncStatusRequest(seq_id=self._seq, gateway_id=self.gateway_id)
            now = int(time.time() * 1000)
            for user in users[start : start + 50]:
                batch.online_batch.append(
                    UserOnline(username=user, conn_id=f"{user}-phone", timestamp=now)
                )
            await self._producer.send(
                self._presence, batch.SerializeToString(), key=self.gateway_id.encode()
            )
        await self._producer.flush()

    async def _beat(self) -> None:
        assert self._producer is not None
        beat = GatewayHeartbeat(
            gateway_id=self.gateway_id,
            address=f"127.0.0.1:{self.port}",
            timestamp=int(time.time() * 1000),
        )
        await self._producer.send_and_wait(
            self._heartbeats, beat.SerializeToString(), key=self.gateway_id.encode()
        )

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self._beat()

    def _answer(self, request: PushRequest) -> PushResponse:
        for user in request.to_usernames:
            self.received[(request.message.msg_id, user)] += 1
        return PushResponse(msg_id=request.message.msg_id)

    async def Push(self, request: PushRequest, context: object) -> PushResponse:
        return self._answer(request)

    async def PushStream(
        self, request_iterator: AsyncIterator[PushBatch], context: object
    ) -> AsyncIterator[PushBatchAck]:
        async for batch in request_iterator:
            # Nothing kept: the opening (batch 0, no items) gets an empty ack, as any batch.
            results = [self._answer(item) for item in batch.items]
            yield PushBatchAck(batch_id=batch.batch_id, results=results)


async def add_members(redis_url: str, group: str, users: list[str]) -> None:
    """Members as the group service writes them: each with its own join time (ms)."""
    client = aioredis.from_url(redis_url)
    try:
        joined = int(time.time() * 1000) - 86_400_000
        mapping = {user: joined + i * 1000 for i, user in enumerate(users)}
        await client.zadd(f"group:{{{group}}}:members", mapping)
    finally:
        await client.aclose()


def not_online(workers: list[WorkerProcess]) -> float:
    return sum(float(w.get("/stats")[1]["counters"].get(NOT_ONLINE, 0.0)) for w in workers)


@pytest.mark.parametrize("worker_count", [1, 2])
async def test_presence_in_kafka_before_a_message_gets_it_pushed_live(
    pipeline_factory: PipelineFactory, worker_count: int
) -> None:
    p: Pipeline = pipeline_factory()
    users = [p.user(i) for i in range(20_000)]
    early, late, never = users[:15_000], users[15_000:17_000], users[17_000:]
    huge = f"{p.tag}-huge"
    await add_members(p.redis_url, huge, users)
    # 20 groups of 900: 750 online from the start, 150 never online.
    small = {
        f"{p.tag}-g{g}": early[g * 750 : (g + 1) * 750] + never[g * 150 : (g + 1) * 150]
        for g in range(20)
    }
    for group, members in small.items():
        await add_members(p.redis_url, group, members)
    gateways = [
        ContractGateway(
            f"{p.tag}-gw{n}",
            p.broker.bootstrap,
            p.topic("TOPIC_PRESENCE"),
            p.topic("TOPIC_HEARTBEATS"),
        )
        for n in (1, 2)
    ]
    try:
        for gateway in gateways:
            await gateway.start()
        await gateways[0].announce(early[::2])
        await gateways[1].announce(early[1::2])
        # Only now the workers: their views start behind every presence record.
        workers = await asyncio.gather(
            *(p.start_worker(f"worker-{n}") for n in range(1, worker_count + 1))
        )
        sender = f"{p.tag}-system"  # no member: every online member is pushed
        first: list[PushEvent] = [group_chat(sender, huge, seq, f"all #{seq}") for seq in (1, 2, 3)]
        burst = [
            group_chat(sender, group, seq, f"{group} #{seq}") for group in small for seq in range(5)
        ]
        await p.publish([*first, *burst])
        # 2,000 more connect while that load runs.
        await gateways[0].announce(late[::2])
        await gateways[1].announce(late[1::2])

        def pushed() -> Counter[tuple[int, str]]:
            total: Counter[tuple[int, str]] = Counter()
            for gateway in gateways:
                total.update(gateway.received)
            return total

        expected = {(e.msg_id, u) for e in first for u in early}
        expected |= {(e.msg_id, u) for e in burst for u in small[e.session_id][:750]}

        async def all_pushed() -> bool:
            return len(expected & pushed().keys()) == len(expected)

        await eventually(all_pushed, 120, f"{len(expected)} pushes")
        await asyncio.sleep(PRESENCE_LEAD_SECONDS)
        last = [group_chat(sender, huge, seq, f"all #{seq}") for seq in (4, 5)]
        await p.publish(last)
        expected |= {(e.msg_id, u) for e in last for u in early + late}
        await eventually(all_pushed, 120, f"{len(expected)} pushes")
        want_offline = 3 * 5_000 + 100 * 150 + 2 * 3_000
        # Whether the late users get the first messages depends on which came first, their
        # presence or the group's pages: pushed or diverted, but one of the two, once.
        either = {(e.msg_id, u) for e in first for u in late}

        async def all_diverted() -> bool:
            late_pushed = len(pushed().keys() & either)
            return await asyncio.to_thread(not_online, workers) >= want_offline - late_pushed

        await eventually(all_diverted, 60, f"{want_offline} users to offline push")
        got = pushed()
        unexpected = got.keys() - expected - either
        assert got.keys() - either == expected, (
            f"missing {len(expected - got.keys())}, unexpected {len(unexpected)}"
        )
        assert max(got.values()) == 1, "a push arrived twice"
        diverted = want_offline - len(got.keys() & either)
        assert await asyncio.to_thread(not_online, workers) == diverted
    finally:
        for gateway in gateways:
            await gateway.stop()
