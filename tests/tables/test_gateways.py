from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import generate_latest

from resonance_task.gateway.client import GatewayPool, SessionConfig
from resonance_task.pipeline import metrics
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import GatewayHeartbeat
from resonance_task.tables.gateways import (
    LAG_ALLOWANCE,
    Gateways,
    clock,
    from_heartbeat,
    is_newer,
    is_pushable,
    status,
)

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


class _Record:
    def __init__(self, gateway_id: str, address: str, ts: int, draining: bool = False) -> None:
        beat = GatewayHeartbeat(
            gateway_id=gateway_id, address=address, timestamp=ts, draining=draining
        )
        self.value = beat.SerializeToString()
        self.timestamp = ts


def _view(now: int, **kwargs: Any) -> Gateways:
    view = Gateways(max_skew_ms=5_000, timeout_ms=TIMEOUT, **kwargs)
    view.apply(_Record("a", "a:1", now - 1_000))
    return view


def test_a_gateway_id_stays_bound_to_its_first_address_while_it_is_up() -> None:
    now = int(time.time() * 1000)
    view = _view(now)
    # Another address claims the id, even with a timestamp from the future: refused.
    view.apply(_Record("a", "evil:1", now + 3_600_000))
    view.apply(_Record("a", "evil:1", now))
    assert view["a"]["address"] == "a:1" and view.refused == 2
    view.apply(_Record("a", "a:1", now))  # the real gateway's own heartbeats go on
    assert view["a"]["ts"] == now


def test_a_draining_gateway_releases_its_id() -> None:
    now = int(time.time() * 1000)
    view = _view(now)
    view.apply(_Record("a", "a:1", now, draining=True))
    view.apply(_Record("a", "a:2", now + 10))  # the same gateway, restarted elsewhere
    assert view["a"]["address"] == "a:2" and not view["a"]["draining"]


def test_a_gateway_down_longer_than_the_timeout_releases_its_id() -> None:
    now = int(time.time() * 1000)
    view = _view(now - 60_000)  # last heard a minute ago, in event time
    view.apply(_Record("a", "a:2", now))
    assert view["a"]["address"] == "a:2" and view.refused == 0


def test_gateways_silent_past_the_horizon_are_forgotten_with_their_metric_labels() -> None:
    now = int(time.time() * 1000)
    forgotten: list[str] = []
    view = Gateways(timeout_ms=TIMEOUT, forget_after_ms=60_000, on_forget=forgotten.append)
    view.apply(_Record("gone", "g:1", now - 61_000))
    view.apply(_Record("live", "l:1", now))
    metrics.PUSH_ENQUEUE.labels("gone").inc()
    metrics.PUSH_ENQUEUE_FAILED.labels("gone", "queue_full").inc()
    metrics.GATEWAY_QUEUE_DEPTH.labels("gone").set(3)
    metrics.PUSH_ENQUEUE.labels("live").inc()

    assert view.forget_gone(now) == ["gone"] and forgotten == ["gone"]
    assert list(view) == ["live"]
    metrics.forget_gateway("gone")
    exposed = generate_latest().decode()
    assert 'gateway="gone"' not in exposed and 'gateway="live"' in exposed
    # Everyone silent together (this worker's own clock): forgotten after the allowance.
    assert view.forget_gone(now + 60_000) == []
    # (`seen` is read from the clock in apply, a few ms after `now`.)
    assert view.forget_gone(now + 61_000 + LAG_ALLOWANCE * TIMEOUT) == ["live"]


async def test_the_pool_closes_an_idle_session_of_a_forgotten_gateway() -> None:
    pool = GatewayPool(SessionConfig())
    session = pool.session("gone", "127.0.0.1:1")
    pool.forget("gone")
    await asyncio.gather(*pool._retiring)
    assert "gone" not in pool.stats() and session._closing and session._task is None
    pool.forget("never-seen")  # nothing to close
