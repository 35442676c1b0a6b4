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

Members: by default `t_group_member (session_id, username, joined_at)`, primary key
(session_id, username), created if missing. Another service's table can be read instead
(its table and column names given to PostgresMemberStore): it is checked at first use,
never created or altered. Pages are keyset pages in the user column's own order (its type
and collation), ties broken by the name's bytes; NULL users are skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from resonance_task.errors import TransientError
from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.inbox import InboxEntry, WriteResult
from resonance_task.stores.members import UnpageableGroup, now_ms

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


async def insert_entries(
    conn: Any, bodies: dict[int, bytes], rows: list[tuple[str, str, int, int, int]]
) -> None:
    """Message bodies, and t_inbox rows (owner, session_id, msg_id, seq_id, cursor); a row
    or body already there is left as it is."""
    if bodies:
        await conn.execute(
            "INSERT INTO t_message_body (msg_id, body)"
            " SELECT * FROM unnest($1::bigint[], $2::bytea[]) ON CONFLICT DO NOTHING",
            list(bodies),
            list(bodies.values()),
        )
    await conn.execute(
        "INSERT INTO t_inbox (owner_username, session_id, msg_id, seq_id, inbox_cursor)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[],"
        " $5::bigint[]) ON CONFLICT DO NOTHING",
        *(list(column) for column in zip(*rows, strict=True)),
    )


async def read_entries(pool: Any, user: str, after: int, limit: int) -> list[InboxEntry]:
    """A user's entries after a cursor, in cursor order, from t_inbox: the PostgreSQL inbox
    store's, and the Redis inbox's archive (stores/archive.py)."""
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


