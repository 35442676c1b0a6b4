"""stats_report: what the cluster did in a period, as one record on a compacted topic.

    key    the period's start, ISO 8601 UTC ("2026-12-03T14:00:00Z")
    value  {"period_start", "period_end": ms, "from", "to": ms actually counted,
            "records": {name: records added to that topic}, "tasks": {final state: n}}

Counts come from what already keeps them, so the message path pays nothing for them:
- records per topic (events in, deliveries, pushes, dead letters, tasks submitted...):
  each partition's end offset now minus at the last report, whose offsets are kept in
  Redis. The broker has no offsets for a past time that Tansu answers right (DESIGN.md
  section 6), so a report covers [last report, this run): the periods' edges are when the
  leader submitted the task, seconds after the boundary. The first report ever counts
  from the topics' start (`from` is null). Against Tansu an end offset is the last
  batch's first offset + 1 (DESIGN.md section 6): a count may miss a batch's tail.
- tasks finished per final state, from the status indexes (tasks/status.py).

Every worker keeps the topic's records as a table (`StatsTable`, a view of the whole
topic), served at GET /api/v1/stats/hourly.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord

from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks.registry import Context, PermanentError
from resonance_task.tasks.status import TaskStatuses

# [topic] -> {(topic, partition): end offset}
EndOffsets = Callable[[list[str]], Awaitable[dict[tuple[str, int], int]]]


LOCK_MS = 60_000  # the processor's timeout: a lock outlives no run
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ReportBusy(RuntimeError):
    """Another report holds the lock: a transient error, so the task is retried."""


def period_key(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatsReport:
    def __init__(
        self,
        *,
        topics: Mapping[str, Sequence[str]],  # name in the report -> its topics
        end_offsets: EndOffsets,
        statuses: TaskStatuses,
        publish: SendRecord,
    ) -> None:
        self._topics = {name: frozenset(names) for name, names in topics.items()}
        self._end_offsets = end_offsets
        self._statuses = statuses
        self._publish = publish
        self._snapshot_key = f"{statuses.prefix}stats:offsets"
        self._lock_key = f"{statuses.prefix}stats:lock"

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        period = _period(task)
        # Two reports counting from one snapshot would both count its span: one at a
        # time (a period's task can run late, beside the next one). The other is retried.
        token = uuid.uuid4().hex  # this run's, not the task's: a stale run frees no lock
        if not await self._statuses.redis.set(self._lock_key, token, nx=True, px=LOCK_MS):
            raise ReportBusy("another stats_report is counting; this one runs after it")
        try:
            return await self._report(period)
        finally:
            await self._statuses.redis.eval(_RELEASE, 1, self._lock_key, token)

    async def _report(self, period: tuple[int, int]) -> dict[str, Any]:
        key = period_key(period[0])
        now = int(time.time() * 1000)
        raw = await self._statuses.redis.get(self._snapshot_key)
        last: dict[str, Any] = json.loads(raw) if raw else {"at": None, "offsets": {}}
        if last.get("period") == key and isinstance(last.get("report"), dict):
            # This period was counted (and published) by a run whose end was not recorded
            # (its worker died, its status write failed): publish the same report again,
            # not a recount from its own snapshot, which would cover seconds.
            report = last["report"]
            await (await self._publish(key.encode(), json.dumps(report).encode(), None))
            return {"period": key, **report}
        offsets = await self._end_offsets(sorted(set().union(*self._topics.values())))
        records = {}
        for name, topics in self._topics.items():
            total = 0
            for (t, partition), end in offsets.items():
                if t not in topics:
                    continue
                before = last["offsets"].get(f"{t}:{partition}", 0)
                # Lower than before: the topic was made anew (an in-memory broker restarted).
                total += end - before if end >= before else end
            records[name] = total
        report = {
            "period_start": period[0],
            "period_end": period[1],
            "from": last["at"],
            "to": now,
            "records": records,
            "tasks": await self._statuses.finished_between(last["at"], now),
        }
        ack = await self._publish(key.encode(), json.dumps(report).encode(), None)
        await ack
        # Only once the report is out: a retry of this task counts the same span again.
        snapshot = {
            "at": now,
            "offsets": {f"{t}:{p}": end for (t, p), end in offsets.items()},
            "period": key,
            "report": report,
        }
        await self._statuses.redis.set(self._snapshot_key, json.dumps(snapshot))
        return {"period": key, **report}


def _period(task: Task) -> tuple[int, int]:
    try:
        payload = json.loads(task.payload or b"{}")
        start, end = int(payload["period_start"]), int(payload["period_end"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentError(f"payload: period_start and period_end in ms: {exc}") from None
    if end <= start:
        raise PermanentError("payload: period_end must be after period_start")
    return start, end


class StatsTable:
    """A worker's copy of the stats topic: period key -> report (the newest record wins,
    as compaction would keep it)."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}

    def apply(self, record: ConsumerRecord[Any, Any]) -> None:
        if record.key is None:
            return
        key = record.key.decode(errors="replace")
        if record.value is None:
            self.reports.pop(key, None)
            return
        try:
            report = json.loads(record.value)
        except ValueError:
            return  # not ours: someone else wrote the topic
        if isinstance(report, dict):
            self.reports[key] = report

    def latest(self, limit: int) -> list[dict[str, Any]]:
        keys = sorted(self.reports, reverse=True)[:limit]
        return [{"period": key, **self.reports[key]} for key in keys]
