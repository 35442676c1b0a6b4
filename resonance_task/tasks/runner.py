"""Running a task: its status, its processor under a timeout, and what follows a failure.

When a slot is its (tasks/scheduler.py), a run takes the task's status to `running` with
a lease (the timeout plus a margin): a worker that dies running it leaves a lease that
runs out, and the task's record, redone by the next owner of its partition, runs it
again then, not before. A run ends in one of:
- succeeded: the processor returned; its result (JSON) is kept;
- retrying: it raised, attempts are left: the task goes to a retry topic with a delay
  (backoff with jitter) and the attempt counted;
- dead: it raised PermanentError (or the task is invalid, its payload included: checked
  again here, as the intake may not have seen it), or no attempt is left: the task goes
  to the dead-letter topic, with headers saying where it came from, how many attempts it
  had and what it raised;
- cancelled: cancelled while it ran (the processor's stop() is called, then it is
  cancelled after a grace period).
Timeouts count as failures that may be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from resonance_task import errors
from resonance_task.pipeline import metrics
from resonance_task.pipeline.dlq import DeadLetters, SourceRecord
from resonance_task.pipeline.transport import SendRecord
from resonance_task.proto.resonance.task.v1.task_pb2 import Task
from resonance_task.tasks.envelope import priority_name
from resonance_task.tasks.payload import PayloadInvalid
from resonance_task.tasks.ratelimit import RateLimits
from resonance_task.tasks.registry import Processor, Registry
from resonance_task.tasks.scheduler import Scheduler
from resonance_task.tasks.status import FINAL, Move, Moves, TaskStatuses

log = logging.getLogger(__name__)


LEASE_MARGIN_MS = 30_000
# Started by the intake only if it ends (its timeout) within this, the default task
# timeout: the records after it in the intake's partition wait for it to commit, as a
# lane's do, and are held meanwhile.
START_NOW_MAX_SECONDS = 300.0
CANCEL_POLL_SECONDS = 0.25
CANCEL_GRACE_SECONDS = 1.0
PROGRESS_MIN_INTERVAL = 0.2  # seconds between two progress writes of one task
# Runs past their timeout are looked for this often, by one timer for all of them: a
# timer per run (wait_for, asyncio.timeout) was ~4% of a no-op task's cost. A run may
# thus outlive its timeout by this much.
SWEEP_SECONDS = 0.05


@dataclass
class RunnerConfig:
    default_timeout: float = 300.0
    default_max_attempts: int = 5
    retry_delays: Sequence[float] = (1.0, 10.0, 60.0)  # seconds, one per retry topic
    dead_letter_topic: str = "resonance.task.v1.dlq"
    worker: str = ""


class RunContext:
    """What a processor gets besides its task: progress reports and the cancel flag."""

    def __init__(self, task: Task, statuses: TaskStatuses, payload: Any = None) -> None:
        self.task_id = task.task_id
        self.attempt = task.attempt
        self.payload = payload
        self._statuses = statuses
        self._cancelled = False
        self._last_progress = 0.0

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def progress(self, percent: float, note: str = "") -> None:
        now = time.monotonic()
        if percent < 100 and now - self._last_progress < PROGRESS_MIN_INTERVAL:
            return  # a processor reporting per item must not become a Redis firehose
        self._last_progress = now
        fields: dict[str, Any] = {"progress": max(0.0, min(100.0, float(percent)))}
        if note:
            fields["progress_note"] = note[:500]
        try:
            await self._statuses.set_fields(self.task_id, **fields)
        except Exception as exc:  # progress is a report: it never fails the task
            log.warning("task %s: progress not written: %r", self.task_id, exc)


@dataclass
class _Running:
    task: Task
    ctx: RunContext
    processor: Processor
    inner: asyncio.Future[Any]
    deadline: float  # monotonic
    stop_asked: bool = field(default=False)
    timed_out: bool = field(default=False)


class TaskRunner:
    def __init__(
        self,
        *,
        registry: Registry,
        statuses: TaskStatuses,
        scheduler: Scheduler,
        retry_topics: Sequence[SendRecord],
        dead_letters: DeadLetters,
        config: RunnerConfig,
        rate_limits: RateLimits | None = None,
    ) -> None:
        if len(retry_topics) != len(config.retry_delays):
            raise ValueError("one retry topic per retry delay")
        self._registry = registry
        self._statuses = statuses
        self._moves = Moves(statuses)
        self._scheduler = scheduler
        self._retry_topics = list(retry_topics)
        self._dead_letters = dead_letters
        self._config = config
        self._running: dict[str, _Running] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._lanes_running = 0
        self._cancelling: set[asyncio.Task[None]] = set()
        self._rate_limits = rate_limits
        self._waiting_for_rate: dict[int, set[asyncio.Future[Any]]] = {}
        self._stopping = False  # a lane began handing its tasks back: start nothing more
        self._sweeping: asyncio.TimerHandle | None = None  # the next look for overdue runs

    @property
    def worker(self) -> str:
        """This worker's name in task statuses (host:pid)."""
        return self._config.worker

    # -- what the lanes call --------------------------------------------------------------

    async def start(self, tasks: Sequence[Task]) -> list[Awaitable[object] | None]:
        """Take each task toward its end; per task what completes when it has ended
        (status written, a retry or dead letter acknowledged), or None: nothing to do."""
        now = int(time.time() * 1000)
        effects: list[Awaitable[object] | None] = []
        for task in tasks:
            if task.not_before > now:
                # Not yet: it waits in a retry topic, queued (and cancellable) meanwhile.
                effects.append(await self._retry_later(task, task.not_before))
            elif self._rate_limits is not None and self._rate_limits.limited(task.task_type):
                effects.append(self._after_token(task, self._rate_limits))
            else:
                effects.append(
                    _after_slot(
                        self._scheduler.submit(task.priority, functools.partial(self._run, task))
                    )
                )
        return effects

    def start_now(self, task: Task) -> asyncio.Future[Any] | None:
        """Run `task` in a slot at once if nothing would make it wait there: due, its type
        not rate-limited, a slot idle with no task of any priority waiting (so it passes
        nobody), and the lanes running here (they watch for cancels and hand running
        tasks back at shutdown). What completes when it has ended; None: not now, it
        goes to its lane."""
        if self._stopping or not self._lanes_running or not self._scheduler.idle_slot:
            return None  # stopping: a lane that already handed its tasks back would not
        if task.not_before > time.time() * 1000:
            return None
        if self._timeout(task) > START_NOW_MAX_SECONDS:
            return None
        if self._rate_limits is not None and self._rate_limits.limited(task.task_type):
            return None
        return _after_slot(
            self._scheduler.submit(task.priority, functools.partial(self._run, task))
        )

    def _after_token(self, task: Task, limits: RateLimits) -> asyncio.Future[Any]:
        """Its type's token first (waited for outside the slots), then a slot."""

        async def run() -> object:
            await limits.acquire(task.task_type)
            slot = self._scheduler.submit(task.priority, functools.partial(self._run, task))
            return await _after_slot(slot)

        future = asyncio.ensure_future(run())
        waiting = self._waiting_for_rate.setdefault(task.priority, set())
        waiting.add(future)
        future.add_done_callback(waiting.discard)
        return future

    def watch_cancels(self) -> None:
        """A lane started: cancels are watched while any lane runs."""
        self._lanes_running += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_cancels())

    async def stop(self, deadline: float, priority: int) -> None:
        """Shutdown of a lane: its tasks waiting for a slot are dropped (still queued),
        its running ones get until `deadline`, then are asked to stop and handed back
        (queued again), so the partition's next owner runs them without waiting for a
        lease to run out."""
        self._stopping = True
        # What waits for a slot or a token stays queued: the partition's next owner runs it.
        self._scheduler.drop(priority)
        for future in self._waiting_for_rate.pop(priority, set()):
            future.cancel()
        mine = [r for r in self._running.values() if r.task.priority == priority]
        if mine:
            await asyncio.wait(
                [r.inner for r in mine], timeout=max(0.0, deadline - time.monotonic())
            )
        left = [r for r in mine if not r.inner.done()]
        if not left:
            return
        await self._statuses.move(
            [Move(r.task.task_id, "queued", "running", {"error": "worker stopped"}) for r in left]
        )
        for running in left:
            await self._ask_to_stop(running)
            running.inner.cancel()

    def stop_watching(self) -> None:
        self._lanes_running -= 1
        if self._lanes_running <= 0 and self._watcher is not None:
            self._watcher.cancel()

    # -- one run --------------------------------------------------------------------------

    def _timeout(self, task: Task) -> float:
        if task.timeout_ms:
            return task.timeout_ms / 1000
        return self._registry.timeouts.get(task.task_type, self._config.default_timeout)

    async def _run(self, task: Task) -> object:
        """Its slot is given: the task is ours to run, unless it ended, was cancelled or
        is running elsewhere meanwhile. The lease starts now, not while it waited."""
        try:
            kind, value = await self._moves.move(
                Move(
                    task.task_id,
                    "running",
                    "queued,retrying",
                    {
                        "attempt": task.attempt,
                        "started_at": int(time.time() * 1000),
                        "worker": self._config.worker,
                        "cancel_requested": 0,
                    },
                    lease_ms=int(self._timeout(task) * 1000) + LEASE_MARGIN_MS,
                )
            )
        except Exception as exc:  # not transient (those are waited out): this task's status
            return await self._dead(
                task, "status_unwritable", f"{type(exc).__name__}: {exc}", exc, status=False
            )
        if kind == "leased":
            # Another run holds it, or held it and died: look again once its lease ends.
            log.info("task %s is running elsewhere until %s: later", task.task_id, value)
            return await (await self._retry_later(task, int(value)))
        if kind != "moved":
            # Ended or cancelled meanwhile (or its status expired): not run again.
            metrics.TASKS_SKIPPED.labels(value or kind).inc()
            return None
        processor = self._registry.get(task.task_type)
        started = time.monotonic()
        if processor is None:  # checked at submit; a processor removed since then
            return await self._dead(task, "unknown_task_type", f"no processor: {task.task_type}")
        try:
            # Checked at submit too; here for what reached a lane or a retry topic another
            # way (a task of before its type declared a payload, a record put there by
            # hand). Cheap against any run, and the processor gets the checked value.
            payload = self._registry.load(task)
        except PayloadInvalid as exc:
            return await self._failed(task, exc)  # permanent: dead at once
        ctx = RunContext(task, self._statuses, payload)
        inner = asyncio.ensure_future(processor.run(task, ctx))
        running = _Running(task, ctx, processor, inner, started + self._timeout(task))
        self._running[task.task_id] = running
        if self._sweeping is None:
            self._sweeping = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        labels = (task.task_type,)
        try:
            result = await inner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker is stopping: the task was handed back
            if not ctx.cancelled:  # a cancel asked for wins over a deadline met meanwhile
                if not running.timed_out:
                    raise
                return await self._failed(task, TimeoutError())
            metrics.TASKS_FINISHED.labels(*labels, "cancelled").inc()
            return await self._end(task, "cancelled", {"error": "cancelled while running"})
        except Exception as exc:
            return await self._failed(task, exc)
        finally:
            self._running.pop(task.task_id, None)
            metrics.TASK_DURATION.labels(*labels).observe(time.monotonic() - started)
        if ctx.cancelled:  # it heeded stop() and returned early
            metrics.TASKS_FINISHED.labels(*labels, "cancelled").inc()
            return await self._end(task, "cancelled", {"error": "cancelled while running"})
        metrics.TASKS_FINISHED.labels(*labels, "succeeded").inc()
        # The slot is for running processors: it is free again while the status is written.
        fields = {"result": _jsonable(result), "progress": 100, "error": ""}
        return _Then(
            self._moves.enqueue(Move(task.task_id, "succeeded", "running", _final(fields)))
        )

    def _sweep(self) -> None:
        """Stop the runs past their deadline; again in SWEEP_SECONDS while any run."""
        self._sweeping = None
        now = time.monotonic()
        for running in self._running.values():
            if not running.timed_out and now >= running.deadline:
                running.timed_out = True
                running.inner.cancel()
        if self._running:
            self._sweeping = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    async def _failed(self, task: Task, exc: Exception) -> object:
        error = f"{type(exc).__name__}: {exc}"[:1000]
        runs = task.attempt + 1
        limit = task.max_attempts or self._config.default_max_attempts
        permanent = isinstance(errors.classify(exc), errors.Poison)
        if isinstance(exc, TimeoutError):
            error = f"timed out after {self._timeout(task):g}s"
        if permanent:
            metrics.TASKS_FINISHED.labels(task.task_type, "dead").inc()
            return await self._dead(task, "permanent_error", error, exc, runs)
        if runs >= limit:
            metrics.TASKS_FINISHED.labels(task.task_type, "dead").inc()
            return await self._dead(task, "attempts_exhausted", error, exc, runs)
        metrics.TASKS_FINISHED.labels(task.task_type, "retrying").inc()
        log.info("task %s failed (run %d of %d), retrying: %s", task.task_id, runs, limit, error)
        stage = min(runs, len(self._retry_topics)) - 1
        delay = self._config.retry_delays[stage] * random.uniform(0.8, 1.2)
        retry = Task()
        retry.CopyFrom(task)
        retry.attempt = runs
        retry.last_error = error
        retry.not_before = int(time.time() * 1000 + delay * 1000)
        await self._end(task, "retrying", {"attempt": runs, "error": error})
        metrics.TASK_RETRIES.labels(task.task_type, str(stage + 1)).inc()
        return await self._send_retry(retry, stage)

    async def _retry_later(self, task: Task, not_before: int) -> Awaitable[object]:
        """The same run, later: in the first retry topic whose delay covers the wait (a
        topic's records come due in order only if they wait about as long as each other)."""
        wait = (not_before - time.time() * 1000) / 1000
        delays = self._config.retry_delays
        stage = next((k for k, d in enumerate(delays) if d >= wait), len(delays) - 1)
        again = Task()
        again.CopyFrom(task)
        again.not_before = not_before
        return await self._send_retry(again, stage)

    async def _send_retry(self, task: Task, stage: int) -> Awaitable[object]:
        return await self._retry_topics[stage](
            task.task_id.encode(), task.SerializeToString(), None
        )

    async def _dead(
        self,
        task: Task,
        reason: str,
        error: str,
        exc: BaseException | None = None,
        runs: int | None = None,
        *,
        status: bool = True,
    ) -> object:
        attempts = task.attempt + 1 if runs is None else runs
        ack = await dead_letter(
            self._dead_letters,
            self._config.dead_letter_topic,
            task,
            reason,
            error,
            type(exc).__name__ if exc else reason,
            attempts,
        )
        if status:
            await self._end(task, "dead", {"attempt": attempts, "error": error})
        return await ack if ack is not None else None

    async def _end(self, task: Task, state: str, fields: dict[str, Any]) -> object:
        if state in FINAL:
            fields = _final(fields)
        await self._moves.move(Move(task.task_id, state, "running", fields))
        return None

    # -- cancel ---------------------------------------------------------------------------

    async def _watch_cancels(self) -> None:
        while True:
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            if not self._running:
                continue
            try:
                asked = await self._statuses.cancel_requested(list(self._running))
            except Exception as exc:
                log.warning("task cancels not read: %r", exc)
                continue
            for task_id in asked:
                running = self._running.get(task_id)
                if running is not None and not running.stop_asked:
                    running.ctx._cancelled = True
                    cancelling = asyncio.create_task(self._cancel(running))
                    self._cancelling.add(cancelling)
                    cancelling.add_done_callback(self._cancelling.discard)

    async def _cancel(self, running: _Running) -> None:
        await self._ask_to_stop(running)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(running.inner), CANCEL_GRACE_SECONDS)
        if not running.inner.done():
            running.inner.cancel()

    async def _ask_to_stop(self, running: _Running) -> None:
        running.stop_asked = True
        stop = getattr(running.processor, "stop", None)
        if stop is None:
            return
        try:
            await stop(running.task)
        except Exception as exc:
            log.warning("task %s: stop() raised %r", running.task.task_id, exc)


