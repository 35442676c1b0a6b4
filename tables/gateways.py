"""Gateways: gateway_id -> its last heartbeat, in a GlobalTable every worker reads.

A gateway is pushable while it is not draining and not silent longer than the timeout.
Silence is measured in event time: how far its last heartbeat is behind the newest
heartbeat of any gateway. A worker lagging on the heartbeat topic (its consumer busy
with a backlog) sees every gateway equally far behind, so its own lag cancels out and it
does not send online users to offline push. The wall clock is only a backstop, for when
every gateway falls silent together (there is then no newer heartbeat to compare with):
it allows LAG_ALLOWANCE timeouts before it counts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypedDict

from proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat

TABLE_NAME = "gateways"
LAG_ALLOWANCE = 3


class GatewayInfo(TypedDict):
    address: str
    ts: int  # the heartbeat's own timestamp, ms (event time)
    seen: int  # when the registry read it, ms (wall clock)
    connections: int
    draining: bool


@dataclass(frozen=True)
class Clock:
    newest_ts: int
    now_ms: int
    timeout_ms: int


def clock(infos: Iterable[GatewayInfo], now_ms: int, timeout_ms: int) -> Clock:
    return Clock(max((i["ts"] for i in infos), default=0), now_ms, timeout_ms)


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


def silent_ms(info: GatewayInfo, at: Clock) -> int:
    behind_newest = at.newest_ts - info["ts"]
    unheard_beyond_allowance = at.now_ms - info["seen"] - LAG_ALLOWANCE * at.timeout_ms
    return max(0, behind_newest, unheard_beyond_allowance)


def is_pushable(info: GatewayInfo | None, at: Clock) -> bool:
    return info is not None and not info["draining"] and silent_ms(info, at) <= at.timeout_ms


def status(info: GatewayInfo, at: Clock) -> str:
    if info["draining"]:
        return "draining"
    return "up" if silent_ms(info, at) <= at.timeout_ms else "down"
