"""route: deliveries -> gateway pushes, grouped by gateway, looked up on the owning worker.

The deliveries topic and the routes table share partition count and partitioner, so a
record's users are all in routes partitions this worker owns: the lookup is a local dict
read. Users with no pushable gateway go to offline push, unless the delivery is
online-only (a read-diffusion group's: its members sync the group timeline instead).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from pipeline import metrics
from pipeline.dlq import DeadLetters, source_of
from proto.resonance.pipeline.v1.pipeline_pb2 import Delivery, GatewayPushBatch, OfflinePush
from tables import gateways as gateway_rules
from tables import routes as route_rules
from tables.gateways import GatewayInfo

SendGatewayPush = Callable[[str, bytes], Awaitable[object]]  # (gateway_id, value)
SendOffline = Callable[[bytes, bytes], Awaitable[object]]  # (key, value)


class Router:
    def __init__(
        self,
        *,
        routes: Any,
        gateways: Any,
        send_push: SendGatewayPush,
        send_offline: SendOffline,
        gateway_timeout_seconds: float,
    ) -> None:
        self._routes = routes
        self._gateways = gateways
        self._send_push = send_push
        self._send_offline = send_offline
        self._timeout_ms = int(gateway_timeout_seconds * 1000)
        self._clock_cache: gateway_rules.Clock | None = None
        self._pushable: dict[str, GatewayInfo | None] = {}
        self._clock_at = 0.0

    def forget_liveness(self) -> None:
        self._pushable.clear()

    def _clock(self) -> gateway_rules.Clock:
        # The newest heartbeat is a scan of the (small) gateways table: once per 200 ms,
        # and the liveness verdicts computed from it live as long.
        now = time.monotonic()
        if self._clock_cache is None or now - self._clock_at > 0.2:
            self._clock_cache = gateway_rules.clock(
                self._gateways.values(), int(time.time() * 1000), self._timeout_ms
            )
            self._clock_at = now
            self.forget_liveness()
        return self._clock_cache

    async def route(self, delivery: Delivery) -> None:
        await self.route_batch([delivery])

    async def route_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Route a batch of deliveries: one gateway-pushes record per gateway, in order."""
        at = self._clock()
        batches: dict[str, GatewayPushBatch] = {}
        for delivery in deliveries:
            if delivery.persist_only:
                continue
            by_gateway, offline = self._targets(delivery, at)
            for gateway_id, users in by_gateway.items():
                batch = batches.get(gateway_id)
                if batch is None:
                    info = self._pushable[gateway_id]
                    assert info is not None
                    batch = batches[gateway_id] = GatewayPushBatch(
                        gateway_id=gateway_id, address=info["address"]
                    )
                batch.pushes.add(
                    message=delivery.message,
                    users=users,
                    priority=delivery.priority,
                    trace_headers=delivery.trace_headers,
                )
            if offline and not delivery.online_only:
                await self._send_offline(
                    str(delivery.message.msg_id).encode(),
                    OfflinePush(
                        message=delivery.message,
                        users=offline,
                        reason="not_online",
                        priority=delivery.priority,
                        trace_headers=delivery.trace_headers,
                    ).SerializeToString(),
                )
                metrics.OFFLINE_USERS.labels("not_online").inc(len(offline))
        for gateway_id, batch in batches.items():
            await self._send_push(gateway_id, batch.SerializeToString())

    def _targets(
        self, delivery: Delivery, at: gateway_rules.Clock
    ) -> tuple[dict[str, list[str]], list[str]]:
        """Online recipients by gateway, and the recipients with no pushable gateway."""
        sender = delivery.message.from_username
        # Gateway liveness is looked up once per batch, not once per recipient.
        pushable = self._pushable
        by_gateway: dict[str, list[str]] = {}
        offline: list[str] = []
        for user in delivery.users:
            if user == sender:
                continue
            route = self._routes.get(user)
            targets = []
            for gateway_id in route_rules.online_gateways(route):
                if gateway_id not in pushable:
                    info = self._gateways.get(gateway_id)
                    ok = gateway_rules.is_pushable(info, at)
                    pushable[gateway_id] = info if ok else None
                if pushable[gateway_id] is not None:
                    targets.append(gateway_id)
            if not targets:
                offline.append(user)
            for gateway_id in targets:
                by_gateway.setdefault(gateway_id, []).append(user)
        return by_gateway, offline


def agent(
    router: Router, dead_letters: DeadLetters, batch_max: int = 256, linger: float = 0.002
) -> Callable[[Any], Awaitable[None]]:
    async def route_agent(stream: Any) -> None:
        # Batches of deliveries records, so one gateway-pushes record carries everything
        # for a gateway. Acked by hand after the batch was sent: take() would ack a batch
        # even when handling it raised (faust-streaming #189).
        async for events in stream.noack_take(batch_max, within=linger):
            deliveries = []
            for event in events:
                record = source_of(event)
                try:
                    deliveries.append(Delivery.FromString(record.value or b""))
                except DecodeError as exc:
                    await dead_letters.put(record, "decode_error", exc)
            router.forget_liveness()
            await router.route_batch(deliveries)
            for event in events:
                await stream.ack(event)

    return route_agent
