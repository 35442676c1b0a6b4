"""Run slots shared by the priority lanes: high first, normal next, low never starved.

Each free slot goes to the lane whose turn it is by smooth weighted round robin (nginx's
upstream algorithm) over the lanes that have work: with every lane busy, high gets 6 of
10 slots, normal 3 and low 1; a lane alone gets them all. A low-priority backlog thus
delays a high-priority task by at most the wait for one free slot, and low still moves.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from resonance_task.proto.resonance.task.v1.task_pb2 import Priority
from resonance_task.tasks.envelope import priority_name

WEIGHTS: dict[int, int] = {
    Priority.PRIORITY_HIGH: 6,
    Priority.PRIORITY_NORMAL: 3,
    Priority.PRIORITY_LOW: 1,
}

Job = Callable[[], Awaitable[Any]]


class Scheduler:
    def __init__(self, concurrency: int, weights: dict[int, int] | None = None) -> None:
        self._free = concurrency
        self.concurrency = concurrency
        self._weights = dict(weights or WEIGHTS)
        self._current = dict.fromkeys(self._weights, 0)
        self._queues: dict[int, deque[tuple[Job, asyncio.Future[Any]]]] = {
            p: deque() for p in self._weights
        }
        self._running: set[asyncio.Future[Any]] = set()

    def submit(self, priority: int, job: Job) -> asyncio.Future[Any]:
        """Run `job()` when a slot is its; the future has its outcome."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lane = priority if priority in self._queues else Priority.PRIORITY_NORMAL
        self._queues[lane].append((job, future))
        self._dispatch()
        return future

    def drop(self, priority: int) -> None:
        """Forget the jobs of one lane that wait for a slot (their futures are cancelled)."""
        for _, future in self._queues.get(priority, ()):
            future.cancel()
        self._queues.get(priority, deque()).clear()

    @property
    def idle_slot(self) -> bool:
        """A slot is free and no job waits: a job submitted now starts at once, ahead of
        nobody."""
        return self._free > 0 and not any(self._queues.values())

    @property
    def running(self) -> int:
        return self.concurrency - self._free

    def stats(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "running": self.running,
            "waiting": {priority_name(p): len(q) for p, q in self._queues.items()},
        }

    def _next_lane(self) -> int | None:
        busy = [p for p, q in self._queues.items() if q]
        if not busy:
            return None
        total = 0
        for p in busy:
            self._current[p] += self._weights[p]
            total += self._weights[p]
        chosen = max(busy, key=lambda p: self._current[p])
        self._current[chosen] -= total
        return chosen

    def _dispatch(self) -> None:
        while self._free > 0:
            lane = self._next_lane()
            if lane is None:
                return
            job, future = self._queues[lane].popleft()
            if future.cancelled():
                continue
            self._free -= 1
            task = asyncio.ensure_future(job())
            self._running.add(task)
            task.add_done_callback(functools.partial(self._done, future=future))

    def _done(self, task: asyncio.Future[Any], *, future: asyncio.Future[Any]) -> None:
        self._running.discard(task)
        self._free += 1
        if not future.done():
            if task.cancelled():
                future.cancel()
            elif task.exception() is not None:
                future.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                future.set_result(task.result())
        self._dispatch()
