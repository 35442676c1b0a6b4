"""End-to-end harness: real worker processes, Tansu, Redis and gRPC gateway simulators.

Shared by the end-to-end tests and the fault suite (their conftests import the fixtures).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from resonance_task.commands.dlq import read_all
from resonance_task.embedded.broker import EmbeddedBroker
from resonance_task.embedded.worker import WorkerProcess, pipeline_env
from resonance_task.gateway.simulator import GatewaySimulator
from resonance_task.offline.records import decode as decode_offline
from resonance_task.pipeline.backlog import OffsetProbe
from resonance_task.proto.resonance.mq.v1.push_event_pb2 import PushEvent
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import OfflinePush
from resonance_task.stores.inbox import InboxEntry, RedisInboxStore
from resonance_task.stores.members import RedisMemberStore

LARGE_GROUP_JOBS = "resonance_large_group_jobs_total"


async def _jobs_finished(worker: WorkerProcess, jobs: set[int], seconds: float) -> None:
    async def finished() -> bool:
        _, body = await asyncio.to_thread(worker.get, "/large-groups")
        done = {int(j["msg_id"]) for j in body["finished"]}
        if jobs:
            return jobs <= done
        _, stats = await asyncio.to_thread(worker.get, "/stats")
        counters = stats["counters"]
        handed = sum(v for k, v in counters.items() if k.startswith(LARGE_GROUP_JOBS))
        return not body["in_progress"] and len(done) >= handed

    await eventually(finished, seconds, f"large-group jobs {sorted(jobs) or 'all'} finished")


async def _committed_to_end(probe: OffsetProbe, topic: str, group: str, seconds: float) -> None:
    ends = await probe.ends(topic)

    async def committed() -> bool:
        done = await probe.committed(group, topic, ends)
        return all(done[p] >= end for p, end in ends.items())

    await eventually(committed, seconds, f"{group} committed all of {topic}")


async def eventually(
    check: Callable[[], Awaitable[bool]],
    seconds: float = 60,
    what: str = "condition",
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


@dataclass
class Pipeline:
    tag: str
    broker: EmbeddedBroker
    redis_url: str
    workdir: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    sims: list[GatewaySimulator] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The message path's tests run workers without the task side (TASKS_ENABLED), as
        # a fan-out-only deployment would: six fewer consumer groups a worker rebalancing
        # on one shared broker. The task tests turn it on.
        overrides = {"tasks_enabled": False, **self.overrides}
        self.env = pipeline_env(
            tag=self.tag, broker_url=self.broker.url, redis_url=self.redis_url, **overrides
        )
        self.inbox_store = RedisInboxStore(self.redis_url, max_entries=0, message_ttl=3600)
        self.members = RedisMemberStore(self.redis_url)
        self._producer: AIOKafkaProducer | None = None

    def user(self, i: int) -> str:
        return f"{self.tag}-u{i:05d}"

    def topic(self, name: str) -> str:
        return self.env[name]

    async def settled(
        self, seconds: float = 60, *, jobs: Sequence[int] = (), worker: WorkerProcess | None = None
    ) -> None:
        """Until fanout, then storage and push, have committed all their topics hold: no
        more of what was published is on its way to an inbox or a gateway. What a test
        checks for duplicates waits for this, not for a second to pass. With `worker`, its
        large-group jobs are first waited for to be finished (those of `jobs`, the msg_ids,
        or else every job fanout handed over): a job's pages are acknowledged before it
        saves its cursor."""
        app_id = self.env["APP_ID"]
        hops = [
            [(self.topic("TOPIC_PUSH_EVENTS"), f"{app_id}-fanout")],
            [
                (f"{app_id}-deliveries", f"{app_id}-storage"),
                (f"{app_id}-gateway-pushes", f"{app_id}-push"),
            ],
        ]
        probe = OffsetProbe({"bootstrap_servers": self.broker.bootstrap})
        await probe.start()
        try:
            for i, hop in enumerate(hops):
                if i == 1 and worker is not None:
                    await _jobs_finished(worker, set(jobs), seconds)
                # The ends taken once the hop before is done: they hold all it produced.
                for topic, group in hop:
                    await _committed_to_end(probe, topic, group, seconds)
        finally:
            await probe.stop()

    async def start_worker(self, name: str = "worker", **overrides: Any) -> WorkerProcess:
        env = {**self.env, **{k.upper(): str(v) for k, v in overrides.items()}}
        worker = WorkerProcess(env, self.workdir, name).start()
        self.workers.append(worker)
        try:
            await asyncio.to_thread(worker.wait_ready)
        except Exception:
            print(worker.log_tail())
            raise
        return worker

    async def gateway(self, gateway_id: str, users: list[str], **knobs: Any) -> GatewaySimulator:
        sim = GatewaySimulator(
            f"{self.tag}-{gateway_id}",
            bootstrap_servers=self.broker.bootstrap,
            presence_topic=self.topic("TOPIC_PRESENCE"),
            heartbeat_topic=self.topic("TOPIC_HEARTBEATS"),
            heartbeat_interval=0.5,
            **knobs,
        )
        await sim.start()
        self.sims.append(sim)
        await sim.connect(users)
        await sim.flush_presence()
        return sim

    async def wait_online(
        self, worker: WorkerProcess, users: list[str], seconds: float = 30
    ) -> None:
        async def all_online() -> bool:
            for user in users:
                status, body = await asyncio.to_thread(worker.get, f"/routes/{user}")
                if status != 200 or not body["online_gateways"] or not body["view_gateways"]:
                    return False
            return True

        await eventually(all_online, seconds, f"routes of {len(users)} users")

    async def wait_routable(self, worker: WorkerProcess, count: int, seconds: float = 30) -> None:
        """Until `worker`'s routes view holds `count` users online: every presence batch
        the gateways sent, not a sample of them."""

        async def routable() -> bool:
            _, stats = await asyncio.to_thread(worker.get, "/stats")
            return int(stats["online_users"]) >= count

        await eventually(routable, seconds, f"{count} users routable")

    async def publish(self, events: Sequence[PushEvent | bytes]) -> None:
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=2)
            await self._producer.start()
        for event in events:
            if isinstance(event, bytes):
                await self._producer.send(self.topic("TOPIC_PUSH_EVENTS"), event, key=b"garbage")
            else:
                await self._producer.send(
                    self.topic("TOPIC_PUSH_EVENTS"),
                    event.SerializeToString(),
                    key=event.session_id.encode(),
                )
        await self._producer.flush()

    async def inbox(self, user: str) -> list[InboxEntry]:
        return await self.inbox_store.read(user, 0, 100_000)

    async def offline(self) -> list[OfflinePush]:
        records = await read_all(
            self.broker.bootstrap, self.topic("TOPIC_OFFLINE_PUSHES"), 1_000_000
        )
        return [push for r in records for push in decode_offline(r.value)]

    async def read_topic(self, topic: str) -> list[Any]:
        return await read_all(self.broker.bootstrap, topic, 1_000_000)

    async def close(self) -> None:
        # Teardown only: what a test needs of a graceful stop it asks for itself. SIGKILL
        # is seconds faster per worker than Faust's shutdown, and every name is the test's.
        await asyncio.gather(*(asyncio.to_thread(worker.kill) for worker in self.workers))
        await asyncio.gather(*(sim.stop() for sim in self.sims))
        if self._producer is not None:
            await self._producer.stop()
        await self.inbox_store.close()
        await self.members.close()


PipelineFactory = Callable[..., Pipeline]


@pytest.fixture
async def pipeline_factory(
    broker: EmbeddedBroker, redis_url: str, tag: str, workdir: Path
) -> AsyncIterator[PipelineFactory]:
    made: list[Pipeline] = []

    def make(**overrides: Any) -> Pipeline:
        p = Pipeline(tag, broker, redis_url, workdir, overrides)
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


@pytest.fixture
async def pipeline(pipeline_factory: PipelineFactory) -> Pipeline:
    return pipeline_factory()


async def inbox_msg_ids(redis_url: str, users: list[str]) -> dict[str, list[int]]:
    """Every listed inbox, read straight from Redis in one pipeline per 5,000 users."""
    client = aioredis.from_url(redis_url)
    out: dict[str, list[int]] = {}
    try:
        for start in range(0, len(users), 5000):
            chunk = users[start : start + 5000]
            pipe = client.pipeline(transaction=False)
            for user in chunk:
                pipe.zrange(f"inbox:{{{user}}}", 0, -1)
            for user, ids in zip(chunk, await pipe.execute(), strict=True):
                out[user] = [int(i) for i in ids]
    finally:
        await client.aclose()
    return out
