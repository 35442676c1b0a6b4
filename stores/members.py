"""The member store: who is in a group session, read a page at a time, never whole.

Pages are keyset pages: members in name order, the cursor is the last name read. A
reader can stop after any page and resume after that name, and members who join or
leave meanwhile never shift the rest of the list (a rank cursor would skip someone).

Redis layout (DESIGN.md section 3):
- `group:{<session_id>}:members`: sorted set, every score 0, so ZRANGE BYLEX pages it
  in name order;
- `member:{<user>}:groups`: sorted set, session_id -> join time (ms), the reverse index
  the inbox view uses to find a user's read-diffusion timelines.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis

# Large enough to keep round trips few, small enough that no single command stalls Redis.
_WRITE_CHUNK = 5_000


class MemberStore(Protocol):
    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        """Up to `count` members whose names sort after `after` ("" from the start), in
        name order, and the cursor for the next page (None when this one is the last)."""

    async def count(self, session_id: str) -> int: ...

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


class RedisMemberStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )

    async def page(self, session_id: str, after: str, count: int) -> tuple[list[str], str | None]:
        members: list[str] = await self._redis.zrange(  # type: ignore[assignment]
            _members_key(session_id),
            f"({after}" if after else "-",
            "+",
            bylex=True,
            offset=0,
            num=count,
        )
        return members, (members[-1] if len(members) == count else None)

    async def count(self, session_id: str) -> int:
        return int(await self._redis.zcard(_members_key(session_id)))

    async def add(
        self, session_id: str, users: Sequence[str], joined_at_ms: int | None = None
    ) -> None:
        joined = joined_at_ms if joined_at_ms is not None else now_ms()
        key = _members_key(session_id)
        for start in range(0, len(users), _WRITE_CHUNK):
            chunk = users[start : start + _WRITE_CHUNK]
            # Not one transaction: the two keys live in different cluster slots. The group
            # set is written last, so a reader never pages a member lacking its index entry.
            pipe = self._redis.pipeline(transaction=False)
            for user in chunk:
                pipe.zadd(_groups_key(user), {session_id: joined}, nx=True)
            pipe.zadd(key, dict.fromkeys(chunk, 0))
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
