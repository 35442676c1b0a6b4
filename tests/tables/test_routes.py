from __future__ import annotations

import json

from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange
from resonance_task.tables.routes import apply_change, decode, encode, online_gateways

NOW = 1_800_000_000_000


def change(conn: str, gw: str, online: bool, ts: int) -> PresenceChange:
    return PresenceChange(
        username="alice", gateway_id=gw, conn_id=conn, online=online, timestamp=ts
    )


def test_devices_on_several_gateways_are_all_online() -> None:
    route, _ = apply_change(
        None, change("phone", "gw1", True, NOW), now_ms=NOW, keep_offline_ms=1000
    )
    route, _ = apply_change(
        route, change("laptop", "gw2", True, NOW + 1), now_ms=NOW, keep_offline_ms=1000
    )
    assert online_gateways(route) == {"gw1", "gw2"}
    route, _ = apply_change(
        route, change("phone", "gw1", False, NOW + 2), now_ms=NOW, keep_offline_ms=1000
    )
    assert online_gateways(route) == {"gw2"}


def test_older_event_for_a_connection_is_ignored() -> None:
    route, _ = apply_change(
        None, change("phone", "gw1", False, NOW + 10), now_ms=NOW, keep_offline_ms=60_000
    )
    late_online = change("phone", "gw1", True, NOW + 5)
    route, applied = apply_change(route, late_online, now_ms=NOW, keep_offline_ms=60_000)
    assert not applied
    assert online_gateways(route) == set()


def test_equal_timestamps_offline_wins() -> None:
    route, _ = apply_change(
        None, change("c", "gw1", False, NOW), now_ms=NOW, keep_offline_ms=60_000
    )
    route, applied = apply_change(
        route, change("c", "gw1", True, NOW), now_ms=NOW, keep_offline_ms=60_000
    )
    assert not applied and online_gateways(route) == set()


def test_offline_tombstones_are_pruned_after_keep_time() -> None:
    route, _ = apply_change(None, change("c", "gw1", False, NOW), now_ms=NOW, keep_offline_ms=1000)
    assert "c" in route
    route, _ = apply_change(
        route, change("d", "gw1", True, NOW + 5000), now_ms=NOW + 5000, keep_offline_ms=1000
    )
    assert set(route) == {"d"}


def test_missing_conn_id_means_one_connection_per_gateway() -> None:
    route, _ = apply_change(None, change("", "gw1", True, NOW), now_ms=NOW, keep_offline_ms=0)
    route, _ = apply_change(
        route, change("", "gw1", False, NOW + 1), now_ms=NOW, keep_offline_ms=60_000
    )
    assert online_gateways(route) == set()


def test_routes_are_stored_compact_and_old_json_objects_still_read() -> None:
    route = {
        "c1": {"gw": "g1", "ts": 5, "on": True, "pf": "ios"},
        "c2": {"gw": "g2", "ts": 6, "on": False, "pf": ""},
    }
    stored = encode(route)  # type: ignore[arg-type]
    assert stored == b'[["c1","g1",5,1,"ios"],["c2","g2",6,0,""]]'
    assert decode(stored) == route
    assert decode(json.dumps(route).encode()) == route  # as earlier versions wrote it
    assert decode(None) == {}
