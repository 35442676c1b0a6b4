"""Inbox archive: a Redis inbox's oldest entries moved to PostgreSQL, and still read.

Redis holds what clients sync, so it should hold what they still sync: an inbox keeps
its newest INBOX_ARCHIVE_KEEP_ENTRIES entries, and entries younger than
INBOX_ARCHIVE_AFTER_SECONDS; the `inbox_archive` task moves the rest, oldest first, to
PostgreSQL's `t_inbox` / `t_message_body` (stores/postgres.py's schema, with the Redis
cursors as `inbox_cursor`, so the archive is the same delta-sync table a PostgreSQL
inbox uses). INBOX_MAX_ENTRIES stays the hard ceiling between runs: what passes it is
trimmed as without an archive.

A move is a prefix of the inbox in cursor order, so everything archived has a lower
cursor than everything left in Redis, and `inbox:{u}:archived` (the highest archived
cursor) tells a read whether PostgreSQL has any of the entries it asks for. Rows are
committed to PostgreSQL before they leave Redis, and only those found there afterwards
leave: a crash between the two leaves an entry in both (a read shows it once), never in
neither. An archived msg_id raises the inbox's trim watermark, so a replay of its event
cannot add it back under a new cursor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.inbox import InboxEntry, RedisInboxStore, WriteResult
from resonance_task.stores.postgres import INBOX_SCHEMA, _Pool, insert_entries, read_entries

log = logging.getLogger(__name__)

# KEYS: inbox, trim, archived; ARGV: the highest cursor moved, then the msg_ids moved.
# msg_ids compare as decimal strings (Snowflake ids exceed a Lua double's 2^53).
_REMOVE = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local trim = redis.call('GET', KEYS[2])
local removed = 0
for j = 2, #ARGV do
  removed = removed + redis.call('ZREM', KEYS[1], ARGV[j])
  if not trim or newer(ARGV[j], trim) then trim = ARGV[j] end
end
if trim then redis.call('SET', KEYS[2], trim) end
local top = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[1]) > top then redis.call('SET', KEYS[3], ARGV[1]) end
return removed
"""

_SCAN_COUNT = 1000
_WALK = 500  # entries read a round trip while walking an inbox's archivable prefix
_ROWS_PER_COMMIT = 2000


@dataclass
class _Move:
    user: str
    entries: list[tuple[int, int, bytes | None]] = field(default_factory=list)  # cursor, id, body


@dataclass
class ArchiveRun:
    """What one pass did; the task's result."""

    inboxes_scanned: int = 0
    inboxes_archived: int = 0
    entries_moved: int = 0
    entries_without_body: int = 0  # their body had expired: archived as a place holder
    conflicts: int = 0  # PostgreSQL holds another msg_id at that cursor: left in Redis
    cancelled: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Progress = Callable[[float, str], Awaitable[None]]


