"""The member store: who is in a group session, read a page at a time, never whole.

The platform's group service writes the members, not us (DESIGN.md section 3), so the
Redis store pages the layout it finds at `group:{<session_id>}:members`:
- a sorted set with any scores (join times in ms, all 0, repeated, negative, -inf/+inf,
  fractional): pages come in Redis's own order, by score, then member bytes. The cursor
  is the last (score, member) read, so members joining or leaving elsewhere never shift
  the rest of the list (a rank cursor would skip someone);
- a plain set (SADD): paged with SSCAN, in no particular order;
- no key at all: an empty group.
Any other type (string, hash, list, stream...) is refused with UnpageableGroup: reading
it as a group would deliver to the wrong people or to nobody, silently.

`member:{<user>}:groups` is our own sorted set, session_id -> join time (ms): the reverse
index the inbox view uses to find a user's read-diffusion timelines.

Cursors are opaque plain strings (saved in a changelogged table and handed back by a
fresh process): "" is the start, `zset:<score>:<member>` and `set:<sscan cursor>` resume.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Protocol

from resonance_task.errors import PoisonError
from resonance_task.stores.redis_client import connect

# Large enough to keep round trips few, small enough that no single command stalls Redis.
_WRITE_CHUNK = 5_000


class UnpageableGroup(PoisonError, ValueError):
    """A group whose member store we cannot page; `reason` is a short machine code."""


class MemberStore(Protocol):
    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        """Up to `count` members after the opaque cursor `after` ("" from the start), and
        the cursor of the next page (None when none is left). Raises UnpageableGroup."""

    async def count(self, session_id: str) -> int:
        """How many members the group has now. Raises UnpageableGroup."""

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None: ...

    async def remove(self, session_id: str, users: Sequence[str]) -> None: ...

    async def sessions_of(self, user: str) -> dict[str, int]:
        """The group sessions `user` is in, with the time (ms) the user joined each."""

    async def close(self) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


def _members_key(session_id: str) -> str:
    return f"group:{{{session_id}}}:members"


def _groups_key(user: str) -> str:
    return f"member:{{{user}}}:groups"


# One page of `group:{g}:members`, whatever its type, atomically. KEYS[1] is the key;
# ARGV: count, the cursor's layout ("" start, "z" sorted set, "s" set) and its parts (z:
# score string, member; s: SSCAN cursor). Replies {layout, ...}: {"zset", more (1/0),
# {member, score, ...}}, {"set", next SSCAN cursor, {member, ...}}, {"none"} or
# {"wrongtype", type}. A cursor of the other layout (the key was replaced by one of the
# other type) starts that layout from its beginning.
# Scores stay Redis's own strings: a Lua number prints with 14 digits, which would merge
# neighbouring doubles. Member order is compared byte by byte here because Lua's `<` on
# strings is strcoll, and Redis sets the locale from the environment; Redis orders
# members of equal score with memcmp.
_PAGE = """
local key, count, layout = KEYS[1], tonumber(ARGV[1]), ARGV[2]
local function sorts_after(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
local kind = redis.call('TYPE', key)['ok']
if kind == 'none' then return {'none'} end
if kind == 'set' then
  local from = '0'
  if layout == 's' then from = ARGV[3] end
  local scanned = redis.call('SSCAN', key, from, 'COUNT', count)
  return {'set', scanned[1], scanned[2]}
end
if kind ~= 'zset' then return {'wrongtype', kind} end
local start = 0
if layout == 'z' then
  local score, member = ARGV[3], ARGV[4]
  if redis.call('ZSCORE', key, member) == score then
    start = redis.call('ZRANK', key, member) + 1
  else
    -- The cursor's member left or moved: the first element after (score, member) is
    -- among the ranks holding that score, in member order, or right after them.
    local lo = redis.call('ZCOUNT', key, '-inf', '(' .. score)
    local hi = lo + redis.call('ZCOUNT', key, score, score)
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if sorts_after(redis.call('ZRANGE', key, mid, mid)[1], member) then
        hi = mid
      else
        lo = mid + 1
      end
    end
    start = lo
  end
end
local rows = redis.call('ZRANGE', key, start, start + count - 1, 'WITHSCORES')
local more = 0
if start + count < redis.call('ZCARD', key) then more = 1 end
return {'zset', more, rows}
"""

_COUNT = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'zset' then return {kind, redis.call('ZCARD', KEYS[1])} end
if kind == 'set' then return {kind, redis.call('SCARD', KEYS[1])} end
return {kind, 0}
"""

# What Redis prints for a score (%.17g, or "inf"/"-inf"), and what its ZCOUNT parses back.
_SCORE = re.compile(r"[+-]?(?:inf|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_SSCAN_CURSOR = re.compile(r"\d+")


def _decode_cursor(cursor: str) -> tuple[str, str, str]:
    """The cursor's layout ("" start, "z", "s") and its two parts."""
    if not cursor:
        return "", "", ""
    if cursor.startswith("zset:"):
        score, sep, member = cursor[5:].partition(":")
        if sep and _SCORE.fullmatch(score):
            return "z", score, member
    elif cursor.startswith("set:") and _SSCAN_CURSOR.fullmatch(cursor[4:]):
        return "s", cursor[4:], ""
    # Not ours: a cursor saved by the code before this one, the bare name of the last
    # member read from a set whose scores were all 0 (paged BYLEX). A member whose name
    # itself looks like one of our cursors would be misread; only jobs in flight across
    # that upgrade carry such cursors.
    return "z", "0", cursor


def _wrong_type(key: str, kind: str) -> UnpageableGroup:
    return UnpageableGroup(
        "member_store_wrong_type",
        f"{key} is a Redis {kind}: a group's members must be a sorted set or a set",
    )


class RedisMemberStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._redis = connect(url, timeout=timeout, decode_responses=True)
        # redis-py's scripts: EVALSHA, and the source loaded again if Redis forgot it.
        self._page = self._redis.register_script(_PAGE)
        self._count = self._redis.register_script(_COUNT)

    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        """One page, read atomically; the cursor resumes after the last element read.

        Sorted set: members who leave never make the reader skip one who stays; members
        who join behind the cursor are not reached for this message, those who join ahead
        of it are; a member whose score changes meanwhile may be missed or reached twice.
        Set: SSCAN may return a member twice if the set is rehashed between pages, and
        COUNT is a hint: a page may hold more than `count` (a small set comes whole), or
        none while the cursor is not None.
        """
        if count < 1:
            raise ValueError(f"count must be positive, not {count}")
        key = _members_key(session_id)
        layout, first, second = _decode_cursor(after)
        reply = await self._page(keys=[key], args=[count, layout, first, second])
        kind = reply[0]
        if kind == "none":
            return [], None
        if kind == "set":
            members = [str(m) for m in reply[2]]
            return members, (None if reply[1] == "0" else f"set:{reply[1]}")
        if kind == "zset":
            rows = reply[2]
            members = [str(m) for m in rows[0::2]]
            more = bool(reply[1]) and bool(rows)
            return members, (f"zset:{rows[-1]}:{rows[-2]}" if more else None)
        raise _wrong_type(key, str(reply[1]))

    async def count(self, session_id: str) -> int:
        key = _members_key(session_id)
        kind, size = await self._count(keys=[key])
        if kind not in ("zset", "set", "none"):
            raise _wrong_type(key, str(kind))
        return int(size)

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None:
        """Join `users` as the platform's group service does: score = join time (ms)."""
        joined = joined_at_ms if joined_at_ms is not None else now_ms()
        key = _members_key(session_id)
        for start in range(0, len(users), _WRITE_CHUNK):
            chunk = users[start : start + _WRITE_CHUNK]
            # Not one transaction: the two keys live in different cluster slots. The group
            # set is written last, so a reader never pages a member lacking its index entry.
            pipe = self._redis.pipeline(transaction=False)
            for user in chunk:
                pipe.zadd(_groups_key(user), {session_id: joined}, nx=True)
            # NX: joining again keeps the first join time, as it keeps the index entry's.
            pipe.zadd(key, dict.fromkeys(chunk, joined), nx=True)
            await pipe.execute()

    async def remove(self, session_id: str, users: Sequence[str]) -> None:
        key = _members_key(session_id)
        for start in range(0, len(users), _WRITE_CHUNK):
            chunk = users[start : start + _WRITE_CHUNK]
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrem(key, *chunk)
            for user in chunk:
                pipe.zrem(_groups_key(user), session_id)
            await pipe.execute()

    async def sessions_of(self, user: str) -> dict[str, int]:
        rows = await self._redis.zrange(_groups_key(user), 0, -1, withscores=True)
        return {str(s): int(joined) for s, joined in rows}  # type: ignore[str-unpack]

    async def close(self) -> None:
        await self._redis.aclose()