async def dead_letter(
    dead_letters: DeadLetters,
    dlq: str,
    task: Task,
    reason: str,
    error: str,
    exception: str,
    attempts: int,
) -> Awaitable[object] | None:
    """The task's dead letter: its envelope (attempts and error in it, so a replay from
    the letter alone works), where it was first read, and why; the broker's ack."""
    dead = Task()
    dead.CopyFrom(task)
    dead.attempt = attempts
    dead.last_error = error
    return await dead_letters.put(
        SourceRecord(
            task.origin_topic,
            task.origin_partition,
            task.origin_offset,
            task.task_id.encode(),
            dead.SerializeToString(),
        ),
        reason,
        error,
        extra_headers=[
            ("task.attempts", str(attempts).encode()),
            ("task.type", task.task_type.encode()),
            ("task.exception", exception.encode()),
            ("task.priority", priority_name(task.priority).encode()),
        ],
        dlq=dlq,
    )


def _final(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "finished_at": int(time.time() * 1000)}


class _Then:
    """What a run hands on with its slot: the lane's record is done when this is."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future


def _after_slot(slot: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Done when a run has ended: its slot's outcome, then what it handed on (_Then).
    Callbacks, not a task per record."""
    outer: asyncio.Future[Any] = slot.get_loop().create_future()

    def copy(done: asyncio.Future[Any]) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        elif (exc := done.exception()) is not None:
            outer.set_exception(exc)
        elif isinstance(result := done.result(), _Then):
            result.future.add_done_callback(copy)
        else:
            outer.set_result(result)

    slot.add_done_callback(copy)
    # Given up (a lane stopping): a job still waiting for its slot must not start then.
    outer.add_done_callback(lambda done: slot.cancel() if done.cancelled() else None)
    return outer


def _jsonable(result: Any) -> Any:
    if result is None or isinstance(result, (str, int, float, bool)):
        return result  # most processors' results: no trial encoding
    try:
        json.dumps(result)
        return result
    except (TypeError, ValueError):
        return repr(result)
