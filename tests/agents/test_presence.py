"""presence: gateways' batches -> per-user changes; a timestamp from the future is clamped."""

from __future__ import annotations

from resonance_task.agents.presence import decode_sync
from resonance_task.proto.resonance.logic.v1.presence_pb2 import (
    SyncStatusRequest,
    UserOffline,
    UserOnline,
)
from resonance_task.tables import routes as route_rules

NOW = 1_800_000_000_000


def batch(online: list[UserOnline], offline: list[UserOffline]) -> bytes:
    request = SyncStatusRequest(gateway_id="gw-1", online_batch=online, offline_batch=offline)
    return request.SerializeToString()


def test_a_presence_change_from_the_future_cannot_pin_a_user_online() -> None:
    connect = UserOnline(username="u1", conn_id="c1", timestamp=NOW + 3_600_000)
    (online,) = decode_sync(batch([connect], []), NOW, now_ms=NOW, max_skew_ms=5_000)
    assert online.timestamp == NOW + 5_000
    route, _ = route_rules.apply_change(None, online, now_ms=NOW, keep_offline_ms=60_000)
    # The real disconnect, six seconds later by the gateway's (right) clock, wins.
    disconnect = UserOffline(username="u1", conn_id="c1", timestamp=NOW + 6_000)
    (offline,) = decode_sync(batch([], [disconnect]), NOW, now_ms=NOW + 6_000, max_skew_ms=5_000)
    route, applied = route_rules.apply_change(
        route, offline, now_ms=NOW + 6_000, keep_offline_ms=60_000
    )
    assert applied and not any(c["on"] for c in route.values())


def test_timestamps_within_the_skew_are_kept() -> None:
    connect = UserOnline(username="u1", conn_id="c1", timestamp=NOW + 4_000)
    (online,) = decode_sync(batch([connect], []), NOW, now_ms=NOW, max_skew_ms=5_000)
    assert online.timestamp == NOW + 4_000