class InboxArchive:
    def __init__(
        self,
        inbox: RedisInboxStore,
        dsn: str,
        *,
        keep_entries: int,
        after_seconds: float,
        search_path: str | None = None,
        pool_size: int = 2,
    ) -> None:
        if keep_entries <= 0 and after_seconds <= 0:
            raise ValueError("an archive needs keep_entries or after_seconds")
        self._inbox = inbox
        client = inbox.client
        if not isinstance(client, aioredis.Redis):
            # Its pass SCANs one server's keyspace; on a cluster it would see one node's.
            raise ValueError("the inbox archive needs a single Redis, not a Redis Cluster")
        self._redis = client
        self._pool = _Pool(dsn, INBOX_SCHEMA, search_path, pool_size)
        self._keep = keep_entries
        self._after_ms = int(after_seconds * 1000)
        self._remove = self._redis.register_script(_REMOVE)  # reloaded if Redis lost it

    def archived_key(self, user: str) -> str:
        return self._inbox.key(user) + ":archived"

    async def run(
        self,
        users: Sequence[str] | None = None,
        *,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> ArchiveRun:
        """One pass over `users`, or over every inbox (SCAN: a page of keys at a time)."""
        result = ArchiveRun()
        horizon = int(time.time() * 1000) - self._after_ms if self._after_ms else None
        if users is not None:
            pages: Any = _pages_of(list(users))
            total = len(users)
        else:
            pages = self._scan_pages()
            total = max(1, int(await self._redis.dbsize()) // 3)  # ~3 keys an inbox
        pending: list[_Move] = []
        async for page in pages:
            if cancelled():
                result.cancelled = True
                break
            result.inboxes_scanned += len(page)
            pending += await self._moves(page, horizon)
            if sum(len(m.entries) for m in pending) >= _ROWS_PER_COMMIT:
                await self._commit(pending, result)
                pending = []
            if progress is not None:
                done = min(99.0, 100.0 * result.inboxes_scanned / total)
                await progress(done, f"{result.inboxes_scanned} inboxes scanned")
        if pending:
            await self._commit(pending, result)
        return result

    async def _scan_pages(self) -> Any:
        cursor: int = 0
        match = self._inbox.key("*")  # `inbox:{*}`: the sorted sets, not their :seq etc.
        prefix, suffix = match.split("*")
        while True:
            cursor, keys = await self._redis.scan(
                cursor, match=match, count=_SCAN_COUNT, _type="zset"
            )
            names = [k.decode() if isinstance(k, bytes) else k for k in keys]
            users = [name[len(prefix) : -len(suffix)] for name in names]
            if users:
                yield users
            if cursor == 0:
                return

    async def _moves(self, users: list[str], horizon: int | None) -> list[_Move]:
        """Each user's archivable prefix: beyond the newest `keep`, or older than the
        horizon (an entry whose body has expired is older than any horizon)."""
        # A page of inboxes is sized and its oldest entries read in two round trips; only
        # an inbox with something to move is walked on its own. Most have nothing.
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.zcard(self._inbox.key(user))
            pipe.zrange(self._inbox.key(user), 0, 0)
        replies = await pipe.execute()
        cards, oldest = replies[0::2], replies[1::2]
        excess = {
            user: max(0, int(card) - self._keep) if self._keep > 0 else 0
            for user, card in zip(users, cards, strict=True)
        }
        walk = [user for user in users if excess[user] > 0]
        if horizon is not None:
            maybe = [(u, int(first[0])) for u, first in zip(users, oldest, strict=True) if first]
            maybe = [(u, msg_id) for u, msg_id in maybe if excess[u] == 0]
            bodies = await self._inbox.bodies([msg_id for _, msg_id in maybe])
            walk += [
                user
                for (user, _), body in zip(maybe, bodies, strict=True)
                if body is None or _timestamp(body) < horizon
            ]
        moves = []
        for user in walk:
            move = await self._walk(user, excess[user], horizon)
            if move.entries:
                moves.append(move)
        return moves

    async def _walk(self, user: str, excess: int, horizon: int | None) -> _Move:
        move = _Move(user)
        key, seen, low = self._inbox.key(user), 0, "-inf"
        while True:
            # By cursor, not by rank: the cap trims the head meanwhile, and ranks would
            # then skip entries between two reads.
            rows = cast(
                list[tuple[bytes, float]],
                await self._redis.zrange(
                    key, low, "+inf", byscore=True, offset=0, num=_WALK, withscores=True
                ),
            )
            if not rows:
                return move
            bodies = await self._inbox.bodies([int(member) for member, _ in rows])
            for (member, score), body in zip(rows, bodies, strict=True):
                old = body is None or (horizon is not None and _timestamp(body) < horizon)
                if seen >= excess and not old:
                    return move
                move.entries.append((int(score), int(member), body))
                seen += 1
            if len(rows) < _WALK:
                return move
            low = f"({int(rows[-1][1])}"

    async def _commit(self, moves: list[_Move], result: ArchiveRun) -> None:
        rows: list[tuple[str, str, int, int, int]] = []
        bodies: dict[int, bytes] = {}
        for move in moves:
            for cursor, msg_id, body in move.entries:
                message = _message(body)
                if message is None:
                    # No session or seq to file it under: a place unique per owner keeps
                    # the cursor (a sync sees the entry, bodiless, as Redis showed it).
                    rows.append((move.user, "", msg_id, -cursor, cursor))
                    result.entries_without_body += 1
                    continue
                assert body is not None
                bodies[msg_id] = body
                rows.append((move.user, message.session_id, msg_id, message.seq_id, cursor))
        pool = await self._pool.get()
        async with pool.acquire() as conn, conn.transaction():
            await insert_entries(conn, bodies, rows)
            held = await conn.fetch(
                "SELECT owner_username, msg_id, inbox_cursor FROM t_inbox"
                " WHERE (owner_username, msg_id) IN"
                " (SELECT * FROM unnest($1::text[], $2::bigint[]))",
                [row[0] for row in rows],
                [row[2] for row in rows],
            )
        archived = {(r["owner_username"], r["msg_id"], r["inbox_cursor"]) for r in held}
        pipe = self._redis.pipeline(transaction=False)
        for move in moves:
            safe = [(c, m) for c, m, _ in move.entries if (move.user, m, c) in archived]
            result.conflicts += len(move.entries) - len(safe)
            if not safe:
                continue
            key = self._inbox.key(move.user)
            keys = (key, key + ":trim", key + ":archived")
            top = max(c for c, _ in safe)
            await self._remove(keys=list(keys), args=[top, *(m for _, m in safe)], client=pipe)
            result.entries_moved += len(safe)
            result.inboxes_archived += 1
        await pipe.execute()
        if result.conflicts:
            log.warning(
                "inbox archive: %d entries left in Redis: PostgreSQL holds another message at"
                " their cursor (was this inbox's Redis reset?)",
                result.conflicts,
            )

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        return await read_entries(await self._pool.get(), user, after, limit)

    async def close(self) -> None:
        await self._pool.close()


class ArchivedInboxStore:
    """The Redis inbox, with what its archive moved read back from PostgreSQL."""

    def __init__(self, inbox: RedisInboxStore, archive: InboxArchive) -> None:
        self.redis = inbox
        self.archive = archive

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        return await self.redis.write(batch)

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        # `archived` and the Redis page in one snapshot: the archiver commits rows to
        # PostgreSQL before one script removes them from Redis and raises `archived`, so
        # at that instant every cursor up to `archived` is in PostgreSQL and every later
        # one is in the page (or beyond it). Read apart, a move between the two reads
        # would hide its entries from both.
        from_redis, raw_top = await self.redis.page(
            user, after, limit, also=self.archive.archived_key(user)
        )
        top = int(raw_top or 0)
        until = from_redis[-1].cursor if len(from_redis) >= limit else None  # page full
        from_pg: list[InboxEntry] = []
        if after < top:
            archived = await self.archive.read(user, after, limit)
            if len(archived) >= limit and archived[-1].cursor <= top:
                until = min(until or top, archived[-1].cursor)
            from_pg = [e for e in archived if e.cursor <= top]
        # A cursor in both (caught between commit and removal, or held by PostgreSQL for
        # another message): Redis, the live copy, wins.
        merged = {e.cursor: e for e in from_pg} | {e.cursor: e for e in from_redis}
        return [merged[cursor] for cursor in sorted(merged) if until is None or cursor <= until][
            :limit
        ]

    async def last_cursor(self, user: str) -> int:
        return await self.redis.last_cursor(user)

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        return await self.redis.last_cursors(users)

    async def close(self) -> None:
        await self.redis.close()
        await self.archive.close()


async def _pages_of(users: list[str]) -> Any:
    for start in range(0, len(users), _SCAN_COUNT):
        yield users[start : start + _SCAN_COUNT]


def _message(body: bytes | None) -> PushMessage | None:
    if body is None:
        return None
    try:
        return PushMessage.FromString(body)
    except DecodeError:
        return None


def _timestamp(body: bytes) -> int:
    message = _message(body)
    return message.timestamp if message is not None else 0
