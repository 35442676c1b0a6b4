"""A simulated gateway: a real grpc.aio PushService server with N simulated users.

It reports its users' presence to the presence topic (batched: 50 events or 100 ms, as
Resonance IM gateways do), heartbeats to the heartbeat topic, and records every delivery
it receives with its latency (receipt time minus the message's logic timestamp).

It keeps the positions of the last `RESUME_POSITIONS` pushes it answered, with whom of
them it failed, and answers batch 0 with them (gateway.proto), so a worker taking over
after another died does not push them again.

Knobs for fault tests: `delay` (seconds before acking each batch), `fail_users` (users it
reports in failed_usernames), `ack` (False: receive and never ack), `stream` (False: the
PushStream call is UNIMPLEMENTED, as on a Resonance IM gateway), `resume` (False: it
keeps nothing, and answers the opening with an empty ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from aiokafka import AIOKafkaProducer

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import (
    GatewayHeartbeat,
    Positions,
    PushBatch,
    PushBatchAck,
    PushRequest,
    PushResponse,
)
from resonance_task.proto.resonance.gateway.v1.gateway_pb2_grpc import (
    PushServiceServicer,
    add_PushServiceServicer_to_server,
)
from resonance_task.proto.resonance.logic.v1.presence_pb2 import (
    SyncStatusRequest,
    UserOffline,
    UserOnline,
)

PRESENCE_BATCH_EVENTS = 50
PRESENCE_BATCH_SECONDS = 0.1
# Enough for what a worker had in flight and unmarked when it died (a few batches) with a
# wide margin; the opening's answer stays well under gRPC's 4 MB message limit.
RESUME_POSITIONS = 50_000


@dataclass(frozen=True)
class Received:
    msg_id: int
    user: str
    session_id: str
    seq_id: int
    latency_ms: float
    traceparent: str = ""  # the W3C context the worker sent with the push, if any


@dataclass
class Recorder:
    deliveries: list[Received] = field(default_factory=list)
    batches: int = 0
    bodies: int = 0  # PushRequests received: one message body each
    calls: list[list[int]] = field(default_factory=list)  # msg_ids of each batch or unary call
    unary_calls: int = 0
    failed_reported: int = 0
    openings: int = 0  # streams opened (batch_id 0)

    def per_user(self) -> dict[str, list[Received]]:
        out: dict[str, list[Received]] = {}
        for r in self.deliveries:
            out.setdefault(r.user, []).append(r)
        return out

    def latencies(self) -> list[float]:
        return sorted(r.latency_ms for r in self.deliveries)


class _PushService(PushServiceServicer):
    def __init__(self, sim: GatewaySimulator) -> None:
        self._sim = sim

    async def Push(
        self, request: PushRequest, context: grpc.aio.ServicerContext[PushRequest, PushResponse]
    ) -> PushResponse:
        self._sim.recorder.unary_calls += 1
        self._sim.recorder.calls.append([request.message.msg_id])
        await self._sim._pause()
        return self._sim._answer(request, context.invocation_metadata() or ())

    async def PushStream(
        self,
        request_iterator: AsyncIterator[PushBatch],
        context: grpc.aio.ServicerContext[PushBatch, PushBatchAck],
    ) -> AsyncIterator[PushBatchAck]:
        if not self._sim.stream:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "PushStream not implemented")
        async for batch in request_iterator:
            if batch.batch_id == 0 and not batch.items:
                self._sim.recorder.openings += 1
                await self._sim._pause()
                if self._sim.ack:
                    yield self._sim._opening_answer()
                continue
            self._sim.recorder.batches += 1
            self._sim.recorder.calls.append([item.message.msg_id for item in batch.items])
            results = [self._sim._answer(item) for item in batch.items]
            self._sim._remember(batch, results)
            await self._sim._pause()
            if self._sim.ack:
                yield PushBatchAck(batch_id=batch.batch_id, results=results)


class GatewaySimulator:
    def __init__(
        self,
        gateway_id: str,
        *,
        bootstrap_servers: str | list[str] | None,
        presence_topic: str = "resonance.presence.v1",
        heartbeat_topic: str = "resonance.gateway.heartbeat.v1",
        heartbeat_interval: float = 1.0,
        port: int = 0,
        delay: float = 0.0,
        fail_users: Iterable[str] = (),
        ack: bool = True,
        stream: bool = True,
        resume: bool = True,
        tls: grpc.ServerCredentials | None = None,
        bind_host: str = "127.0.0.1",
        advertise_host: str | None = None,
        kafka_config: dict[str, Any] | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        # The cluster's TLS/SASL keyword arguments for its producer (kafka_security).
        self.kafka_config = kafka_config or {}
        # Where it listens, and the name workers dial (a container's own name, say).
        self.bind_host = bind_host
        self.advertise_host = advertise_host or bind_host
        self.bootstrap_servers = bootstrap_servers
        self.presence_topic = presence_topic
        self.heartbeat_topic = heartbeat_topic
        self.heartbeat_interval = heartbeat_interval
        self.port = port
        self.delay = delay
        self.fail_users = set(fail_users)
        self.ack = ack
        self.stream = stream
        self.resume = resume
        self.tls = tls
        # Per answered batch: its pushes (source, position, msg_id) and its failures
        # (msg_id, user), forgotten together, oldest first, past RESUME_POSITIONS pushes.
        self._answered: deque[tuple[list[tuple[str, int, int]], list[tuple[int, str]]]] = deque()
        self._answered_pushes = 0
        self.recorder = Recorder()
        self.online: set[str] = set()
        self.draining = False
        self._server: grpc.aio.Server | None = None
        self._producer: AIOKafkaProducer | None = None
        self._pending: list[UserOnline | UserOffline] = []
        self._presence_seq = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    async def start(self) -> GatewaySimulator:
        self._server = grpc.aio.server()
        add_PushServiceServicer_to_server(_PushService(self), self._server)
        bind = f"{self.bind_host}:{self.port}"
        if self.tls is not None:
            self.port = self._server.add_secure_port(bind, self.tls)
        else:
            self.port = self._server.add_insecure_port(bind)
        await self._server.start()
        if self.bootstrap_servers is None:
            return self  # gRPC only: presence and heartbeats are the caller's business
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, linger_ms=5, **self.kafka_config
        )
        await self._producer.start()
        await self.heartbeat()
        self._tasks = [
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._flush_presence_periodically()),
        ]
        return self

    async def stop(self, *, heartbeat_draining: bool = False) -> None:
        if heartbeat_draining:
            self.draining = True
            await self.heartbeat()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush_presence()
        if self._producer is not None:
            await self._producer.stop()
        if self._server is not None:
            await self._server.stop(grace=0.5)

    async def connect(self, users: Iterable[str], *, platform: str = "ios") -> None:
        now = int(time.time() * 1000)
        for user in users:
            self.online.add(user)
            self._pending.append(
                UserOnline(
                    username=user,
                    timestamp=now,
                    conn_id=f"{self.gateway_id}:{user}",
                    platform=platform,
                    remote_ip="127.0.0.1",
                )
            )
            if len(self._pending) >= PRESENCE_BATCH_EVENTS:
                await self.flush_presence()

    async def disconnect(self, users: Iterable[str]) -> None:
        now = int(time.time() * 1000)
        for user in users:
            self.online.discard(user)
            self._pending.append(
                UserOffline(username=user, timestamp=now, conn_id=f"{self.gateway_id}:{user}")
            )
            if len(self._pending) >= PRESENCE_BATCH_EVENTS:
                await self.flush_presence()

    async def flush_presence(self) -> None:
        if not self._pending or self._producer is None:
            return
        pending, self._pending = self._pending, []
        self._presence_seq += 1
        request = SyncStatusRequest(seq_id=self._presence_seq, gateway_id=self.gateway_id)
        request.online_batch.extend(p for p in pending if isinstance(p, UserOnline))
        request.offline_batch.extend(p for p in pending if isinstance(p, UserOffline))
        await self._producer.send_and_wait(
            self.presence_topic, request.SerializeToString(), key=self.gateway_id.encode()
        )

    async def heartbeat(self) -> None:
        if self._producer is None:
            return
        beat = GatewayHeartbeat(
            gateway_id=self.gateway_id,
            address=self.address,
            timestamp=int(time.time() * 1000),
            connections=len(self.online),
            draining=self.draining,
        )
        await self._producer.send_and_wait(
            self.heartbeat_topic, beat.SerializeToString(), key=self.gateway_id.encode()
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self.heartbeat()

    async def _flush_presence_periodically(self) -> None:
        while True:
            await asyncio.sleep(PRESENCE_BATCH_SECONDS)
            await self.flush_presence()

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    def _remember(self, batch: PushBatch, results: list[PushResponse]) -> None:
        if not self.resume:
            return
        pushes = [
            (sent.source, position, msg_id)
            for sent in batch.sent
            for position, msg_id in zip(sent.positions, sent.msg_ids, strict=False)
        ]
        failed = [(r.msg_id, user) for r in results for user in r.failed_usernames]
        self._answered.append((pushes, failed))
        self._answered_pushes += len(pushes)
        while self._answered_pushes > RESUME_POSITIONS:
            self._answered_pushes -= len(self._answered.popleft()[0])

    def _opening_answer(self) -> PushBatchAck:
        ack = PushBatchAck(batch_id=0)
        if not self.resume:
            return ack
        by_source: dict[str, Positions] = {}
        by_msg: dict[int, list[str]] = {}
        for pushes, failed in self._answered:
            for source, position, msg_id in pushes:
                had = by_source.get(source)
                if had is None:
                    had = by_source[source] = Positions(source=source)
                had.positions.append(position)
                had.msg_ids.append(msg_id)
            for msg_id, user in failed:
                by_msg.setdefault(msg_id, []).append(user)
        ack.received.extend(by_source.values())
        ack.failed.extend(PushResponse(msg_id=m, failed_usernames=u) for m, u in by_msg.items())
        return ack

    def _answer(self, request: PushRequest, metadata: Iterable[Any] = ()) -> PushResponse:
        now_ms = time.time() * 1000
        traceparent = request.trace_headers.get("traceparent") or next(
            (str(m[1]) for m in metadata if m[0] == "traceparent"), ""
        )
        message = request.message
        self.recorder.bodies += 1
        failed = [u for u in request.to_usernames if u in self.fail_users or u not in self.online]
        for user in request.to_usernames:
            if user not in failed:
                self.recorder.deliveries.append(
                    Received(
                        message.msg_id,
                        user,
                        message.session_id,
                        message.seq_id,
                        now_ms - message.timestamp,
                        traceparent,
                    )
                )
        self.recorder.failed_reported += len(failed)
        return PushResponse(msg_id=message.msg_id, failed_usernames=failed)
