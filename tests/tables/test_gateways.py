from __future__ import annotations

from proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat
from tables.gateways import LAG_ALLOWANCE, clock, from_heartbeat, is_newer, is_pushable, status

T = 1_800_000_000_000
TIMEOUT = 5_000


def info(gw: str, ts: int, seen: int, draining: bool = False):  # type: ignore[no-untyped-def]
    beat = GatewayHeartbeat(gateway_id=gw, address="h:1", timestamp=ts, draining=draining)
    return from_heartbeat(beat, 0, seen)


def test_a_gateway_behind_the_others_by_the_timeout_is_down() -> None:
    alive, dead = info("a", T + 20_000, T + 20_000), info("b", T, T)
    at = clock([alive, dead], T + 20_000, TIMEOUT)
    assert is_pushable(alive, at)
    assert not is_pushable(dead, at)
    assert status(dead, at) == "down"


def test_a_worker_lagging_on_heartbeats_still_counts_gateways_up() -> None:
    # Both heartbeats were read 12 s ago (the consumer was busy): equally behind, both up.
    a, b = info("a", T, T), info("b", T - 1_000, T)
    at = clock([a, b], T + 12_000, TIMEOUT)
    assert is_pushable(a, at) and is_pushable(b, at)


def test_when_every_gateway_is_silent_the_wall_clock_decides() -> None:
    only = info("a", T, T)
    assert is_pushable(only, clock([only], T + (LAG_ALLOWANCE + 1) * TIMEOUT, TIMEOUT))
    assert not is_pushable(only, clock([only], T + (LAG_ALLOWANCE + 1) * TIMEOUT + 1, TIMEOUT))


def test_draining_gets_nothing_new() -> None:
    gw = info("a", T, T, draining=True)
    at = clock([gw], T, TIMEOUT)
    assert not is_pushable(gw, at) and status(gw, at) == "draining"


def test_a_heartbeat_from_the_future_takes_no_real_gateway_down_for_good() -> None:
    skew = 5_000
    real = from_heartbeat(GatewayHeartbeat(gateway_id="a", address="a:1", timestamp=T), 0, T, skew)
    forged = GatewayHeartbeat(gateway_id="x", address="x:1", timestamp=2**62)
    bogus = from_heartbeat(forged, 0, T, skew)
    assert bogus["ts"] == T + skew  # clamped to the worker's clock plus the skew
    assert is_pushable(real, clock([real, bogus], T, TIMEOUT))  # 5 s behind: still up
    later = from_heartbeat(
        GatewayHeartbeat(gateway_id="a", address="a:1", timestamp=T + 6_000), 0, T + 6_000, skew
    )
    assert is_pushable(later, clock([later, bogus], T + 6_000, TIMEOUT))


def test_a_forged_future_heartbeat_holds_a_gateway_id_only_until_the_next_real_one() -> None:
    skew = 5_000
    forged = from_heartbeat(
        GatewayHeartbeat(gateway_id="a", address="evil:1", timestamp=T + 3_600_000), 0, T, skew
    )
    real = from_heartbeat(
        GatewayHeartbeat(gateway_id="a", address="a:1", timestamp=T + 5_001), 0, T + 5_001, skew
    )
    assert is_newer(real, forged)
