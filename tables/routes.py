"""Routes: user -> the user's connections, each on a gateway.

A route is a dict `{conn_id: {"gw": gateway_id, "ts": ms, "on": bool, "pf": platform}}`
while it is being changed; the table keeps it as compact JSON bytes,
`[[conn_id, gw, ts, on, pf], ...]`, because a worker may hold a million of them (a dict
of dicts each cost ~5x the memory). Routes written as JSON objects by earlier versions
are read too. Offline connections stay a while as tombstones so a late, older "online"
for the same connection is recognised as stale and ignored.

The routes table is written by the routes agent on the worker owning the user's
partition. Fan-out runs wherever a conversation's partition is, so every worker also
keeps `OnlineRoutes`, a compact view of the table's changelog: user -> the gateways
holding a live connection of the user.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TypedDict

from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange

TABLE_NAME = "routes"


class Connection(TypedDict):
    gw: str
    ts: int
    on: bool
    pf: str


Route = dict[str, Connection]


def encode(route: Route) -> bytes:
    """A route as the table stores it."""
    rows = [[k, c["gw"], c["ts"], int(c["on"]), c["pf"]] for k, c in route.items()]
    return json.dumps(rows, separators=(",", ":")).encode()


def decode(value: bytes | str | dict[str, Any] | None) -> Route:
    """A stored route: compact rows, or the JSON object earlier versions wrote."""
    if value is None:
        return {}
    parsed = json.loads(value) if isinstance(value, bytes | str) else value
    if isinstance(parsed, dict):
        return {
            k: Connection(gw=c["gw"], ts=c["ts"], on=c["on"], pf=c["pf"]) for k, c in parsed.items()
        }
    return {k: Connection(gw=gw, ts=ts, on=bool(on), pf=pf) for k, gw, ts, on, pf in parsed}


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


def as_json(route: Route | None) -> list[dict[str, Any]]:
    return [{"conn_id": k, **c} for k, c in sorted((route or {}).items())]


class OnlineRoutes:
    """user -> the gateways of the user's live connections, from the routes changelog.

    Compact on purpose (a worker holds every online user): one str key per user, and the
    gateway tuple shared by every user on the same gateways.
    """

    def __init__(self) -> None:
        self._online: dict[str, tuple[str, ...]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}

    def apply(self, record: Any) -> None:
        # Faust writes a table's changelog keys through the table's key serializer, JSON.
        user = json.loads(record.key)
        gateways = tuple(sorted(online_gateways(decode(record.value))))
        if gateways:
            # Interned: the same user's name is one object however many messages name it.
            self._online[sys.intern(user)] = self._shared.setdefault(gateways, gateways)
        else:
            self._online.pop(user, None)

    def get(self, user: str) -> tuple[str, ...]:
        return self._online.get(user, ())

    def __len__(self) -> int:
        return len(self._online)
