"""registry: gateways' heartbeats -> the gateways GlobalTable, read by every worker."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.message import DecodeError

from pipeline.dlq import DeadLetters, InvalidRecord, source_of
from proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat
from tables import gateways as gateway_rules


def decode_heartbeat(value: bytes | None) -> GatewayHeartbeat:
    try:
        heartbeat = GatewayHeartbeat.FromString(value or b"")
    except DecodeError as exc:
        raise InvalidRecord(
            "decode_error", f"not a resonance.gateway.v1.GatewayHeartbeat: {exc}"
        ) from exc
    if not heartbeat.gateway_id or not heartbeat.address:
        raise InvalidRecord("invalid", "gateway_id and address are required")
    return heartbeat


def agent(gateways: Any, dead_letters: DeadLetters) -> Callable[[Any], Awaitable[None]]:
    async def registry_agent(stream: Any) -> None:
        async for event in stream.events():
            record = source_of(event)
            try:
                heartbeat = decode_heartbeat(record.value)
            except InvalidRecord as exc:
                await dead_letters.put(record, exc.reason, exc)
                continue
            info = gateway_rules.from_heartbeat(
                heartbeat, int(event.message.timestamp * 1000), int(time.time() * 1000)
            )
            if gateway_rules.is_newer(info, gateways.get(heartbeat.gateway_id)):
                gateways[heartbeat.gateway_id] = info

    return registry_agent
