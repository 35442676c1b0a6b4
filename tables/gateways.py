"""Gateways: gateway_id -> its last heartbeat, in a view every worker builds for itself.

Every worker reads the whole heartbeat topic into its own `Gateways` view (a TopicView,
no consumer group): gateways are few, and Faust's GlobalTable left one of two workers
with no gateways at all (faust-streaming #283).

A gateway is pushable while it is not draining and not silent longer than the timeout.
Silence is measured in event time: how far its last heartbeat is behind the newest
heartbeat of any gateway. A worker lagging on the heartbeat topic (its consumer busy
with a backlog) sees every gateway equally far behind, so its own lag cancels out and it
does not send online users to offline push. The wall clock is only a backstop, for when
every gateway falls silent together (there is then no newer heartbeat to compare with):
it allows LAG_ALLOWANCE timeouts before it counts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from google.protobuf.message import DecodeError

from pipeline import metrics
from pipeline.dlq import InvalidRecord
from proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat

LAG_ALLOWANCE = 3
DEFAULT_SKEW_MS = 5000


class GatewayInfo(TypedDict):
    address: str
    ts: int  # the heartbeat's own timestamp, ms (event time)
    seen: int  # when this worker read it, ms (wall clock)
    connections: int
    draining: bool


@dataclass(frozen=True)
class Clock:
    newest_ts: int
    now_ms: int
    timeout_ms: int


def clock(infos: Iterable[GatewayInfo], now_ms: int, timeout_ms: int) -> Clock:
    return Clock(max((i["ts"] for i in infos), default=0), now_ms, timeout_ms)


def clamp_ts(ts: int, now_ms: int, max_skew_ms: int, kind: str) -> int:
    """A timestamp no further ahead of this worker's clock than the allowed skew.

    Event time orders heartbeats and presence changes, so one record from the future
    (a wrong clock, a forged record) would otherwise win over every real one for good.
    """
    limit = now_ms + max_skew_ms
    if ts > limit:
        metrics.FUTURE_TIMESTAMPS.labels(kind).inc()
        return limit
    return ts


def from_heartbeat(
    heartbeat: GatewayHeartbeat,
    record_ts_ms: int,
    now_ms: int,
    max_skew_ms: int = DEFAULT_SKEW_MS,
) -> GatewayInfo:
    return GatewayInfo(
        address=heartbeat.address,
        ts=clamp_ts(heartbeat.timestamp or record_ts_ms, now_ms, max_skew_ms, "heartbeat"),
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


class Gateways(Mapping[str, GatewayInfo]):
    """This worker's view of every gateway's last heartbeat, fed from the heartbeat topic.

    Invalid heartbeats are skipped here (and counted); the registry agent dead-letters
    them once, on the one worker that owns their partition.
    """

    def __init__(self, max_skew_ms: int = DEFAULT_SKEW_MS) -> None:
        self._infos: dict[str, GatewayInfo] = {}
        self._max_skew_ms = max_skew_ms
        self.rejected = 0

    def apply(self, record: Any) -> None:
        try:
            heartbeat = decode_heartbeat(record.value)
        except InvalidRecord:
            self.rejected += 1
            return
        now_ms = int(time.time() * 1000)
        info = from_heartbeat(heartbeat, record.timestamp, now_ms, self._max_skew_ms)
        if is_newer(info, self._infos.get(heartbeat.gateway_id)):
            self._infos[heartbeat.gateway_id] = info

    def __getitem__(self, gateway_id: str) -> GatewayInfo:
        return self._infos[gateway_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)
