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
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

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

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        """Each user's last cursor (0: never written), in one round trip."""

    async def close(self) -> None: ...


# Idempotent appends to users' inboxes, many (user, msg_id) pairs a call. KEYS come in
# threes per pair (inbox, seq, trim: one user's hash tag); ARGV[1] is the cap and ARGV[j+1]
# the msg_id of pair j. Pairs run in order, so a user's messages keep their batch order.
# Returns, per pair, its cursor and 1 if new, 0 if the msg_id was already there.
# msg_ids are compared as decimal strings: Snowflake ids exceed a Lua double's 2^53.
# A msg_id at or below the trim watermark was in this inbox and was trimmed by the cap,
# so a replay of it must not come back with a new cursor.
_APPEND = """
local cap = tonumber(ARGV[1])
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
local out = {}
for j = 1, #ARGV - 1 do
  local msg_id = ARGV[j + 1]
  local inbox, seq, trimkey = KEYS[3 * j - 2], KEYS[3 * j - 1], KEYS[3 * j]
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
        pairs_per_call: int = 256,
        cluster: bool = False,
        key_prefix: str = "inbox",
    ) -> None:
        self._redis = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._sha: str | None = None
        self._max_entries = max_entries
        self._ttl = message_ttl
        # One call per pair is the Redis Cluster-safe form (a script's keys must share a
        # slot, and each user is its own hash tag); a single Redis takes many pairs a call,
        # which saves most of the per-command cost on both sides.
        self._pairs_per_call = pairs_per_call
        self._cluster = cluster
        self._prefix = key_prefix

    def _key(self, owner: str) -> str:
        return f"{self._prefix}:{{{owner}}}"

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        bodies: dict[int, bytes] = {}
        pairs: list[tuple[str, int]] = []
        for message, users in batch:
            if message.msg_id not in bodies:
                bodies[message.msg_id] = message.SerializeToString()
            pairs.extend((user, message.msg_id) for user in users)
        try:
            results = await self._execute(bodies, pairs)
        except NoScriptError:
            # Redis restarted or flushed its scripts: load it again and redo the whole
            # batch, which is safe because every append is idempotent.
            self._sha = None
            results = await self._execute(bodies, pairs)
        new = sum(sum(r[1::2]) for r in results if isinstance(r, list))
        return WriteResult(new=new, duplicate=len(pairs) - new)

    async def _execute(self, bodies: dict[int, bytes], pairs: list[tuple[str, int]]) -> list[Any]:
        if self._sha is None:
            self._sha = str(await self._redis.script_load(_APPEND))
        pipe = self._redis.pipeline(transaction=False)
        for msg_id, body in bodies.items():
            pipe.set(_body_key(msg_id), body, ex=self._ttl, nx=True)
        step = 1 if self._cluster else self._pairs_per_call
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            keys: list[str] = []
            for user, _ in chunk:
                inbox = self._key(user)
                keys += (inbox, inbox + ":seq", inbox + ":trim")
            pipe.evalsha(self._sha, len(keys), *keys, self._max_entries, *(m for _, m in chunk))
        return list(await pipe.execute())

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        rows = await self._redis.zrange(
            self._key(user),
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
        value = await self._redis.get(self._key(user) + ":seq")
        return int(value or 0)

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.get(self._key(user) + ":seq")
        return {u: int(v or 0) for u, v in zip(users, await pipe.execute(), strict=True)}

    async def close(self) -> None:
        await self._redis.aclose()
