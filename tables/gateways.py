"""Gateways: gateway_id -> its last heartbeat, in a GlobalTable every worker reads.

A gateway is pushable while its last heartbeat is younger than the timeout and it is
not draining; otherwise its users are not online for push.

"Younger" is measured from when the registry read the heartbeat, not from the time the
gateway wrote in it: a worker lagging behind on the heartbeat topic still reads a steady
stream of heartbeats from a live gateway, and must not count it down for its own lag.
"""

from __future__ import annotations

from typing import TypedDict

from proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat

TABLE_NAME = "gateways"


class GatewayInfo(TypedDict):
    address: str
    ts: int  # the heartbeat's own timestamp, ms: orders heartbeats
    seen: int  # when the registry read it, ms: liveness
    connections: int
    draining: bool


def from_heartbeat(heartbeat: GatewayHeartbeat, record_ts_ms: int, now_ms: int) -> GatewayInfo:
    return GatewayInfo(
        address=heartbeat.address,
        ts=heartbeat.timestamp or record_ts_ms,
        seen=now_ms,
        connections=heartbeat.connections,
        draining=heartbeat.draining,
    )


def is_newer(info: GatewayInfo, previous: GatewayInfo | None) -> bool:
    return previous is None or info["ts"] >= previous["ts"]


def silent_ms(info: GatewayInfo, now_ms: int) -> int:
    return max(0, now_ms - info["seen"])


def is_pushable(info: GatewayInfo | None, now_ms: int, timeout_ms: int) -> bool:
    return info is not None and not info["draining"] and silent_ms(info, now_ms) <= timeout_ms


def status(info: GatewayInfo, now_ms: int, timeout_ms: int) -> str:
    if info["draining"]:
        return "draining"
    return "up" if silent_ms(info, now_ms) <= timeout_ms else "down"
