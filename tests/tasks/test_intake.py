"""The intake's choice per submitted task: start it here at once, send it to its lane, or
leave it. Statuses are the real script on the real Redis; the runner and the lanes are
stand-ins that record what they were asked (the runs themselves are the e2e tests')."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from aiokafka import ConsumerRecord

from resonance_task.pipeline.dlq import DeadLetters
from resonance_task.pipeline.limits import Limits
from resonance_task.proto.resonance.task.v1.task_pb2 import Priority, Task
from resonance_task.stage import StageOptions
from resonance_task.tasks.registry import Registry
from resonance_task.tasks.reports import StatsReportPayload
from resonance_task.tasks.runner import START_NOW_MAX_SECONDS, RunnerConfig, TaskRunner
from resonance_task.tasks.scheduler import Scheduler
from resonance_task.tasks.stages import Lanes, TaskIntake
from resonance_task.tasks.status import Move, TaskStatuses

TOPIC = "resonance.task.v1"


class Runner:
    """Starts what it is given while `idle`, as TaskRunner.start_now does."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.started: list[str] = []

    def start_now(self, task: Task) -> asyncio.Future[Any] | None:
        if not self.idle:
            return None
        self.started.append(task.task_id)
        return asyncio.get_running_loop().create_future()


class LaneSends:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def __call__(
        self, key: bytes | None, value: bytes, partition: int | None
    ) -> Awaitable[object]:
        self.sent.append(Task.FromString(value).task_id)
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def _no_letters(*_: Any) -> None:
    raise AssertionError("nothing here is dead-lettered")