def _identifier(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise ValueError(f"{name!r}: a schema name is letters, digits and underscores")
    return f'"{name}"'


class _Pool:
    """An asyncpg pool made on first use (the app builds its stores at import time),
    with the schema ensured once."""

    def __init__(
        self, dsn: str, schema_sql: str | None, search_path: str | None, size: int
    ) -> None:
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
                    if self._schema_sql is not None:
                        await self._ensure_schema(pool)
                    self._pool = pool
        return self._pool

    async def _ensure_schema(self, pool: Any) -> None:
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
        # Checked above under the owners' locks; ON CONFLICT only guards against a writer
        # that does not take them (Resonance's own service writing the same row).
        await insert_entries(conn, {m.msg_id: m.SerializeToString() for m, _ in batch}, rows)
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
        return await read_entries(await self._pool.get(), user, after, limit)

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


class MemberTableError(TransientError):
    """The configured member table or one of its columns is missing or unusable.

    Not UnpageableGroup: it is about every group, so it is raised on each call until the
    table is fixed (then picked up without a restart), and events wait rather than die."""


def _quote_identifier(name: str, what: str) -> str:
    """`name` as a double-quoted SQL identifier, exactly as spelled (case included)."""
    # PostgreSQL silently truncates identifiers past 63 bytes, so a longer name would
    # name some other table or column.
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise ValueError(f"{what} {name!r}: an identifier is 1 to 63 bytes, without NUL")
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class _MemberSql:
    first_page: str
    next_page: str
    count: str
    session_check: str
    add: str
    remove: str
    sessions_of: str
    session_column: str  # for messages: table.column (type)


_DEFAULT_MEMBER_NAMES = ("t_group_member", "session_id", "username", "joined_at")

# to_regclass resolves the name as our queries will (search_path, quoted case), and the
# type without its modifier is a cast target that cannot truncate: `::varchar(8)` would
# cut a longer session id down to some other group's.
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, NULL) AS type, t.typcategory::text AS category
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
"""


class PostgresMemberStore:
    """Members from our `t_group_member` or from another service's table (checked, never
    created, when any name differs from the defaults).

    A session id the session column's type cannot hold (not a number, for a bigint
    column) raises UnpageableGroup("member_session_id_invalid") from page() and count().
    """

    def __init__(
        self,
        dsn: str,
        *,
        search_path: str | None = None,
        pool_size: int = 4,
        table: str = "t_group_member",
        session_column: str = "session_id",
        user_column: str = "username",
        joined_at_column: str = "joined_at",
    ) -> None:
        names = (table, session_column, user_column, joined_at_column)
        self._names = names
        self._quoted = tuple(
            _quote_identifier(name, what)
            for name, what in zip(
                names, ("table", "session column", "user column", "joined-at column"), strict=True
            )
        )
        ours = names == _DEFAULT_MEMBER_NAMES
        self._pool = _Pool(dsn, MEMBER_SCHEMA if ours else None, search_path, pool_size)
        self._sql: _MemberSql | None = None
        self._lock = asyncio.Lock()

    async def _statements(self) -> tuple[Any, _MemberSql]:
        pool = await self._pool.get()
        if self._sql is None:
            async with self._lock:
                if self._sql is None:
                    # Not cached on failure: a table created or fixed later is picked up.
                    self._sql = await self._inspect(pool)
        return pool, self._sql

    async def _inspect(self, pool: Any) -> _MemberSql:
        """Check the table and columns exist and build the statements for their types."""
        table, session_col, user_col, joined_col = self._names
        t, s, u, j = self._quoted
        found = {r["attname"]: r for r in await pool.fetch(_COLUMNS, t)}
        if not found:
            path = await pool.fetchval("SELECT current_setting('search_path')")
            raise MemberTableError(
                f"member table {t} not found (or has no columns) on search_path {path!r}"
            )
        missing = [c for c in (session_col, user_col, joined_col) if c not in found]
        if missing:
            raise MemberTableError(
                f"member table {t} has no column {', '.join(map(repr, missing))}"
                f" (it has {', '.join(map(repr, found))})"
            )
        session_type, user_type = found[session_col]["type"], found[user_col]["type"]
        joined = found[joined_col]
        if joined["category"] == "N":  # integer ms, as our own table keeps it
            joined_in, joined_out = "$3::bigint", f"{j}::bigint"
        elif joined["category"] == "D":
            joined_in = "to_timestamp($3::bigint / 1000.0)"
            joined_out = f"(extract(epoch FROM {j}) * 1000)::bigint"
        else:
            raise MemberTableError(
                f"member table {t}: column {joined_col!r} is {joined['type']},"
                " not a number of ms or a timestamp"
            )
        # The parameter is cast to the column's own type (not the column to text), so the
        # comparison is the column's operator and an index on it still serves.
        session = f"{s} = $1::text::{session_type}"
        after = f"$2::text::{user_type}"
        # Keyset and ORDER BY on the same expressions: the user column in its type's and
        # collation's order, then its text in bytes, for values that order says are equal
        # (a case-insensitive collation, citext) yet are different users.
        order = f'{u}, {u}::text COLLATE "C"'
        return _MemberSql(
            first_page=f"SELECT {u}::text AS m FROM {t} WHERE {session} AND {u} IS NOT NULL"
            f" ORDER BY {order} LIMIT $2",
            next_page=f"SELECT {u}::text AS m FROM {t} WHERE {session} AND {u} >= {after}"
            f' AND ({u} > {after} OR {u}::text COLLATE "C" > $2::text COLLATE "C")'
            f" ORDER BY {order} LIMIT $3",
            count=f"SELECT count(*) FROM {t} WHERE {session} AND {u} IS NOT NULL",
            session_check=f"SELECT $1::text::{session_type}",
            add=f"INSERT INTO {t} ({s}, {u}, {j})"
            f" SELECT $1::text::{session_type}, m::{user_type}, {joined_in}"
            " FROM unnest($2::text[]) AS x(m) ON CONFLICT DO NOTHING",
            remove=f"DELETE FROM {t} WHERE {session} AND {u} = ANY($2::text[]::{user_type}[])",
            sessions_of=f"SELECT {s}::text AS s, {joined_out} AS j FROM {t}"
            f" WHERE {u} = $1::text::{user_type}",
            session_column=f"{table}.{session_col} ({session_type})",
        )

    async def _fetch(self, pool: Any, sql: _MemberSql, query: str, *args: Any) -> list[Any]:
        try:
            return list(await pool.fetch(query, *args))
        except asyncpg.DataError:
            # The session id may not be a value of the session column's type (a number
            # column, a text id): that group cannot exist there, which we report loudly.
            try:
                await pool.fetchval(sql.session_check, args[0])
            except asyncpg.DataError as invalid:
                raise UnpageableGroup(
                    "member_session_id_invalid",
                    f"session id {args[0]!r} is not a value of {sql.session_column}: {invalid}",
                ) from invalid
            raise

    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        """Keyset page in the user column's order: members inserted ahead of the cursor are
        reached, those inserted behind it are not, deleted ones never make us skip anyone."""
        if count < 1:
            raise ValueError(f"count must be positive, not {count}")
        pool, sql = await self._statements()
        # One row more than asked says whether another page follows.
        if not after:
            rows = await self._fetch(pool, sql, sql.first_page, session_id, count + 1)
        else:
            # A cursor without our prefix was saved by the code before this one: the bare
            # name of the last member read.
            last = after[3:] if after.startswith("pg:") else after
            rows = await self._fetch(pool, sql, sql.next_page, session_id, last, count + 1)
        members = [r["m"] for r in rows[:count]]
        # Prefixed, so that an empty name is a cursor too and not "from the start".
        return members, (f"pg:{members[-1]}" if len(rows) > count else None)

    async def count(self, session_id: str) -> int:
        pool, sql = await self._statements()
        rows = await self._fetch(pool, sql, sql.count, session_id)
        return int(rows[0][0])

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None:
        pool, sql = await self._statements()
        await pool.execute(
            sql.add,
            session_id,
            list(users),
            joined_at_ms if joined_at_ms is not None else now_ms(),
        )

    async def remove(self, session_id: str, users: Sequence[str]) -> None:
        pool, sql = await self._statements()
        await pool.execute(sql.remove, session_id, list(users))

    async def sessions_of(self, user: str) -> dict[str, int]:
        pool, sql = await self._statements()
        try:
            rows = await pool.fetch(sql.sessions_of, user)
        except asyncpg.DataError:
            return {}  # not a value of the user column's type: in no group
        return {r["s"]: int(r["j"]) for r in rows}

    async def close(self) -> None:
        await self._pool.close()
