"""route: messages and their recipients -> one gateway-pushes record per gateway, and offline.

Not a stage of its own any more: fanout and large_group route as they fan out, with the
worker's views of the routes changelog and of the gateways' heartbeats (every worker
holds both), so a 1:1 message goes from push-events to gateway-pushes in one hop. A
`PushPlan` collects one batch's pushes: for each gateway, the batch's messages in order,
each with the users that gateway holds (the body once per gateway record). Users with no
pushable gateway go to offline push, unless the message is online-only (a
read-diffusion group's: its members sync the group timeline instead). Records are split
by bytes so none exceeds what the producer may send.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from resonance_task.offline import records as offline_records
from resonance_task.pipeline import metrics
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import GatewayPushBatch, OfflinePush
from resonance_task.tables import gateways as gateway_rules
from resonance_task.tables.gateways import GatewayInfo

# Per record, beyond its pushes: the gateway's id and address, protobuf framing.
_RECORD_OVERHEAD = 512
_USER_OVERHEAD = 2  # a repeated string's tag and length


class OnlineGateways(Protocol):
    def get(self, user: str) -> tuple[str, ...]: ...


class Router:
    def __init__(
        self,
        *,
        routes: OnlineGateways,
        gateways: Mapping[str, GatewayInfo],
        gateway_timeout_seconds: float,
        record_max_bytes: int = 512 * 1024,
    ) -> None:
        self._routes = routes
        self._gateways = gateways
        self._timeout_ms = int(gateway_timeout_seconds * 1000)
        self.record_max_bytes = record_max_bytes
        self._clock_cache: gateway_rules.Clock | None = None
        self._clock_at = 0.0
        # user -> the gateways of the user's live connections (a bound method: looked up
        # once per recipient, it is the hot loop of fan-out).
        self.online = routes.get

    def clock(self) -> gateway_rules.Clock:
        # The newest heartbeat is a scan of the (small) gateways view: once per 200 ms.
        now = time.monotonic()
        if self._clock_cache is None or now - self._clock_at > 0.2:
            self._clock_cache = gateway_rules.clock(
                self._gateways.values(), int(time.time() * 1000), self._timeout_ms
            )
            self._clock_at = now
        return self._clock_cache

    def plan(self) -> PushPlan:
        return PushPlan(self)

    def pushable(self, gateway_id: str, at: gateway_rules.Clock) -> GatewayInfo | None:
        info = self._gateways.get(gateway_id)
        return info if gateway_rules.is_pushable(info, at) else None


class PushPlan:
    """The pushes of one batch of messages: per gateway in message order, and offline."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._at = router.clock()
        # Gateway liveness is decided once per batch, not once per recipient.
        self._pushable: dict[str, GatewayInfo | None] = {}
        self._records: dict[str, list[GatewayPushBatch]] = {}
        self._sizes: dict[str, int] = {}
        self._offline: list[OfflinePush] = []
        self.pushed_users = 0
        self.offline_users = 0

    def add(
        self,
        message: PushMessage,
        users: Iterable[str],
        *,
        priority: int = 0,
        trace_headers: Mapping[str, str] | None = None,
        online_only: bool = False,
    ) -> None:
        """Route `message` to `users`, leaving out its sender."""
        sender = message.from_username
        router, pushable, online = self._router, self._pushable, self._router.online
        by_gateway: dict[str, list[str]] = {}
        offline: list[str] = []
        for user in users:
            if user == sender:
                continue
            reached = False
            for gateway_id in online(user):
                if gateway_id not in pushable:
                    pushable[gateway_id] = router.pushable(gateway_id, self._at)
                if pushable[gateway_id] is not None:
                    by_gateway.setdefault(gateway_id, []).append(user)
                    reached = True
            if not reached:
                offline.append(user)
        if by_gateway:
            body = message.ByteSize()
            for gateway_id, reached_users in by_gateway.items():
                self._push(gateway_id, message, reached_users, body, priority, trace_headers)
                self.pushed_users += len(reached_users)
        if offline and not online_only:
            self._divert(message, offline, priority, trace_headers)

    def _push(
        self,
        gateway_id: str,
        message: PushMessage,
        users: list[str],
        body: int,
        priority: int,
        trace_headers: Mapping[str, str] | None,
    ) -> None:
        limit = self._router.record_max_bytes
        for chunk in _chunks(users, limit - body - _RECORD_OVERHEAD):
            size = body + sum(_cost(u) for u in chunk) + 16
            records = self._records.get(gateway_id)
            if records is None or self._sizes[gateway_id] + size > limit:
                info = self._pushable[gateway_id]
                assert info is not None
                batch = GatewayPushBatch(gateway_id=gateway_id, address=info["address"])
                records = self._records.setdefault(gateway_id, [])
                records.append(batch)
                self._sizes[gateway_id] = _RECORD_OVERHEAD
            push = records[-1].pushes.add(message=message, users=chunk, priority=priority)
            if trace_headers:
                push.trace_headers.update(trace_headers)
            self._sizes[gateway_id] += size

    def _divert(
        self,
        message: PushMessage,
        users: list[str],
        priority: int,
        trace_headers: Mapping[str, str] | None,
    ) -> None:
        budget = self._router.record_max_bytes - message.ByteSize() - _RECORD_OVERHEAD
        for chunk in _chunks(users, budget):
            record = OfflinePush(
                message=message, users=chunk, reason="not_online", priority=priority
            )
            if trace_headers:
                record.trace_headers.update(trace_headers)
            self._offline.append(record)
        self.offline_users += len(users)

    def gateway_records(self) -> list[tuple[bytes, bytes]]:
        """(key, value) of each gateway-pushes record: keyed by gateway_id, in order."""
        return [
            (gateway_id.encode(), batch.SerializeToString())
            for gateway_id, batches in self._records.items()
            for batch in batches
        ]

    def offline_records(self) -> list[bytes]:
        """Each offline-pushes record (not keyed: offline push keeps no order)."""
        return offline_records.encode(self._offline, self._router.record_max_bytes)

    def count(self) -> None:
        if self.offline_users:
            metrics.OFFLINE_USERS.labels("not_online").inc(self.offline_users)


def _chunks(users: list[str], budget: int) -> Iterable[list[str]]:
    """`users` in runs whose names fit in `budget` bytes (at least one name a run)."""
    budget = max(budget, 1)
    start, size = 0, 0
    for i, user in enumerate(users):
        cost = _cost(user)
        if size + cost > budget and i > start:
            yield users[start:i]
            start, size = i, 0
        size += cost
    if start < len(users):
        yield users[start:]


def _cost(user: str) -> int:
    return len(user.encode()) + _USER_OVERHEAD