class Letters:
    """The dead letters sent, each acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, str]]] = []

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Awaitable[object]:
        self.sent.append((topic, key, value, {k: v.decode() for k, v in headers}))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _registry() -> Registry:
    registry = Registry()
    registry.add("noop", _noop)
    registry.add("stats_report", _noop, payload=StatsReportPayload)
    return registry


async def _noop(task: Task, ctx: Any) -> None:
    pass


def _intake(
    statuses: TaskStatuses,
    runner: Runner | None,
    sends: LaneSends,
    letters: Letters | None = None,
) -> TaskIntake:
    return TaskIntake(
        StageOptions(topics=(TOPIC,), consumer_config={"group_id": "unused"}, batch_max_records=10),
        statuses=statuses,
        lanes=Lanes({p: sends for p in (0, 1, 2, 3)}),
        registry=_registry(),
        limits=Limits(),
        dead_letters=DeadLetters(letters or _no_letters),
        dead_letter_topic=f"{TOPIC}.dlq",
        runner=runner,  # type: ignore[arg-type]
    )


def _records(*task_ids: str, tasks: Sequence[Task] = ()) -> list[ConsumerRecord[Any, Any]]:
    return [
        ConsumerRecord(
            TOPIC,
            0,
            offset,
            0,
            0,
            task.task_id.encode(),
            task.SerializeToString(),
            None,
            0,
            0,
            (),
        )
        for offset, task in enumerate(
            [*(Task(task_id=t, task_type="noop") for t in task_ids), *tasks]
        )
    ]


async def test_a_new_task_starts_here_while_a_slot_is_idle(redis_url: str, tag: str) -> None:
    statuses = TaskStatuses(redis_url, tag)
    runner, sends = Runner(idle=True), LaneSends()
    try:
        effects = await _intake(statuses, runner, sends).handle_each(_records("a", "b"))
        assert runner.started == ["a", "b"] and sends.sent == []
        # Each record is done when its task has ended, not before.
        assert all(isinstance(e, asyncio.Future) and not e.done() for e in effects)
    finally:
        await statuses.close()


async def test_a_new_task_goes_to_its_lane_when_none_is_idle_or_starting_is_off(
    redis_url: str, tag: str
) -> None:
    statuses = TaskStatuses(redis_url, tag)
    busy, sends = Runner(idle=False), LaneSends()
    try:
        await _intake(statuses, busy, sends).handle_each(_records("a"))
        await _intake(statuses, None, sends).handle_each(_records("b"))
        assert sends.sent == ["a", "b"] and busy.started == []
    finally:
        await statuses.close()


async def test_a_record_read_again_starts_nothing_twice(redis_url: str, tag: str) -> None:
    """Read again after a crash: a task still queued goes to its lane; one still "running"
    too (its runner may have died with the worker: the lane runs it once the run's lease
    has ended, not before); an ended one is left alone."""
    statuses = TaskStatuses(redis_url, tag)
    runner, sends = Runner(idle=True), LaneSends()
    try:
        await statuses.submit([Task(task_id=t, task_type="noop") for t in ("q", "r", "s")])
        await statuses.move(
            [
                Move("r", "running", "queued", {}, lease_ms=60_000),
                Move("s", "succeeded", "queued", {}),
            ]
        )
        effects = await _intake(statuses, runner, sends).handle_each(_records("q", "r", "s"))
        assert runner.started == [] and sends.sent == ["q", "r"]
        assert effects[2] is None
    finally:
        await statuses.close()


async def test_the_runner_starts_nothing_at_once_that_could_outlive_the_rule(
    redis_url: str, tag: str
) -> None:
    """Not while no lane runs here or one is stopping (nothing would hand it back), and
    not a task that may run longer than START_NOW_MAX_SECONDS (the intake's records after
    it would wait for it): those go to their lanes."""
    statuses = TaskStatuses(redis_url, tag)
    runner = TaskRunner(
        registry=Registry(),
        statuses=statuses,
        scheduler=Scheduler(4),
        retry_topics=[],
        dead_letters=DeadLetters(_no_letters),
        config=RunnerConfig(default_timeout=10.0, retry_delays=()),
    )
    try:
        quick = Task(task_id="q", task_type="noop", timeout_ms=1_000)
        long = Task(task_id="l", task_type="noop", timeout_ms=int(START_NOW_MAX_SECONDS * 2000))
        assert runner.start_now(quick) is None  # no lane runs here
        runner.watch_cancels()
        later = Task(task_id="n", task_type="noop", not_before=int(time.time() * 1000) + 60_000)
        assert runner.start_now(long) is None and runner.start_now(later) is None
        await runner.stop(time.monotonic(), Priority.PRIORITY_NORMAL)
        assert runner.start_now(quick) is None  # stopping
    finally:
        runner.stop_watching()
        await statuses.close()


async def test_a_task_with_a_bad_payload_is_dead_at_once_naming_the_field(
    redis_url: str, tag: str
) -> None:
    """Not queued, not started, never run: dead, its letter in the task DLQ naming the
    field; its idempotency key left free for the task sent again, mended. The good task
    beside it goes on, its payload stored as normalized (defaults filled in)."""
    statuses = TaskStatuses(redis_url, tag)
    runner, sends, letters = Runner(idle=False), LaneSends(), Letters()
    bad = Task(
        task_id="bad",
        task_type="stats_report",
        idempotency_key="report-k",
        payload=b'{"period_start": 9, "period_end": "1"}',
    )
    good = Task(task_id="good", task_type="stats_report", payload=b'{"period_start": 0}')
    try:
        intake = _intake(statuses, runner, sends, letters)
        effects = await intake.handle_each(_records(tasks=[bad, good]))
        await asyncio.gather(*(e for e in effects if e is not None))
        assert sends.sent == ["good"] and runner.started == []
        stored = await statuses.envelope("good")
        assert stored is not None
        assert json.loads(stored.payload) == {"period_start": 0, "period_end": 3_600_000}

        status = await statuses.get("bad")
        assert status is not None and status["state"] == "dead", status
        assert status["error"].startswith("payload.period_end: "), status
        assert status["attempt"] == 0 and status["finished_at"] > 0
        ((topic, key, value, headers),) = letters.sent
        assert (topic, key) == (f"{TOPIC}.dlq", b"bad")
        assert headers["dlq.reason"] == "invalid_payload"
        assert headers["dlq.error"].startswith("payload.period_end: ")
        assert headers["task.attempts"] == "0" and headers["dlq.topic"] == TOPIC
        assert value is not None and Task.FromString(value).payload == bad.payload

        # Read again (its worker died before the commit): nothing more happens to it.
        again = await intake.handle_each(_records(tasks=[bad]))
        assert again == [None] and len(letters.sent) == 1

        mended = Task(task_id="mended", task_type="stats_report", idempotency_key="report-k")
        ((kind, _),) = await statuses.submit([mended])
        assert kind == "new"  # not a duplicate of the dead one
    finally:
        await statuses.close()


async def test_a_bad_payload_read_again_while_queued_is_dead_but_not_another_task(
    redis_url: str, tag: str
) -> None:
    """Its worker died between the status and the dead: read again, it is made dead. A
    valid task queued under the same id (an id used twice) is left to run."""
    statuses = TaskStatuses(redis_url, tag)
    letters = Letters()
    payload = b'{"period_end": "soon"}'
    again = Task(task_id="again", task_type="stats_report", payload=payload)
    other = Task(task_id="other", task_type="stats_report", payload=b'{"period_start": 0}')
    try:
        await statuses.submit([again, other])
        clash = Task(task_id="other", task_type="stats_report", payload=payload)
        effects = await _intake(statuses, None, LaneSends(), letters).handle_each(
            _records(tasks=[again, clash])
        )
        assert effects[1] is None and effects[0] is not None
        await effects[0]
        assert [letter[1] for letter in letters.sent] == [b"again"]
        assert (await statuses.get("again") or {}).get("state") == "dead"
        assert (await statuses.get("other") or {}).get("state") == "queued"
    finally:
        await statuses.close()
