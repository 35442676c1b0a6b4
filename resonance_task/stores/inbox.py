"""The inbox store: every recipient's copy of a message, with a per-user cursor.

Redis layout (DESIGN.md section 3); one user's keys share the hash tag `{user}` so a
Redis Cluster keeps them on one slot and the write script may touch them together:
- `msg:{<msg_id>}`: the PushMessage bytes, once per message, with a TTL;
- `inbox:{<user>}`: sorted set, score = the user's cursor 1, 2, 3..., member = msg_id;
- `inbox:{<user>}:seq`: the user's last cursor;
- `inbox:{<user>}:trim`: the highest msg_id trimmed away by the cap.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterDownError, NoScriptError

from resonance_task.proto.resonance.gateway.v1.gateway_pb2 import PushMessage
from resonance_task.stores.redis_client import connect, connect_cluster, is_cluster


@dataclass(frozen=True)
class InboxEntry:
    cursor: int
    msg_id: int
    message: PushMessage | None  # None once the body's TTL has passed


@dataclass(frozen=True)
class Refusal:
    """A (user, message) pair the store will not write, now or on any retry, and why: a
    Redis-style error reply naming the key, e.g. "WRONGTYPE inbox:{u} is a string, not a
    zset". Something else wrote that key; until an operator mends it, retrying is useless."""

    user: str
    msg_id: int
    error: str


@dataclass(frozen=True)
class WriteResult:
    new: int
    duplicate: int
    refused: tuple[Refusal, ...] = ()


class InboxStore(Protocol):
    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        """Give every listed user the message once; idempotent by (user, msg_id).

        A pair refused for good by what is stored (a key of the wrong type) is reported in
        `refused`, and every other pair is written: it is a fact about one recipient, not
        about the call. Anything else that fails is raised.
        """

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        """Entries with cursor > after, in cursor order."""

    async def last_cursor(self, user: str) -> int: ...

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        """Each user's last cursor (0: never written), in one round trip."""

    async def close(self) -> None: ...


# What both scripts share. A key of the wrong type (or a :seq that holds no number) is
# found by the command that first touches it, called through pcall, and each user's keys
# are all touched before that user's first write: the inbox by ZMSCORE/ZSCORE, :trim by
# GET, :seq by INCRBY, itself the first write and atomic. So a refused user is left as it
# was (no cursor taken, nothing added) and the script goes on with the next one; checking
# with TYPE up front would cost a command per key on every call instead. Any other error
# (OOM on the first write) is raised as Redis said it, failing the call as before: it is
# transient, and the whole call is redone.
_REFUSAL = """
local function refusal(reply, key, expected)
  local err = reply.err
  if string.sub(err, 1, 10) == 'WRONGTYPE ' then
    return 'WRONGTYPE ' .. key .. ' is a ' .. redis.call('TYPE', key).ok .. ', not a ' .. expected
  end
  if string.find(err, 'not an integer', 1, true) or string.find(err, 'overflow', 1, true) then
    return 'ERR ' .. key .. ' holds no cursor: ' .. string.sub(err, 5)
  end
  error(reply)
end
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""

# The same appends on a single Redis, a whole batch in one argument: per-argument
# encoding was most of the client's time (one EVALSHA per 256 pairs carried 1,024
# arguments), and grouping by user lets one ZMSCORE, INCRBY and ZADD serve all of a
# user's messages in the call (a group burst gives each user several). ARGV[1] is the
# cap, ARGV[2] the body TTL, ARGV[3] the key prefix, ARGV[4] the batch:
#   u32 messages, then per message: u32 len, msg_id (decimal), u32 len, body (may be empty)
#   u32 users, then per user: u32 len, user, u32 count, count x u32 message number (1-based)
# Keys are built here from the prefix. On a Redis Cluster the calls are made per node,
# with the users of that node only (_APPEND_PACKED_CLUSTER below).
# Returns {new, duplicate, refused}, refused a flat list of (user, msg_id, refusal).
# A body key of the wrong type refuses its message for every user of the call: an entry
# whose body cannot be read would fail every read of that inbox page (GET on a hash), and
# the one dead letter per message brings them all back once the key is mended.
_APPEND_PACKED = (
    _REFUSAL
    + """
