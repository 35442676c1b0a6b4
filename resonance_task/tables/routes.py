"""Routes: user -> the user's connections, each on a gateway.

A route is a dict `{conn_id: {"gw": gateway_id, "ts": ms, "on": bool, "pf": platform}}`
while it is being changed; it is stored as compact JSON bytes,
`[[conn_id, gw, ts, on, pf], ...]`, because a worker may hold a million of them (a dict
of dicts each cost ~5x the memory). Routes written as JSON objects by earlier versions
are read too. Offline connections stay a while as tombstones so a late, older "online"
for the same connection is recognised as stale and ignored.

The routes table is its changelog, `<APP_ID>-routes-changelog`: compacted, keyed by user
(the key JSON-encoded, as Faust's table wrote it before), one record per changed route,
a null value when a route is gone. The routes stage (agents/presence.py) writes it on
the worker owning the user's partition. Fan-out runs wherever a conversation's partition
is, so every worker reads the whole changelog into its own `RoutesView`.
"""

from __future__ import annotations

import json
import sys
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, TypedDict

from resonance_task.proto.resonance.pipeline.v1.pipeline_pb2 import PresenceChange

CHANGELOG_SUFFIX = "-routes-changelog"


class Connection(TypedDict):
    gw: str
    ts: int
    on: bool
    pf: str


Route = dict[str, Connection]


def changelog_topic(app_id: str) -> str:
    return app_id + CHANGELOG_SUFFIX


# A connection as stored: [conn_id, gateway_id, timestamp ms, online 0|1, platform].
Row = list[Any]


def changelog_key(user: str) -> bytes:
    return _quote(user).encode()


def user_of(key: bytes) -> str:
    """The user a changelog key names (a JSON string)."""
    if b"\\" in key:
        return str(json.loads(key))
    return key[1:-1].decode()


def rows_of(value: bytes | str | dict[str, Any] | None) -> list[Row]:
    """A stored route's rows: compact rows, or the JSON object earlier versions wrote."""
    if value is None:
        return []
    parsed = value if isinstance(value, dict) else json.loads(value)
    if isinstance(parsed, dict):
        return [[k, c["gw"], c["ts"], int(c["on"]), c["pf"]] for k, c in parsed.items()]
    return parsed  # type: ignore[no-any-return]


def encode_rows(rows: list[Row]) -> bytes:
    # Written out, not through json.dumps: byte for byte what json.dumps wrote (ASCII, no
    # spaces), at a third of the cost, once per presence change on its way to every worker.
    out = ",".join(
        f"[{_quote(k)},{_quote(gw)},{int(ts)},{int(on)},{_quote(pf)}]" for k, gw, ts, on, pf in rows
    )
    return f"[{out}]".encode()


def encode(route: Route) -> bytes:
    """A route as the table stores it: `[[conn_id, gw, ts, on, pf], ...]`."""
    return encode_rows([[k, c["gw"], c["ts"], c["on"], c["pf"]] for k, c in route.items()])


def decode(value: bytes | str | dict[str, Any] | None) -> Route:
    """A stored route as connections by id."""
    return _route(rows_of(value))


def _route(rows: list[Row]) -> Route:
    return {k: Connection(gw=gw, ts=ts, on=bool(on), pf=pf) for k, gw, ts, on, pf in rows}


def conn_key(change: PresenceChange) -> str:
    # Gateways built for Resonance IM send no conn_id: one connection per gateway then.
    return change.conn_id or change.gateway_id


def apply_to_rows(
    rows: list[Row], change: PresenceChange, *, now_ms: int, keep_offline_ms: int
) -> list[Row] | None:
    """The rows after `change`, or None if it is stale (older than the connection's last).

    The one rule for a route: a connection's newest event wins, and at equal timestamps
    offline wins, so a disconnect racing its own connect is not lost; offline connections
    are kept `keep_offline_ms` as tombstones that make a late "online" stale.
    """
    key = conn_key(change)
    ts = change.timestamp
    horizon = now_ms - keep_offline_ms
    new = [key, change.gateway_id, ts, int(change.online), change.platform]
    out = []
    found = False
    for row in rows:
        if row[0] == key:
            if row[2] > ts or (row[2] == ts and not row[3]):
                return None
            row, found = new, True
        if row[3] or row[2] >= horizon:
            out.append(row)
    if not found and (new[3] or ts >= horizon):
        out.append(new)
    return out


def apply_change(
    route: Route | None, change: PresenceChange, *, now_ms: int, keep_offline_ms: int
) -> tuple[Route, bool]:
    """The route after `change`, and whether the change was applied (False: stale)."""
    rows = [[k, c["gw"], c["ts"], int(c["on"]), c["pf"]] for k, c in (route or {}).items()]
    after = apply_to_rows(rows, change, now_ms=now_ms, keep_offline_ms=keep_offline_ms)
    if after is None:
        return dict(route or {}), False
    return _route(after), True


def online_gateways(route: Route | None) -> set[str]:
    """Gateways holding at least one live connection of this route."""
    if not route:
        return set()
    return {c["gw"] for c in route.values() if c["on"]}


def as_json(route: Route | None) -> list[dict[str, Any]]:
    return [{"conn_id": k, **c} for k, c in sorted((route or {}).items())]


def _live_gateways(value: bytes) -> tuple[str, ...]:
    # From the stored rows themselves: every presence change reaches every worker's view,
    # and most users have one connection.
    rows = rows_of(value)
    if len(rows) == 1:
        row = rows[0]
        return (row[1],) if row[3] else ()
    return tuple(sorted({row[1] for row in rows if row[3]}))


class RoutesView:
    """A worker's copy of the routes changelog.

    Two maps, for two readers. Per partition, every user's stored route as written (the
    routes stage starts from it when it takes a partition over; /routes reads it). And
    user -> the gateways of the user's live connections, for fan-out: compact on purpose
    (a worker holds every online user), one str key per user and the gateway tuple shared
    by every user on the same gateways.
    """

    def __init__(self) -> None:
        self._online: dict[str, tuple[str, ...]] = {}
        self._shared: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._stored: dict[int, dict[str, bytes]] = {}

    def apply(self, record: Any) -> None:
        # Interned: the same user's name is one object however many maps and messages name it.
        user = sys.intern(user_of(record.key))
        stored = self._stored.setdefault(record.partition, {})
        value = record.value
        if value is None:  # the route is gone
            stored.pop(user, None)
            self._online.pop(user, None)
            return
        stored[user] = value
        gateways = _live_gateways(value)
        if gateways:
            self._online[user] = self._shared.setdefault(gateways, gateways)
        else:
            self._online.pop(user, None)

    def get(self, user: str) -> tuple[str, ...]:
        return self._online.get(user, ())

    def route(self, user: str) -> Route:
        """The user's stored route (with its offline tombstones), or {}."""
        for stored in self._stored.values():
            if user in stored:
                return decode(stored[user])
        return {}

    def partition(self, partition: int) -> dict[str, bytes]:
        """A copy of one partition's stored routes: the values are shared, not copied."""
        return dict(self._stored.get(partition, {}))

    @property
    def known(self) -> int:
        """Users with a stored route, online or not."""
        return sum(len(s) for s in self._stored.values())

    def __len__(self) -> int:
        return len(self._online)
