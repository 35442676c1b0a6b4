"""PostgreSQL backends (asyncpg) for the inbox store and the member store.

Inbox: the Resonance IM `t_inbox` table, so a team on Resonance keeps its schema and its
delta-sync queries (`WHERE owner_username = $1 AND id > $2`), plus what gap-free
per-user cursors need (DESIGN.md section 3):
- `t_inbox`: Resonance's columns (id, owner_username, session_id, msg_id, seq_id,
  is_read, created_at; unique (owner_username, session_id, seq_id)) and `inbox_cursor`,
  the user's cursor 1, 2, 3... (unique per owner), unique (owner_username, msg_id);
- `t_inbox_cursor`: per user, the last cursor and the highest msg_id trimmed by the cap;
- `t_message_body`: the PushMessage bytes, once per message.
Rows written without `inbox_cursor` (by Resonance's own service) are not in our sync.

Members: `t_group_member (session_id, username, joined_at)`, primary key
(session_id, username) with byte-order collation, so keyset pages match Redis's BYLEX.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg

from proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from stores.inbox import InboxEntry, WriteResult
from stores.members import now_ms

INBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS t_inbox (
    id             bigserial PRIMARY KEY,
    owner_username varchar(128) NOT NULL,
    session_id     varchar(256) NOT NULL,
    msg_id         bigint NOT NULL,
    seq_id         bigint NOT NULL,
    is_read        boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_username, session_id, seq_id)
);
ALTER TABLE t_inbox ADD COLUMN IF NOT EXISTS inbox_cursor bigint;
CREATE UNIQUE INDEX IF NOT EXISTS t_inbox_owner_cursor ON t_inbox (owner_username, inbox_cursor);
CREATE UNIQUE INDEX IF NOT EXISTS t_inbox_owner_msg ON t_inbox (owner_username, msg_id);
CREATE TABLE IF NOT EXISTS t_inbox_cursor (
    owner_username varchar(128) PRIMARY KEY,
    last_cursor    bigint NOT NULL DEFAULT 0,
    trimmed_msg_id bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS t_message_body (
    msg_id     bigint PRIMARY KEY,
    body       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

MEMBER_SCHEMA = """
CREATE TABLE IF NOT EXISTS t_group_member (
    session_id varchar(256) NOT NULL,
    username   varchar(128) COLLATE "C" NOT NULL,
    joined_at  bigint NOT NULL,
    PRIMARY KEY (session_id, username)
);
CREATE INDEX IF NOT EXISTS t_group_member_username ON t_group_member (username);
"""


def _identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"{name!r}: a schema name is letters, digits and underscores")
    return f'"{name}"'


class _Pool:
    """An asyncpg pool made on first use (the app builds its stores at import time),
    with the schema ensured once."""

    def __init__(self, dsn: str, schema_sql: str, search_path: str | None, size: int) -> None:
        self._dsn = dsn
        self._schema_sql = schema_sql
        self._search_path = search_path
        self._size = size
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def get(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    settings = {"search_path": self._search_path} if self._search_path else {}
                    pool = await asyncpg.create_pool(
                        self._dsn, min_size=1, max_size=self._size, server_settings=settings
                    )
                    async with pool.acquire() as conn:
                        # Concurrent workers may race to create the same tables.
                        await conn.execute("SELECT pg_advisory_lock(72231)")
                        try:
                            if self._search_path:
                                await conn.execute(
                                    f"CREATE SCHEMA IF NOT EXISTS {_identifier(self._search_path)}"
                                )
                            await conn.execute(self._schema_sql)
                        finally:
                            await conn.execute("SELECT pg_advisory_unlock(72231)")
                    self._pool = pool
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class PostgresInboxStore:
    def __init__(
        self,
        dsn: str,
        *,
        max_entries: int,
        search_path: str | None = None,
        pool_size: int = 4,
    ) -> None:
        self._pool = _Pool(dsn, INBOX_SCHEMA, search_path, pool_size)
        self._max_entries = max_entries

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        pairs = [(user, message) for message, users in batch for user in users]
        if not pairs:
            return WriteResult(new=0, duplicate=0)
        owners = sorted({user for user, _ in pairs})
        pool = await self._pool.get()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO t_inbox_cursor (owner_username) SELECT unnest($1::text[])"
                " ON CONFLICT DO NOTHING",
                owners,
            )
            # Every writer locks its owners' counter rows first, in one order: writers of
            # one user take turns, and the checks below see everything committed before.
            counters = {
                r["owner_username"]: [r["last_cursor"], r["trimmed_msg_id"]]
                for r in await conn.fetch(
                    "SELECT owner_username, last_cursor, trimmed_msg_id FROM t_inbox_cursor"
                    " WHERE owner_username = ANY($1::text[]) ORDER BY owner_username FOR UPDATE",
                    owners,
                )
            }
            existing = await conn.fetch(
                "SELECT owner_username, msg_id, session_id, seq_id FROM t_inbox"
                " WHERE owner_username = ANY($1::text[])"
                " AND (msg_id = ANY($2::bigint[]) OR seq_id = ANY($3::bigint[]))",
                owners,
                list({m.msg_id for _, m in pairs}),
                list({m.seq_id for _, m in pairs}),
            )
            seen_msg = {(r["owner_username"], r["msg_id"]) for r in existing}
            # Resonance's own unique key: one (session, seq) per owner.
            seen_seq = {(r["owner_username"], r["session_id"], r["seq_id"]) for r in existing}
            rows: list[tuple[str, str, int, int, int]] = []
            for user, message in pairs:
                by_msg = (user, message.msg_id)
                by_seq = (user, message.session_id, message.seq_id)
                if by_msg in seen_msg or by_seq in seen_seq:
                    continue
                if message.msg_id <= counters[user][1]:
                    continue  # trimmed by the cap earlier: a replay must not bring it back
                seen_msg.add(by_msg)
                seen_seq.add(by_seq)
                counters[user][0] += 1
                rows.append(
                    (user, message.session_id, message.msg_id, message.seq_id, counters[user][0])
                )
            if rows:
                await self._insert(conn, batch, rows, counters)
        return WriteResult(new=len(rows), duplicate=len(pairs) - len(rows))

    async def _insert(
        self,
        conn: Any,
        batch: Sequence[tuple[PushMessage, Sequence[str]]],
        rows: list[tuple[str, str, int, int, int]],
        counters: dict[str, list[int]],
    ) -> None:
        bodies = {m.msg_id: m.SerializeToString() for m, _ in batch}
        await conn.execute(
            "INSERT INTO t_message_body (msg_id, body)"
            " SELECT * FROM unnest($1::bigint[], $2::bytea[]) ON CONFLICT DO NOTHING",
            list(bodies),
            list(bodies.values()),
        )
        await conn.execute(
            "INSERT INTO t_inbox (owner_username, session_id, msg_id, seq_id, inbox_cursor)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],"
            " $5::bigint[])"
            # Checked above under the owners' locks; this only guards against a writer that
            # does not take them (Resonance's own service writing the same row).
            " ON CONFLICT DO NOTHING",
            *(list(column) for column in zip(*rows, strict=True)),
        )
        touched = sorted({row[0] for row in rows})
        await conn.execute(
            "UPDATE t_inbox_cursor c SET last_cursor = u.last"
            " FROM unnest($1::text[], $2::bigint[]) AS u(owner, last)"
            " WHERE c.owner_username = u.owner",
            touched,
            [counters[user][0] for user in touched],
        )
        if self._max_entries > 0:
            await conn.execute(
                "WITH gone AS ("
                "  DELETE FROM t_inbox t USING unnest($1::text[], $2::bigint[]) AS k(owner, first)"
                "  WHERE t.owner_username = k.owner AND t.inbox_cursor < k.first"
                "  RETURNING t.owner_username, t.msg_id)"
                " UPDATE t_inbox_cursor c SET trimmed_msg_id = GREATEST(c.trimmed_msg_id, g.top)"
                " FROM (SELECT owner_username, max(msg_id) AS top FROM gone"
                "       GROUP BY owner_username) g"
                " WHERE c.owner_username = g.owner_username",
                touched,
                [counters[user][0] - self._max_entries + 1 for user in touched],
            )

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        pool = await self._pool.get()
        rows = await pool.fetch(
            "SELECT i.inbox_cursor, i.msg_id, b.body FROM t_inbox i"
            " LEFT JOIN t_message_body b ON b.msg_id = i.msg_id"
            " WHERE i.owner_username = $1 AND i.inbox_cursor > $2"
            " ORDER BY i.inbox_cursor LIMIT $3",
            user,
            after,
            limit,
        )
        return [
            InboxEntry(
                cursor=r["inbox_cursor"],
                msg_id=r["msg_id"],
                message=PushMessage.FromString(r["body"]) if r["body"] is not None else None,
            )
            for r in rows
        ]

    async def last_cursor(self, user: str) -> int:
        pool = await self._pool.get()
        value = await pool.fetchval(
            "SELECT last_cursor FROM t_inbox_cursor WHERE owner_username = $1", user
        )
        return int(value or 0)

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        pool = await self._pool.get()
        rows = await pool.fetch(
            "SELECT owner_username, last_cursor FROM t_inbox_cursor"
            " WHERE owner_username = ANY($1::text[])",
            list(users),
        )
        found = {r["owner_username"]: int(r["last_cursor"]) for r in rows}
        return {u: found.get(u, 0) for u in users}

    async def close(self) -> None:
        await self._pool.close()


class PostgresMemberStore:
    def __init__(self, dsn: str, *, search_path: str | None = None, pool_size: int = 4) -> None:
        self._pool = _Pool(dsn, MEMBER_SCHEMA, search_path, pool_size)

    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        pool = await self._pool.get()
        rows = await pool.fetch(
            "SELECT username FROM t_group_member WHERE session_id = $1 AND username > $2"
            " ORDER BY username LIMIT $3",
            session_id,
            after,
            count,
        )
        members = [r["username"] for r in rows]
        return members, (members[-1] if len(members) == count else None)

    async def count(self, session_id: str) -> int:
        pool = await self._pool.get()
        return int(
            await pool.fetchval(
                "SELECT count(*) FROM t_group_member WHERE session_id = $1", session_id
            )
        )

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None:
        pool = await self._pool.get()
        await pool.execute(
            "INSERT INTO t_group_member (session_id, username, joined_at)"
            " SELECT $1, unnest($2::text[]), $3 ON CONFLICT DO NOTHING",
            session_id,
            list(users),
            joined_at_ms if joined_at_ms is not None else now_ms(),
        )

    async def remove(self, session_id: str, users: Sequence[str]) -> None:
        pool = await self._pool.get()
        await pool.execute(
            "DELETE FROM t_group_member WHERE session_id = $1 AND username = ANY($2::text[])",
            session_id,
            list(users),
        )

    async def sessions_of(self, user: str) -> dict[str, int]:
        pool = await self._pool.get()
        rows = await pool.fetch(
            "SELECT session_id, joined_at FROM t_group_member WHERE username = $1", user
        )
        return {r["session_id"]: int(r["joined_at"]) for r in rows}

    async def close(self) -> None:
        await self._pool.close()
