"""Tasks the cluster runs every so often (inbox_archive, stats_report), submitted by the
leader as ordinary tasks: they get a status, retries, the DLQ and the API like any other.

A period's task has an id made from the period's start (`stats_report-1796310000000`),
so a leader that changes mid-period, or two workers that both believe they lead during a
rebalance, submit the same task twice and it runs once: the second submit finds its
status and queues nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task

log = logging.getLogger(__name__)

Submit = Callable[[Sequence[Task]], Awaitable[list[tuple[str, str]]]]


def last_period(now: float, interval_ms: int) -> tuple[int, int]:
    """The last whole period before `now` (seconds): [start, end) in ms, periods starting
    at multiples of `interval_ms` since the epoch."""
    end = int(now * 1000) // interval_ms * interval_ms
    return end - interval_ms, end


@dataclass(frozen=True)
class Periodic:
    task_type: str
    interval: float  # seconds; periods start at multiples of it since the epoch
    # Whether the payload names the period: a report is of one; an archive pass is of
    # every inbox as it is, and its payload allows nothing but `users`.
    names_period: bool = True

    def task_for(self, now: float) -> Task:
        """The task of the period `now` is in; its payload names the period before it,
        the one just finished, which is what a report of it covers."""
        interval_ms = int(self.interval * 1000)
        previous, start = last_period(now, interval_ms)
        payload = {"period_start": previous, "period_end": start} if self.names_period else {}
        task_id = f"{self.task_type}-{start}"
        return Task(
            task_id=task_id,
            task_type=self.task_type,
            idempotency_key=task_id,
            priority=Priority.PRIORITY_LOW,  # housekeeping waits behind people's tasks
            payload=json.dumps(payload).encode(),
        )


class PeriodicTasks:
    """Submits each periodic task once a period; `tick` runs on the leader only."""

    def __init__(self, periodic: Sequence[Periodic], submit: Submit) -> None:
        self._periodic = [p for p in periodic if p.interval > 0]
        self._submit = submit
        self._done: dict[str, str] = {}  # task_type -> the last task_id submitted

    @property
    def tick_seconds(self) -> float:
        """How often `tick` should run: a period's task starts at most this late."""
        shortest = min((p.interval for p in self._periodic), default=60.0)
        return max(0.5, min(30.0, shortest / 4))

    def __bool__(self) -> bool:
        return bool(self._periodic)

    async def tick(self, now: float | None = None) -> list[str]:
        """Submit the tasks whose period has begun since the last tick; their ids."""
        now = time.time() if now is None else now
        due = [
            task
            for task in (p.task_for(now) for p in self._periodic)
            if self._done.get(task.task_type) != task.task_id
        ]
        if not due:
            return []
        try:
            outcomes = await self._submit(due)
        except Exception as exc:
            # A timer that raises takes the worker down (mode crashes the app): not for a
            # store or broker away for a moment. The next tick submits them again.
            log.warning("periodic tasks not submitted, next tick tries again: %r", exc)
            return []
        for task, (kind, state) in zip(due, outcomes, strict=True):
            self._done[task.task_type] = task.task_id
            if kind == "new":
                log.info("periodic task %s submitted", task.task_id)
            else:
                log.debug("periodic task %s: %s (%s)", task.task_id, kind, state)
        return [task.task_id for task in due]