local cap, ttl, prefix, data = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local pos = 1
local function u32()
  local n
  n, pos = struct.unpack('>I4', data, pos)
  return n
end
local function str()
  local n = u32()
  local s = string.sub(data, pos, pos + n - 1)
  pos = pos + n
  return s
end
local new, dup, refused = 0, 0, {}
local function refuse(user, ids, why)
  for _, id in ipairs(ids) do
    refused[#refused + 1] = user; refused[#refused + 1] = id; refused[#refused + 1] = why
  end
end
local ids, bad = {}, {}
for i = 1, u32() do
  ids[i] = str()
  local body = str()
  if #body > 0 then
    local key = 'msg:{' .. ids[i] .. '}'
    -- Not set: already there (a replay, or an earlier call of this batch), or not a body.
    if not redis.call('SET', key, body, 'EX', ttl, 'NX') then
      local held = redis.call('TYPE', key).ok
      if held ~= 'string' then
        bad[i] = 'WRONGTYPE ' .. key .. ' is a ' .. held .. ', not a string'
      end
    end
  end
end
-- Returns the ids it could not append and why, or nothing.
local function append(inbox, wanted)
  local scores = redis.pcall('ZMSCORE', inbox, unpack(wanted))
  if scores.err then return wanted, refusal(scores, inbox, 'zset') end
  local missing = {}
  for j, id in ipairs(wanted) do
    if scores[j] then dup = dup + 1 else missing[#missing + 1] = id end
  end
  if #missing == 0 then return end
  local trimkey = inbox .. ':trim'
  local trim = redis.pcall('GET', trimkey)
  if type(trim) == 'table' then return missing, refusal(trim, trimkey, 'string') end
  local fresh = {}
  for _, id in ipairs(missing) do
    if trim and not newer(id, trim) then dup = dup + 1 else fresh[#fresh + 1] = id end
  end
  if #fresh == 0 then return end
  local seqkey = inbox .. ':seq'
  local last = redis.pcall('INCRBY', seqkey, #fresh)
  if type(last) == 'table' then return fresh, refusal(last, seqkey, 'string') end
  local args = {}
  for j, id in ipairs(fresh) do
    args[#args + 1] = last - #fresh + j
    args[#args + 1] = id
  end
  redis.call('ZADD', inbox, unpack(args))
  new = new + #fresh
  -- An inbox holds at most `last` entries (cursors have no gaps): below the cap,
  -- there is nothing to count.
  if cap > 0 and last > cap then
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
end
for _ = 1, u32() do
  local user = str()
  local wanted, seen = {}, {}
  for _ = 1, u32() do
    local n = u32()
    local id = ids[n]
    if seen[id] then
      dup = dup + 1
    elseif bad[n] then
      seen[id] = true
      refuse(user, {id}, bad[n])
    else
      seen[id] = true
      wanted[#wanted + 1] = id
    end
  end
  if #wanted > 0 then
    local lost, why = append(prefix .. ':{' .. user .. '}', wanted)
    if lost then refuse(user, lost, why) end
  end
end
return {new, dup, refused}
"""
)
# Pairs per packed call: bounds how long one call holds Redis (~5 ms), so other clients'
# commands (member pages) interleave; measured, 2,000 made a big group's pushes wait.
# It also bounds one user's entry in a call: the script passes a user's ids to ZMSCORE and
# ZADD through `unpack`, which fails past Lua's C stack (~8,000 values), so a user with
# more messages in a batch gets several entries, in order.
# On a Redis Cluster, the packed script per node: the users of a call are all on that
# node (grouped by the client's slot map), in many slots, which the flag allows; bodies
# are not in it (each `msg:{id}` has a slot of its own, likely another node's): they are
# written first, and the calls carry empty ones, which the script skips.
_APPEND_PACKED_CLUSTER = "#!lua flags=allow-cross-slot-keys\n" + _APPEND_PACKED

# The bodies of a batch on one node of a Redis Cluster, in one call (each `msg:{id}` is
# in a slot of its own): ARGV[1] the TTL, ARGV[2] the bodies as _pack writes messages (no
# users). Returns, flat, the msg_id and type of each body key that holds something else.
_BODIES_CLUSTER = """#!lua flags=allow-cross-slot-keys
local ttl, data = tonumber(ARGV[1]), ARGV[2]
local pos = 1
local function u32()
  local n
  n, pos = struct.unpack('>I4', data, pos)
  return n
end
local function str()
  local n = u32()
  local s = string.sub(data, pos, pos + n - 1)
  pos = pos + n
  return s
end
local bad = {}
for _ = 1, u32() do
  local id = str()
  local key = 'msg:{' .. id .. '}'
  if not redis.call('SET', key, str(), 'EX', ttl, 'NX') then
    local held = redis.call('TYPE', key).ok
    if held ~= 'string' then bad[#bad + 1] = id; bad[#bad + 1] = held end
  end
end
return bad
"""

_PACKED_PAIRS = 500
_CALLS_PER_TRIP = 2
_U32 = struct.Struct(">I")
_ONE_NUMBER = struct.Struct(">II")


def _pack(
    messages: Sequence[tuple[int, bytes]], users: Sequence[tuple[str, Sequence[int]]]
) -> bytes:
    """Messages (msg_id, body) and each user's message numbers (1-based) -> one argument."""
    parts = [_U32.pack(len(messages))]
    for msg_id, body in messages:
        raw = str(msg_id).encode()
        parts += (_U32.pack(len(raw)), raw, _U32.pack(len(body)), body)
    parts.append(_U32.pack(len(users)))
    for user, numbers in users:
        raw = user.encode()
        parts += (_U32.pack(len(raw)), raw)
        if len(numbers) == 1:  # most users of a batch: one message each
            parts.append(_ONE_NUMBER.pack(1, numbers[0]))
        else:
            parts.append(struct.pack(f">{len(numbers) + 1}I", len(numbers), *numbers))
    return b"".join(parts)


def _packed_result(results: list[Any], refused: list[Refusal]) -> WriteResult:
    """What the packed script's calls answered ({new, duplicate, refused}), summed."""
    refused = refused + [
        Refusal(user.decode(), int(msg_id), why.decode())
        for _, _, flat in results
        for user, msg_id, why in zip(flat[::3], flat[1::3], flat[2::3], strict=True)
    ]
    return WriteResult(
        new=sum(int(r[0]) for r in results),
        duplicate=sum(int(r[1]) for r in results),
        refused=tuple(refused),
    )


def _packed_calls(
    batch: Sequence[tuple[PushMessage, Sequence[str]]], *, with_bodies: bool = True
) -> list[bytes]:
    """The batch as calls of about _PACKED_PAIRS pairs, grouped by user.

    Split by user, not by message: a user's messages of the batch go together (one
    ZMSCORE, INCRBY, ZADD for up to _PACKED_PAIRS of them, in batch order; a user with
    more gets several entries, in consecutive calls), and a call stays short, so another
    client's command (a member page, for the next page of a big group) waits for a call
    or two, not for the whole batch.
    """
    bodies: dict[int, bytes] = {}
    by_user: dict[str, list[int]] = {}
    for message, users in batch:
        msg_id = message.msg_id
        if msg_id not in bodies:
            bodies[msg_id] = message.SerializeToString() if with_bodies else b""
        for user in users:
            by_user.setdefault(user, []).append(msg_id)
    calls: list[bytes] = []
    chunk: list[tuple[str, list[int]]] = []
    pairs = 0
    for user, msg_ids in by_user.items():
        for start in range(0, len(msg_ids), _PACKED_PAIRS):
            part = msg_ids[start : start + _PACKED_PAIRS]
            chunk.append((user, part))
            pairs += len(part)
            if pairs >= _PACKED_PAIRS:
                calls.append(_pack_chunk(chunk, bodies))
                chunk, pairs = [], 0
    if chunk:
        calls.append(_pack_chunk(chunk, bodies))
    return calls


def _pack_chunk(chunk: list[tuple[str, list[int]]], bodies: dict[int, bytes]) -> bytes:
    numbers: dict[int, int] = {}  # msg_id -> its number in this call
    users = []
    for user, msg_ids in chunk:
        users.append((user, [numbers.setdefault(m, len(numbers) + 1) for m in msg_ids]))
    return _pack([(m, bodies[m]) for m in numbers], users)


def _body_key(msg_id: int) -> str:
    return f"msg:{{{msg_id}}}"


def _node_of(cluster: RedisCluster, key: str) -> str:
    """The node that holds `key`'s slot, by the client's slot map."""
    found = cluster.get_node_from_key(key)
    if found is None:  # no node for the slot now (a failover): transient, map refreshed
        raise ClusterDownError(f"no node serves {key}'s slot")
    return str(found.name)


class RedisInboxStore:
    def __init__(
        self,
        url: str,
        *,
        max_entries: int,
        message_ttl: int,
        timeout: float = 2.0,
        cluster: bool = False,
        key_prefix: str = "inbox",
    ) -> None:
        # Redis Cluster (a `redis+cluster://` URL, or INBOX_REDIS_CLUSTER with a node's URL):
        # the cluster client; its pipelines go to each node in one round trip.
        cluster = cluster or is_cluster(url)
        self._redis: aioredis.Redis | RedisCluster = (
            connect_cluster(url, timeout=timeout) if cluster else connect(url, timeout=timeout)
        )
        self._packed_sha: str | None = None
        self._cluster_sha: str | None = None
        self._bodies_sha: str | None = None
        self._max_entries = max_entries
        self._ttl = message_ttl
        self._prefix = key_prefix

    @property
    def client(self) -> aioredis.Redis | RedisCluster:
        return self._redis

    def key(self, owner: str) -> str:
        """The owner's inbox sorted set; its :seq, :trim (and :archived) keys append."""
        return f"{self._prefix}:{{{owner}}}"

    async def write(self, batch: Sequence[tuple[PushMessage, Sequence[str]]]) -> WriteResult:
        if isinstance(self._redis, RedisCluster):
            try:
                return await self._write_nodes(self._redis, batch)
            except NoScriptError:
                # A replica promoted since, or a node restarted: scripts are not replicated.
                self._cluster_sha = self._bodies_sha = None  # load, redo, idempotent
                return await self._write_nodes(self._redis, batch)
        return await self._write_packed(batch)

    async def _write_nodes(
        self, cluster: RedisCluster, batch: Sequence[tuple[PushMessage, Sequence[str]]]
    ) -> WriteResult:
        """A batch on a Redis Cluster: the bodies in one pipeline (each in its own slot),
        then per node the packed calls of its users, every node's in one pipeline round
        trip: the payload once per message, never once per recipient."""
        if self._cluster_sha is None or self._bodies_sha is None:
            self._cluster_sha = str(await cluster.script_load(_APPEND_PACKED_CLUSTER))
            self._bodies_sha = str(await cluster.script_load(_BODIES_CLUSTER))
        sha = self._cluster_sha
        bad = await self._write_bodies(cluster, batch, self._bodies_sha)
        refused = [
            Refusal(user, m.msg_id, bad[m.msg_id])
            for m, users in batch
            if m.msg_id in bad
            for user in users
        ]
        by_node: dict[str, list[tuple[PushMessage, list[str]]]] = {}
        routing: dict[str, str] = {}  # node -> a key of it, which routes its calls there
        # Looked up once a user a batch: a group batch names each member in every message.
        user_node: dict[str, str] = {}
        for message, users in batch:
            if message.msg_id in bad:
                continue
            mine: dict[str, list[str]] = {}
            for user in users:
                node = user_node.get(user)
                if node is None:
                    key = self.key(user)
                    node = user_node[user] = _node_of(cluster, key)
                    routing.setdefault(node, key)
                mine.setdefault(node, []).append(user)
            for node, on_node in mine.items():
                by_node.setdefault(node, []).append((message, on_node))
        pipe = cluster.pipeline(transaction=False)
        for node, part in by_node.items():
            for packed in _packed_calls(part, with_bodies=False):
                pipe.execute_command(
                    "EVALSHA",
                    sha,
                    1,
                    routing[node],
                    self._max_entries,
                    self._ttl,
                    self._prefix,
                    packed,
                )
        results = await pipe.execute() if by_node else []
        return _packed_result(results, refused)

    async def _write_bodies(
        self,
        cluster: RedisCluster,
        batch: Sequence[tuple[PushMessage, Sequence[str]]],
        sha: str,
    ) -> dict[int, str]:
        """Every message's body, once, in one call per node: the refusal of each body key
        another writer gave another type, by msg_id. Before any append: an entry whose
        body cannot be read would fail every read of that inbox page."""
        by_node: dict[str, list[tuple[int, bytes]]] = {}
        routing: dict[str, str] = {}
        seen: set[int] = set()
        for message, _ in batch:
            if message.msg_id in seen:
                continue
            seen.add(message.msg_id)
            key = _body_key(message.msg_id)
            node = _node_of(cluster, key)
            routing.setdefault(node, key)
            by_node.setdefault(node, []).append((message.msg_id, message.SerializeToString()))
        pipe = cluster.pipeline(transaction=False)
        for node, bodies in by_node.items():
            pipe.execute_command("EVALSHA", sha, 1, routing[node], self._ttl, _pack(bodies, []))
        bad: dict[int, str] = {}
        for flat in await pipe.execute() if by_node else []:
            for msg_id, kind in zip(flat[::2], flat[1::2], strict=True):
                key = _body_key(int(msg_id))
                bad[int(msg_id)] = f"WRONGTYPE {key} is a {kind.decode()}, not a string"
        return bad

    async def _write_packed(
        self, batch: Sequence[tuple[PushMessage, Sequence[str]]]
    ) -> WriteResult:
        calls = _packed_calls(batch)
        try:
            results = await self._execute_packed(calls)
        except NoScriptError:
            self._packed_sha = None  # Redis lost its scripts: reload, redo, idempotent
            results = await self._execute_packed(calls)
        return _packed_result(results, [])

    async def _execute_packed(self, calls: list[bytes]) -> list[Any]:
        # Loaded by hand, not redis-py's register_script: a pipeline holding a registered
        # script asks SCRIPT EXISTS before every execute, a round trip per pipeline here.
        if self._packed_sha is None:
            self._packed_sha = str(await self._redis.script_load(_APPEND_PACKED))
        sha = self._packed_sha
        # Two calls a round trip, not the whole batch in one pipeline: Redis runs what a
        # client has buffered back to back, so a batch-long pipeline holds it for every
        # call, and another client's command (the next member page of a big group) waits
        # for all of them. Two keep Redis busy across the round trip (one alone left it
        # idle a tenth of the time); a member page waits for two calls (~10 ms) at most.
        results: list[Any] = []
        for start in range(0, len(calls), _CALLS_PER_TRIP):
            pipe = self._redis.pipeline(transaction=False)
            for packed in calls[start : start + _CALLS_PER_TRIP]:
                pipe.evalsha(sha, 0, self._max_entries, self._ttl, self._prefix, packed)
            results += await pipe.execute()
        return results

    async def read(self, user: str, after: int, limit: int) -> list[InboxEntry]:
        entries, _ = await self.page(user, after, limit)
        return entries

    async def page(
        self, user: str, after: int, limit: int, *, also: str | None = None
    ) -> tuple[list[InboxEntry], bytes | None]:
        """`read`, and the value of the key `also` taken in the same MULTI as the page: one
        snapshot of both (the archive's top, stores/archive.py)."""
        pipe = self._redis.pipeline(transaction=also is not None)
        if also is not None:
            pipe.get(also)
        pipe.zrange(
            self.key(user), f"({after}", "+inf", byscore=True, offset=0, num=limit, withscores=True
        )
        *extra, rows = await pipe.execute()
        bodies = await self.bodies([int(member) for member, _ in rows]) if rows else []
        entries = [
            InboxEntry(
                cursor=int(score),
                msg_id=int(member),
                message=PushMessage.FromString(body) if body is not None else None,
            )
            for (member, score), body in zip(rows, bodies, strict=True)
        ]
        return entries, (extra[0] if extra else None)

    async def bodies(self, msg_ids: Sequence[int]) -> list[bytes | None]:
        """The messages' bytes, None where the body's TTL has passed."""
        pipe = self._redis.pipeline(transaction=False)
        for msg_id in msg_ids:
            pipe.get(_body_key(msg_id))
        return list(await pipe.execute())

    async def last_cursor(self, user: str) -> int:
        value = await self._redis.get(self.key(user) + ":seq")
        return int(value or 0)

    async def last_cursors(self, users: Sequence[str]) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for user in users:
            pipe.get(self.key(user) + ":seq")
        return {u: int(v or 0) for u, v in zip(users, await pipe.execute(), strict=True)}

    async def close(self) -> None:
        await self._redis.aclose()
