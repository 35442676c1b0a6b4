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

A gateway id belongs to the address of its first heartbeat until that gateway drains or
is down: a heartbeat naming the same id at another address is refused meanwhile, so one
forged record cannot redirect a live gateway's users. A gateway silent longer than
FORGET_AFTER is forgotten (with its metric labels and its push session): a starting
worker, which reads only that far back, would not know it either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

from google.protobuf.message import DecodeError

from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import InvalidRecord
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat

log = logging.getLogger(__name__)

LAG_ALLOWANCE = 3
DEFAULT_SKEW_MS = 5000
DEFAULT_TIMEOUT_MS = 15_000
DEFAULT_FORGET_AFTER_MS = 60_000


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


def releases_id(previous: GatewayInfo, at: Clock) -> bool:
    """Whether `previous`'s id may move to another address: it drained, or it is down."""
    return previous["draining"] or silent_ms(previous, at) > at.timeout_ms


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
    them once, on the one worker that owns their partition. A heartbeat for an id bound
    to another address is refused and counted in
    resonance_gateway_heartbeats_refused_total{reason="address_taken"}.
    """

    def __init__(
        self,
        max_skew_ms: int = DEFAULT_SKEW_MS,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        forget_after_ms: int = DEFAULT_FORGET_AFTER_MS,
        on_forget: Callable[[str], None] | None = None,
    ) -> None:
        self._infos: dict[str, GatewayInfo] = {}
        self._max_skew_ms = max_skew_ms
        self._timeout_ms = timeout_ms
        self._forget_after_ms = forget_after_ms
        self._on_forget = on_forget
        self._newest_ts = 0
        self.rejected = 0
        self.refused = 0

    def apply(self, record: Any) -> None:
        try:
            heartbeat = decode_heartbeat(record.value)
        except InvalidRecord:
            self.rejected += 1
            return
        now_ms = int(time.time() * 1000)
        info = from_heartbeat(heartbeat, record.timestamp, now_ms, self._max_skew_ms)
        gateway_id = heartbeat.gateway_id
        previous = self._infos.get(gateway_id)
        if previous is not None and previous["address"] != info["address"]:
            # The claim's own timestamp counts less the skew it may be ahead by: otherwise a
            # claim from the (clamped) future would make the bound gateway look down.
            claimed_ts = info["ts"] - self._max_skew_ms
            at = Clock(max(self._newest_ts, claimed_ts), now_ms, self._timeout_ms)
            if not releases_id(previous, at):
                self._refuse(gateway_id, previous["address"], info["address"])
                return
        elif not is_newer(info, previous):
            return
        self._infos[gateway_id] = info
        self._newest_ts = max(self._newest_ts, info["ts"])

    def _refuse(self, gateway_id: str, bound: str, claimed: str) -> None:
        self.refused += 1
        metrics.GATEWAY_HEARTBEATS_REFUSED.labels("address_taken").inc()
        if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... time
            log.warning(
                "gateway %r is bound to %s until it drains or goes down: refused a heartbeat"
                " from %s (%d refused so far)",
                gateway_id,
                bound,
                claimed,
                self.refused,
            )

    def forget_gone(self, now_ms: int | None = None) -> list[str]:
        """Drop the gateways silent longer than FORGET_AFTER; returns their ids."""
        at = Clock(
            self._newest_ts, int(time.time() * 1000) if now_ms is None else now_ms, self._timeout_ms
        )
        gone = [g for g, info in self._infos.items() if silent_ms(info, at) > self._forget_after_ms]
        for gateway_id in gone:
            del self._infos[gateway_id]
            if self._on_forget is not None:
                self._on_forget(gateway_id)
        return gone

    def __getitem__(self, gateway_id: str) -> GatewayInfo:
        return self._infos[gateway_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)
