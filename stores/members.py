"""The member store: who is in a group session, read a page at a time, never whole.

Redis layout: `group:{<session_id>}:members`, a sorted set (score = join time in ms),
paged by rank. The cursor is the rank of the next member, so a reader can stop after
any page and resume there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis


class MemberStore(Protocol):
    async def page(self, session_id: str, cursor: int, count: int) -> tuple[list[str], int | None]:
        """Up to `count` members from `cursor` on, and the next cursor (None at the end)."""

    async def count(self, session_id: str) -> int: ...

    async def add(self, session_id: str, users: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


def _members_key(session_id: str) -> str:
    return f"group:{{{session_id}}}:members"


class RedisMemberStore:
    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        )

    async def page(self, session_id: str, cursor: int, count: int) -> tuple[list[str], int | None]:
        members: list[str] = await self._redis.zrange(  # type: ignore[assignment]
            _members_key(session_id), cursor, cursor + count - 1
        )
        next_cursor = cursor + len(members) if len(members) == count else None
        return members, next_cursor

    async def count(self, session_id: str) -> int:
        return int(await self._redis.zcard(_members_key(session_id)))

    async def add(self, session_id: str, users: Sequence[str]) -> None:
        now = int(time.time() * 1000)
        key = _members_key(session_id)
        # Chunked so a 100k-member group is not one giant command.
        for start in range(0, len(users), 10_000):
            chunk = users[start : start + 10_000]
            await self._redis.zadd(key, {user: now for user in chunk})

    async def close(self) -> None:
        await self._redis.aclose()
