"""The inbox store: every recipient's copy of a message, with a per-user cursor.

Redis layout (DESIGN.md section 3); one user's keys share the hash tag `{user}` so a
Redis Cluster keeps them on one slot and the write script may touch them together:
- `msg:{<msg_id>}`: the PushMessage bytes, once per message, with a TTL;
- `inbox:{<user>}`: sorted set, score = the user's cursor 1, 2, 3..., member = msg_id;
- `inbox:{<user>}:seq`: the user's last cursor;
- `inbox:{<user>}:trim`: the highest msg_id trimmed away by the cap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from proto.resonance.gateway.v1.gateway_pb2 import PushMessage


@dataclass(frozen=True)
class InboxEntry:
    cursor: int
    msg_id: int
    message: PushMessage | None  # None once the body's TTL has passed


@dataclass(frozen=True)
class WriteResult:
    new: int
    duplicate: int


class InboxStore(Protocol):
    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        """Give every listed user the message once; idempotent by (user, msg_id)."""

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        """Entries with cursor > after, in cursor order."""

    async def last_cursor(self, user: str) -> int: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


# Idempotent append of one msg_id to the inboxes of several users; for each user returns
# its cursor and 1 if new, 0 if the msg_id was already there. KEYS come in threes per user
# (inbox, seq, trim), all of one user's hash tag.
# msg_ids are compared as decimal strings: Snowflake ids exceed a Lua double's 2^53.
# A msg_id at or below the trim watermark was in this inbox and was trimmed by the cap,
# so a replay of it must not come back with a new cursor.
_APPEND = """
local msg_id = ARGV[1]
local cap = tonumber(ARGV[2])
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local out = {}
for i = 1, #KEYS, 3 do
  local inbox, seq, trimkey = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local existing = redis.call('ZSCORE', inbox, msg_id)
  local trim = redis.call('GET', trimkey)
  if existing then
    out[#out + 1] = tonumber(existing); out[#out + 1] = 0
  elseif trim and not newer(msg_id, trim) then
    out[#out + 1] = 0; out[#out + 1] = 0
  else
    local cursor = redis.call('INCR', seq)
    redis.call('ZADD', inbox, cursor, msg_id)
    if cap > 0 then
      local excess = redis.call('ZCARD', inbox) - cap
      if excess > 0 then
        local gone = redis.call('ZRANGE', inbox, 0, excess - 1)
        for _, id in ipairs(gone) do
          if not trim or newer(id, trim) then trim = id end
        end
        redis.call('SET', trimkey, trim)
        redis.call('ZREMRANGEBYRANK', inbox, 0, excess - 1)
      end
    end
    out[#out + 1] = cursor; out[#out + 1] = 1
  end
end
return out
"""


def _inbox_key(user: str) -> str:
    return f"inbox:{{{user}}}"


def _body_key(msg_id: int) -> str:
    return f"msg:{{{msg_id}}}"


class RedisInboxStore:
    def __init__(
        self,
        url: str,
        *,
        max_entries: int,
        message_ttl: int,
        timeout: float = 2.0,
        keys_per_call: int = 256,
        cluster: bool = False,
    ) -> None:
        self._redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._append = self._redis.register_script(_APPEND)
        self._max_entries = max_entries
        self._ttl = message_ttl
        self._users_per_call = keys_per_call
        self._cluster = cluster

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        pipe = self._redis.pipeline(transaction=False)
        bodies_written: set[int] = set()
        appends = 0
        for message, users in batch:
            if message.msg_id not in bodies_written:
                bodies_written.add(message.msg_id)
                pipe.set(
                    _body_key(message.msg_id), message.SerializeToString(), ex=self._ttl, nx=True
                )
            for group in self._call_groups(users):
                keys: list[str] = []
                for user in group:
                    inbox = _inbox_key(user)
                    keys += (inbox, inbox + ":seq", inbox + ":trim")
                await self._append(keys=keys, args=[message.msg_id, self._max_entries], client=pipe)
                appends += len(group)
        results = await pipe.execute()
        new = sum(sum(r[1::2]) for r in results if isinstance(r, list))
        return WriteResult(new=new, duplicate=appends - new)

    def _call_groups(self, users: Sequence[str]) -> list[Sequence[str]]:
        """Users whose appends can share one script call.

        One call per user is the Redis Cluster-safe form (a script's keys must share a
        slot, and each user is its own hash tag); a single Redis takes many users a call,
        which saves most of the per-command cost on both sides.
        """
        if self._cluster:
            return [(user,) for user in users]
        step = self._users_per_call
        return [users[i : i + step] for i in range(0, len(users), step)]

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        rows = await self._redis.zrange(
            _inbox_key(user),
            f"({after}",
            "+inf",
            byscore=True,
            offset=0,
            num=limit,
            withscores=True,
        )
        if not rows:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for member, _ in rows:  # type: ignore[str-unpack]
            pipe.get(_body_key(int(member)))
        bodies = await pipe.execute()
        entries = []
        for (member, score), body in zip(rows, bodies, strict=True):  # type: ignore[str-unpack]
            message = PushMessage.FromString(body) if body is not None else None
            entries.append(InboxEntry(cursor=int(score), msg_id=int(member), message=message))
        return entries

    async def last_cursor(self, user: str) -> int:
        value = await self._redis.get(_inbox_key(user) + ":seq")
        return int(value or 0)

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
