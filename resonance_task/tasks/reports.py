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

The payload (StatsReportPayload) names the period, ms since the epoch; left out, it is
the last whole period of STATS_REPORT_INTERVAL_SECONDS at submit (what the leader's own
task names), so `{}` asks for the report of the period just ended.

Every worker keeps the topic's records as a table (`StatsTable`, a view of the whole
topic), served at GET /api/v1/stats/hourly.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

from aiokafka import ConsumerRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks.payload import payload_of
from resonance_task.tasks.periodic import last_period
from resonance_task.tasks.registry import Context
from resonance_task.tasks.status import TaskStatuses

# [topic] -> {(topic, partition): end offset}
EndOffsets = Callable[[list[str]], Awaitable[dict[tuple[str, int], int]]]


LOCK_MS = 60_000  # the processor's timeout: a lock outlives no run
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


HOUR_MS = 3_600_000


def _no_default(schema: dict[str, Any]) -> None:
    # The default is worked out at submit, not the null pydantic would show.
    schema.pop("default", None)


class StatsReportPayload(BaseModel):
    """The period a report is of, [period_start, period_end) in ms since the epoch. An
    edge left out follows from the other and the report interval; both left out, the
    last whole period before the task was submitted."""

    model_config = ConfigDict(extra="forbid", strict=True, title="StatsReportPayload")
    interval_ms: ClassVar[int] = HOUR_MS  # `every` makes the model of another interval

    # Typed int, defaulted to None: the validator below fills in what is left out, so a
    # processor never sees None, and the schema shows both as optional.
    period_start: int = Field(
        None,  # type: ignore[assignment]
        ge=0,
        description="ms since the epoch; default: period_end less the report interval, "
        "or the start of the last whole period",
        json_schema_extra=_no_default,
    )
    period_end: int = Field(
        None,  # type: ignore[assignment]
        gt=0,
        description="ms since the epoch, after period_start; default: period_start plus "
        "the report interval, or the end of the last whole period",
        json_schema_extra=_no_default,
    )

    @classmethod
    def every(cls, interval_seconds: float) -> type[StatsReportPayload]:
        """The model whose default period is `interval_seconds` long (0, no periodic
        report: an hour)."""
        interval_ms = int(interval_seconds * 1000) or HOUR_MS
        namespace = {"interval_ms": interval_ms, "__module__": cls.__module__}
        model: type[StatsReportPayload] = type(cls.__name__, (cls,), namespace)
        return model

    @field_validator("period_end")
    @classmethod
    def _after_start(cls, end: int, info: ValidationInfo) -> int:
        # Here and not in the model's validator, so the refusal names period_end.
        start = info.data.get("period_start")
        if start is not None and end <= start:
            raise ValueError(f"must be after period_start ({start})")
        return end

    @model_validator(mode="after")
    def _whole_period(self) -> Self:
        if self.period_start is None and self.period_end is None:
            self.period_start, self.period_end = last_period(time.time(), self.interval_ms)
        elif self.period_start is None:
            self.period_start = max(0, self.period_end - self.interval_ms)
        elif self.period_end is None:
            self.period_end = self.period_start + self.interval_ms
        return self


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
        interval_seconds: float = 3600.0,
    ) -> None:
        self.payload = StatsReportPayload.every(interval_seconds)
        self._topics = {name: frozenset(names) for name, names in topics.items()}
        self._end_offsets = end_offsets
        self._statuses = statuses
        self._publish = publish
        self._snapshot_key = f"{statuses.prefix}stats:offsets"
        self._lock_key = f"{statuses.prefix}stats:lock"

    async def run(self, task: Task, ctx: Context) -> dict[str, Any]:
        payload = payload_of(task, ctx, StatsReportPayload)
        period = payload.period_start, payload.period_end
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
