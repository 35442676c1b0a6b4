"""presence: gateways' SyncStatusRequest batches -> per-user changes -> the routes table.

Gateways key their batches by gateway_id; a user's route must live on the partition that
owns the user, so the first stage re-keys every change by user (choosing the partition
ourselves), and the second applies it on the owning worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from google.protobuf.message import DecodeError

from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import DeadLetters, InvalidRecord, source_of
from resonance_task.pipeline.partitioning import partition_for
from resonance_task.proto.resonance.logic.v1.presence_pb2 import SyncStatusRequest
from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange
from resonance_task.tables import gateways as gateway_rules
from resonance_task.tables import routes as route_rules

log = logging.getLogger(__name__)

# (partition, key, value) -> awaitable: the presence-by-user topic.
SendChange = Callable[[int, bytes, bytes], Awaitable[object]]


def decode_sync(
    value: bytes | None,
    record_ts_ms: int,
    now_ms: int | None = None,
    max_skew_ms: int = gateway_rules.DEFAULT_SKEW_MS,
) -> list[PresenceChange]:
    """A gateway's batch as per-user changes; timestamps at most `max_skew_ms` ahead."""
    try:
        request = SyncStatusRequest.FromString(value or b"")
    except DecodeError as exc:
        raise InvalidRecord(
            "decode_error", f"not a resonance.logic.v1.SyncStatusRequest: {exc}"
        ) from exc
    if not request.gateway_id:
        raise InvalidRecord("invalid", "gateway_id is required")
    changes = [
        PresenceChange(
            username=u.username,
            gateway_id=request.gateway_id,
            conn_id=u.conn_id,
            online=True,
            timestamp=u.timestamp or record_ts_ms,
            platform=u.platform,
            remote_ip=u.remote_ip,
        )
        for u in request.online_batch
    ]
    changes += [
        PresenceChange(
            username=u.username,
            gateway_id=request.gateway_id,
            conn_id=u.conn_id,
            online=False,
            timestamp=u.timestamp or record_ts_ms,
        )
        for u in request.offline_batch
    ]
    now = int(time.time() * 1000) if now_ms is None else now_ms
    for change in changes:
        change.timestamp = gateway_rules.clamp_ts(change.timestamp, now, max_skew_ms, "presence")
    return [c for c in changes if c.username]


def split_agent(
    send: SendChange,
    dead_letters: DeadLetters,
    partitions: int,
    max_skew_ms: int = gateway_rules.DEFAULT_SKEW_MS,
) -> Callable[[Any], Awaitable[None]]:
    async def presence_agent(stream: Any) -> None:
        async for event in stream.events():
            record = source_of(event)
            changes = await dead_letters.decoded(
                record,
                partial(
                    decode_sync,
                    record_ts_ms=int(event.message.timestamp * 1000),
                    max_skew_ms=max_skew_ms,
                ),
            )
            if changes is None:
                continue
            for change in changes:
                await send(
                    partition_for(change.username, partitions),
                    change.username.encode(),
                    change.SerializeToString(),
                )

    return presence_agent


def apply_agent(
    routes: Any, dead_letters: DeadLetters, keep_offline_seconds: float
) -> Callable[[Any], Awaitable[None]]:
    keep_ms = int(keep_offline_seconds * 1000)

    async def routes_agent(stream: Any) -> None:
        async for event in stream.events():
            record = source_of(event)
            change = await dead_letters.decoded(record, PresenceChange.FromString)
            if change is None:
                continue
            user = change.username
            route, applied = route_rules.apply_change(
                route_rules.decode(routes.get(user)),
                change,
                now_ms=int(time.time() * 1000),
                keep_offline_ms=keep_ms,
            )
            metrics.PRESENCE_CHANGES.labels("applied" if applied else "stale").inc()
            if not applied:
                continue
            if route:
                routes[user] = route_rules.encode(route)
            elif user in routes:
                del routes[user]

    return routes_agent
