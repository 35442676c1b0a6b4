"""Each task's status, in Redis: state, progress, result, error and timestamps.

Why Redis and not a Faust table: a task's status is written by several stages (submit,
intake, the lane that runs it, retries, cancel) in consumer groups of their own, while a
Faust table can only be written from its own agent's partition. Routing every change
through one more agent hop would cost Faust's per-event overhead two or three times a
task, more than the whole budget of a 5,000 tasks/s worker. Here every worker reads any
task with one HGETALL, and a batch of changes is one pipelined round trip.

Keys share one hash tag per app, so the scripts below may touch a task and its indexes
together on a Redis Cluster too (one slot: fine for status, not for a firehose):
  <app>:{tasks}:task:<id>         hash: the status
  <app>:{tasks}:state:<state>     sorted set of ids by last change (ms): listing by state
  <app>:{tasks}:idem:<key>        the task_id that first used an idempotency key

States: queued -> running -> succeeded | failed | retrying -> running ... | dead, and
cancelled from queued, retrying or (asked, then stopped) running. A task that is not
here was never submitted: the API says 404, never "queued".
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import ResponseError

from resonance_task.errors import BACKOFF, is_transient
from resonance_task.pipeline.retry import retrying
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.settings import Settings
from resonance_task.stores.redis_client import connect
from resonance_task.tasks.envelope import priority_name

log = logging.getLogger(__name__)

STATES = ("queued", "running", "retrying", "succeeded", "failed", "dead", "cancelled")
FINAL = frozenset({"succeeded", "failed", "dead", "cancelled"})
IDEMPOTENCY_SECONDS = 24 * 3600

# Both scripts take a whole batch as one JSON argument: a script call per task cost the
# worker more in argument encoding than the task path's every other step (profiled at
# 2,100 no-op tasks/s). Each item runs under pcall, so a key another hand clobbered fails
# that item alone ({'error', message}), never the items after it or before it.
# KEYS[1] is only the batch's hash tag, for Redis Cluster's routing: every key touched
# shares it (see the top of this module).

# The batch is the last argument; each item's reply is a pair (kind, value).
_EACH_ITEM = """
local out = {{}}
for _, item in ipairs(cjson.decode(ARGV[#ARGV])) do
  local ok, res = pcall({run}, item)
  if not ok then res = {{'error', type(res) == 'table' and res.err or tostring(res)}} end
  out[#out + 1] = res[1]; out[#out + 1] = res[2]
end
return out
"""

# Create each status if it is new. A second task with a used idempotency key is a
# duplicate: it is recorded as cancelled, naming the first, and never runs.
# ARGV: prefix, now, ttl (ms), how long an idempotency key holds (s), then JSON items
# [id, task_type, priority, attempt, max_attempts, idempotency_key, envelope (base64)].
# Per item: {'new', 'queued'}, {'exists', state}, {'duplicate', first id}, {'error', why}.
_SUBMIT = """
local prefix, now, ttl, hold = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function submit(t)
  local id, key = t[1], prefix .. 'task:' .. t[1]
  local existing = redis.call('HGET', key, 'state')
  if existing then return {'exists', existing} end
  local state, err, first = 'queued', '', ''
  if t[6] ~= '' then
    local idem = prefix .. 'idem:' .. t[6]
    if not redis.call('SET', idem, id, 'NX', 'EX', hold) then
      first = redis.call('GET', idem)
      if first ~= id then state, err = 'cancelled', 'duplicate of ' .. first end
    end
  end
  redis.call('HSET', key, 'state', state, 'task_type', t[2], 'priority', t[3],
    'attempt', t[4], 'max_attempts', t[5], 'progress', 0, 'created_at', now,
    'updated_at', now, 'idempotency_key', t[6], 'error', err, 'envelope', t[7])
  redis.call('PEXPIRE', key, ttl)
  redis.call('ZADD', prefix .. 'state:' .. state, now, id)
  if state == 'cancelled' then return {'duplicate', first} end
  return {'new', state}
end
"""
_SUBMIT += _EACH_ITEM.format(run="submit")

# Move each task from one of the allowed states to another, with fields. `running` is
# taken only when the task is queued or retrying, or when its last runner's lease ran out
# (it died running it); a live lease says when to look again.
# ARGV: prefix, now, ttl (ms), then JSON items [id, to, allowed ("a,b"; "*" any),
# lease_ms, [field, value, ...]], values as strings. Per item: {'moved', state before},
# {'refused', state now}, {'leased', lease end (ms)}, {'missing', ''}, {'error', why}.
_MOVE = """
local prefix, now, ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function move(m)
  local id, to, allowed, key = m[1], m[2], m[3], prefix .. 'task:' .. m[1]
  local state = redis.call('HGET', key, 'state')
  if not state then return {'missing', ''} end
  local ok = allowed == '*' or string.find(',' .. allowed .. ',', ',' .. state .. ',', 1, true)
  if to == 'running' and state == 'running' then
    local lease = tonumber(redis.call('HGET', key, 'lease_until') or '0')
    if lease > now then return {'leased', tostring(lease)} end
    ok = true
  end
  if not ok then return {'refused', state} end
  if #m[5] > 0 then redis.call('HSET', key, unpack(m[5])) end
  redis.call('HSET', key, 'state', to, 'updated_at', ARGV[2])
  if to == 'running' then
    redis.call('HSET', key, 'lease_until', string.format('%d', now + tonumber(m[4])))
  end
  redis.call('PEXPIRE', key, ttl)
  if state ~= to then redis.call('ZREM', prefix .. 'state:' .. state, id) end
  redis.call('ZADD', prefix .. 'state:' .. to, now, id)
  return {'moved', state}
end
"""
_MOVE += _EACH_ITEM.format(run="move")

# KEYS: task hash; ARGV: field, value pairs. An expired task is not brought back.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


# State index entries one list call looks at, at most, when its type filter keeps few.
LIST_SCAN_MAX = 200_000


@dataclass(frozen=True)
class Move:
    task_id: str
    to: str
    allowed: str  # "queued,retrying"; "*" for any
    fields: dict[str, Any]
    lease_ms: int = 0


def _now() -> int:
    return int(time.time() * 1000)


class TaskStatuses:
    def __init__(
        self, url: str, app_id: str, *, ttl_seconds: float = 7 * 24 * 3600, timeout: float = 2.0
    ) -> None:
        self._redis = connect(url, timeout=timeout, decode_responses=True)
        self._prefix = f"{app_id}:{{tasks}}:"
        self._anchor = self._prefix + "state:queued"  # a key of the hash tag, for routing
        self._ttl_ms = int(ttl_seconds * 1000)
        self._submit = self._redis.register_script(_SUBMIT)
        self._move = self._redis.register_script(_MOVE)
        self._set_fields = self._redis.register_script(_SET_IF_EXISTS)

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskStatuses:
        return cls(
            settings.redis_url.get_secret_value(),
            settings.app_id,
            ttl_seconds=settings.task_status_ttl_seconds,
            timeout=settings.redis_timeout_seconds,
        )

    @property
    def redis(self) -> aioredis.Redis:
        """The client, for what keeps task state beside the statuses (rate limits)."""
        return self._redis

    @property
    def prefix(self) -> str:
        return self._prefix

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}task:{task_id}"

    async def counts(self) -> dict[str, int]:
        """Tasks per state, from the state indexes (expired tasks leave them lazily)."""
        pipe = self._redis.pipeline(transaction=False)
        for state in STATES:
            pipe.zcard(f"{self._prefix}state:{state}")
        return dict(zip(STATES, map(int, await pipe.execute()), strict=True))

    async def finished_between(self, since_ms: int | None, until_ms: int) -> dict[str, int]:
        """Tasks that reached each final state in (since, until]: counted in the state
        indexes (a task's entry is scored by its last change), not by reading tasks."""
        low = f"({since_ms}" if since_ms is not None else "-inf"
        pipe = self._redis.pipeline(transaction=False)
        ordered = sorted(FINAL)
        for state in ordered:
            pipe.zcount(f"{self._prefix}state:{state}", low, until_ms)
        return dict(zip(ordered, map(int, await pipe.execute()), strict=True))

    async def submit(self, tasks: Sequence[Task]) -> list[tuple[str, str]]:
        """Create each task's status; per task ("new", "queued"), ("exists", its state) or
        ("duplicate", the first task's id). A status Redis refuses (its key holds another
        type) raises, after the others are written: the stage narrows it down."""
        if not tasks:
            return []
        items = [
            [
                task.task_id,
                task.task_type,
                priority_name(task.priority),
                str(task.attempt),
                str(task.max_attempts),
                task.idempotency_key,
                base64.b64encode(task.SerializeToString()).decode(),
            ]
            for task in tasks
        ]
        args: list[str | int] = [
            self._prefix,
            _now(),
            self._ttl_ms,
            IDEMPOTENCY_SECONDS,
            _json(items),
        ]
        replies = _pairs(await self._submit(keys=[self._anchor], args=args))
        for kind, why in replies:
            if kind == "error":
                raise ResponseError(why)
        return replies

    async def move(self, moves: Sequence[Move]) -> list[tuple[str, str]]:
        """Apply each move; per move ("moved", the state before), ("refused", the state
        now), ("leased", its lease's end in ms), ("missing", "") or ("error", why: its
        key holds something else)."""
        if not moves:
            return []
        items = [
            [
                move.task_id,
                move.to,
                move.allowed,
                str(move.lease_ms),
                [
                    str(part)
                    for name, value in move.fields.items()
                    for part in (name, _field(value))
                ],
            ]
            for move in moves
        ]
        args: list[str | int] = [self._prefix, _now(), self._ttl_ms, _json(items)]
        return _pairs(await self._move(keys=[self._anchor], args=args))

    async def set_fields(self, task_id: str, **fields: Any) -> None:
        """Fields of a task that change no state (progress), if it still exists."""
        args: list[Any] = []
        for name, value in fields.items():
            args += [name, _field(value)]
        await self._set_fields(keys=[self._task_key(task_id)], args=args)

    async def get(self, task_id: str) -> dict[str, Any] | None:
        """The task's status, with its payload as stored (normalized at submit: the
        defaults its type filled in show here). `list` leaves payloads out: a thousand
        of them would be most of its answer."""
        raw: dict[str, str] = await self._redis.hgetall(self._task_key(task_id))  # type: ignore[assignment]
        return {**_status(task_id, raw), **_payload(raw.get("envelope"))} if raw else None

    async def envelope(self, task_id: str) -> Task | None:
        """The task as submitted (for a retry asked by hand), if its status still exists."""
        raw = await self._redis.hget(self._task_key(task_id), "envelope")
        return Task.FromString(base64.b64decode(raw)) if raw else None

    async def cancel_requested(self, task_ids: Iterable[str]) -> set[str]:
        ids = list(task_ids)
        if not ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.hget(self._task_key(task_id), "cancel_requested")
            flags = await pipe.execute()
        return {task_id for task_id, flag in zip(ids, flags, strict=True) if flag == "1"}

    async def request_cancel(self, task_id: str) -> tuple[str, str]:
        """Cancel a queued or retrying task now; ask a running one to stop. The outcome:
        ("cancelled" | "cancelling" | "refused" | "missing", the state before)."""
        ((kind, before),) = await self.move(
            [Move(task_id, "cancelled", "queued,retrying", {"finished_at": _now()})]
        )
        if kind == "moved":
            return "cancelled", before
        if kind == "refused" and before == "running":
            await self.set_fields(task_id, cancel_requested=1)
            return "cancelling", before
        return kind, before

    async def list(
        self, *, state: str | None, task_type: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The most recently changed tasks, newest first, in a state (or any), of a type.

        A type filter is applied while the state indexes are read, window by window (two
        fields a task, not its whole status), until `limit` match or LIST_SCAN_MAX
        entries were looked at: a type drowned by another's thousands is still found.
        Without a state, the states' windows are merged by time, window by window."""
        states = [state] if state else list(STATES)
        window = limit if not task_type else max(4 * limit, 1000)
        matched: list[tuple[float, str]] = []
        gone: list[str] = []
        start = 0
        while len(matched) < limit and start < LIST_SCAN_MAX:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in states:
                    pipe.zrevrange(
                        f"{self._prefix}state:{name}", start, start + window - 1, withscores=True
                    )
                found: list[list[tuple[str, float]]] = await pipe.execute()
            ids = sorted(
                ((float(score), str(task_id)) for pairs in found for task_id, score in pairs),
                reverse=True,
            )
            if not ids:
                break
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, task_id in ids:
                    pipe.hmget(self._task_key(task_id), "task_type", "state")
                fields: list[list[str | None]] = await pipe.execute()
            for (score, task_id), (its_type, its_state) in zip(ids, fields, strict=True):
                if its_state is None:
                    gone.append(task_id)  # expired: its index entries go too
                elif (not task_type or its_type == task_type) and (not state or its_state == state):
                    matched.append((score, task_id))
            start += window
        matched = sorted(matched, reverse=True)[:limit]
        async with self._redis.pipeline(transaction=False) as pipe:
            for _, task_id in matched:
                pipe.hgetall(self._task_key(task_id))
            raws = await pipe.execute()
        out = [
            _status(task_id, raw) for (_, task_id), raw in zip(matched, raws, strict=True) if raw
        ]
        if gone:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in states:
                    pipe.zrem(f"{self._prefix}state:{name}", *gone)
                await pipe.execute()
        return out

    async def close(self) -> None:
        await self._redis.aclose()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _pairs(flat: list[Any]) -> list[tuple[str, str]]:
    return [(str(flat[i]), str(flat[i + 1])) for i in range(0, len(flat), 2)]


def _field_pair(field: tuple[str, Any]) -> tuple[str, str | int | float]:
    return field[0], _field(field[1])


def _field(value: Any) -> str | int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, separators=(",", ":"))


_INTS = ("attempt", "max_attempts", "created_at", "updated_at", "started_at", "finished_at")


def _status(task_id: str, raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"task_id": task_id}
    for name in ("state", "task_type", "priority", "error", "idempotency_key", "worker"):
        if raw.get(name):
            out[name] = raw[name]
    out["progress"] = float(raw.get("progress") or 0)
    for name in _INTS:
        if raw.get(name):
            out[name] = int(float(raw[name]))
    if raw.get("result"):
        try:
            out["result"] = json.loads(raw["result"])
        except ValueError:
            out["result"] = raw["result"]
    if raw.get("progress_note"):
        out["progress_note"] = raw["progress_note"]
    if raw.get("cancel_requested") == "1" and out.get("state") == "running":
        out["cancel_requested"] = True
    return out


def _payload(envelope: str | None) -> dict[str, Any]:
    """{"payload": its JSON}, or {"payload_b64": ...} for bytes that are not JSON."""
    if not envelope:
        return {}
    try:
        payload = Task.FromString(base64.b64decode(envelope)).payload
    except (ValueError, DecodeError):
        return {}  # not ours to fail a status read over
    if not payload:
        return {}
    try:
        return {"payload": json.loads(payload)}
    except ValueError:
        return {"payload_b64": base64.b64encode(payload).decode()}


class Moves:
    """Single moves from many running tasks, written together: the moves made while the
    event loop runs one round go in one batch, and up to FLUSHES_IN_FLIGHT batches are out
    at once (one at a time made every run slot wait for the batch before its own: at
    2,500 tasks/s that wait, not the CPU, capped 100 slots). A task's moves are made one
    after another, so batches in flight together never hold two moves of one task.
    Transient Redis errors are waited out (the one error policy); any other error fails
    only the move it concerns."""

    FLUSHES_IN_FLIGHT = 4

    def __init__(self, statuses: TaskStatuses) -> None:
        self._statuses = statuses
        self._pending: list[tuple[Move, asyncio.Future[tuple[str, str]]]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def move(self, move: Move) -> tuple[str, str]:
        return await self.enqueue(move)

    def enqueue(self, move: Move) -> asyncio.Future[tuple[str, str]]:
        """The move's outcome, as a future: written with the next batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[str, str]] = loop.create_future()
        self._pending.append((move, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and len(self._writes) < self.FLUSHES_IN_FLIGHT:
            self._scheduled = True
            loop.call_soon(self._start_batch)

    def _start_batch(self) -> None:
        self._scheduled = False
        if not self._pending or len(self._writes) >= self.FLUSHES_IN_FLIGHT:
            return
        batch, self._pending = self._pending, []
        write = asyncio.ensure_future(self._flush(batch))
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _written(self, write: asyncio.Task[None]) -> None:
        self._writes.discard(write)
        if self._pending:
            self._schedule(write.get_loop())

    async def _flush(self, batch: list[tuple[Move, asyncio.Future[tuple[str, str]]]]) -> None:
        tries = 0
        while True:
            tries += 1
            try:
                replies = await self._write([move for move, _ in batch])
            except Exception as exc:  # not transient (those are waited out)
                for _, future in batch:
                    _settle(future, exc)
                return
            again = []
            for (move, future), (kind, value) in zip(batch, replies, strict=True):
                if kind != "error":
                    _settle(future, (kind, value))
                elif is_transient(error := ResponseError(value)):
                    # An item refused for a while (a failover's READONLY, OOM): only it is
                    # written again; the others took effect and must not be redone.
                    again.append((move, future))
                    why = value
                else:
                    _settle(future, error)  # its key holds something else: it fails alone
            if not again:
                return
            log.warning("task statuses: %d moves refused for now (%s)", len(again), why)
            await asyncio.sleep(BACKOFF.capped(2.0).delay(tries))
            batch = again

    async def _write(self, moves: list[Move]) -> list[tuple[str, str]]:
        return await retrying(lambda: self._statuses.move(moves), "task statuses", attempts=1)


def _settle(future: asyncio.Future[tuple[str, str]], outcome: tuple[str, str] | Exception) -> None:
    if future.done():  # its task was cancelled meanwhile
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
