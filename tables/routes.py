"""Routes: user -> the user's connections, each on a gateway.

A route is a dict `{conn_id: {"gw": gateway_id, "ts": ms, "on": bool, "pf": platform}}`
(JSON in the table's changelog). Offline connections stay a while as tombstones so a
late, older "online" for the same connection is recognised as stale and ignored.
"""

from __future__ import annotations

from typing import Any, TypedDict

from proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange

TABLE_NAME = "routes"


class Connection(TypedDict):
    gw: str
    ts: int
    on: bool
    pf: str


Route = dict[str, Connection]


def conn_key(change: PresenceChange) -> str:
    # Gateways built for Resonance IM send no conn_id: one connection per gateway then.
    return change.conn_id or change.gateway_id


def apply_change(
    route: Route | None, change: PresenceChange, *, now_ms: int, keep_offline_ms: int
) -> tuple[Route, bool]:
    """The route after `change`, and whether the change was applied (False: stale)."""
    current = dict(route or {})
    key = conn_key(change)
    previous = current.get(key)
    # Equal timestamps: offline wins, so a disconnect racing its own connect is not lost.
    if previous is not None and (
        previous["ts"] > change.timestamp
        or (previous["ts"] == change.timestamp and previous["on"] is False)
    ):
        return current, False
    current[key] = Connection(
        gw=change.gateway_id, ts=change.timestamp, on=change.online, pf=change.platform
    )
    horizon = now_ms - keep_offline_ms
    return {k: c for k, c in current.items() if c["on"] or c["ts"] >= horizon}, True


def online_gateways(route: Route | None) -> set[str]:
    """Gateways holding at least one live connection of this route."""
    if not route:
        return set()
    return {c["gw"] for c in route.values() if c["on"]}


def without_gateways(route: Route, gateways: set[str]) -> Route:
    return {k: c for k, c in route.items() if c["gw"] not in gateways}


def as_json(route: Route | None) -> list[dict[str, Any]]:
    return [{"conn_id": k, **c} for k, c in sorted((route or {}).items())]
